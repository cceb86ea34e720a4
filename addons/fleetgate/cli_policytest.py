"""``fleetgate rules test [PATH]``: run the test cases beside a policy.

The cases and their format: :mod:`fleetgate.offline.cases`; the evaluation:
:mod:`fleetgate.offline.evaluate`. Exit 0 when every case passes, 1 when one fails (or a file
cannot be read), 2 when the policy itself is rejected (as ``rules check`` would say).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when a command runs: the CLI starts fast
    from fleetgate.offline.cases import CaseResult
    from fleetgate.policy.model import Policy

__all__ = ["add_rules_test_command", "run_rules_test"]


def run_rules_test(path: Path, rules: Path | None = None,
                   ) -> tuple[list[CaseResult], list[str], int]:
    """(results, problems with files or policies, exit code) for the cases at ``path``."""
    from fleetgate.offline.cases import CaseError, find_case_files, load_case_file, run_cases
    from fleetgate.policy.loader import PolicyError, iter_problems, load_policy

    problems: list[str] = []
    try:
        files = find_case_files(path)
    except CaseError as exc:
        return [], [str(exc)], 1
    if not files:
        return [], [f"{path}: no test files (put them in {path}/tests/ or {path}/cases/, "
                    "or name a test file)"], 1
    policies: dict[Path, Policy | None] = {}
    results: list[CaseResult] = []
    code = 0
    for f in files:
        try:
            cf = load_case_file(f, rules)
        except CaseError as exc:
            problems.append(str(exc))
            code = max(code, 1)
            continue
        if cf.rules not in policies:
            try:
                policies[cf.rules] = load_policy(cf.rules)
            except PolicyError as exc:
                policies[cf.rules] = None
                problems.extend(iter_problems(exc))
                problems.append(f"{cf.rules}: the rules are rejected; fix them first "
                                "(fleetgate rules check)")
                code = 2
        policy = policies[cf.rules]
        if policy is not None:
            results.extend(run_cases(policy, cf.cases))
    if any(not r.ok for r in results):
        code = max(code, 1)
    return results, problems, code


def cmd_rules_test(args: argparse.Namespace) -> int:
    from fleetgate.offline.report import human, junit, tap

    results, problems, code = run_rules_test(Path(args.path),
                                             Path(args.rules) if args.rules else None)
    for p in problems:
        print(p, file=sys.stderr)
    if args.junit:
        Path(args.junit).write_bytes(junit(results))
    if args.tap:
        print(tap(results))
    else:
        print(human(results, verbose=args.verbose))
    return code


def add_rules_test_command(rules: Any) -> None:
    """``rules test`` under the ``rules`` subcommands."""
    t = rules.add_parser(
        "test", help="run the test cases beside a policy (tests/ or cases/ next to the rules)",
        description="Run YAML test cases (identity + request -> expected decision, MCP calls "
                    "and lists, rate limits and budgets over a sequence, kill-switch triggers) "
                    "against the rules, offline. Exit 1 when a case fails.")
    t.add_argument("path", nargs="?", default="rules",
                   help="a rules directory (its tests/ or cases/), a tests directory or a test "
                        "file (default: rules)")
    t.add_argument("--rules", default="",
                   help="the policy to test (default: the directory holding tests/ or cases/, "
                        "or a file's 'rules:' key)")
    t.add_argument("--tap", action="store_true", help="print TAP version 13 instead")
    t.add_argument("--junit", metavar="FILE", default="",
                   help="also write a JUnit XML report to FILE (CI test reports)")
    t.add_argument("-v", "--verbose", action="store_true", help="list passing cases too")
    t.set_defaults(func=cmd_rules_test)
