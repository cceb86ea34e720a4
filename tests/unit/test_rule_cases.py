"""The example rules' test cases, run by the user-facing tool: ``fleetgate rules test rules``.

Every case in ``rules/cases/*.yaml`` is one pytest test, run through
:func:`fleetgate.offline.cases.run_case` exactly as ``fleetgate rules test`` runs it (the
same evaluator, the same comparison, the same ``file:line`` message on failure). So the
project's suite exercises the tool a user runs beside their own policy, and a case file that
the tool cannot read fails here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleetgate.cli_policytest import run_rules_test
from fleetgate.offline.cases import TestCase, find_case_files, load_case_file, run_case
from fleetgate.policy.loader import load_policy
from fleetgate.policy.model import Policy

RULES = Path(__file__).resolve().parents[2] / "rules"


def _cases() -> list[Any]:
    files = find_case_files(RULES)
    assert files, f"no case files beside {RULES}"
    params = []
    for f in files:
        cf = load_case_file(f)
        assert cf.rules == RULES, f"{f}: tests {cf.rules}, not the example rules"
        params += [pytest.param(c, id=f"{f.stem}: {c.name}") for c in cf.cases]
    return params


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(RULES)


@pytest.mark.parametrize("case", _cases())
def test_rule_case(policy: Policy, case: TestCase) -> None:
    result = run_case(policy, case)
    assert result.ok, result.message()


def test_the_tool_passes_on_the_example_rules() -> None:
    """``fleetgate rules test rules`` (the command's own code path) exits 0, every file read."""
    results, problems, code = run_rules_test(RULES)
    assert (code, problems) == (0, [])
    assert len(results) == sum(len(load_case_file(f).cases) for f in find_case_files(RULES))
    kinds = {r.verdict.stage for r in results if r.verdict is not None}
    assert {"rules", "mcp", "limit", "budget", "allowed"} <= kinds
