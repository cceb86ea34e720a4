"""Load, validate and compile a rules file or directory into a :class:`Policy`.

All or nothing: any problem anywhere raises :class:`PolicyError` listing every problem
found, each with file, line and the path of the offending key, and no policy is returned.
The running gateway keeps its last good policy when that happens.

The dialect (``apiVersion: fleetgate/v1``) accepts the seed articles' snippets verbatim:
``authorization: rules: [- deny: '<CEL>']``. Unknown keys are errors, never ignored: a
misspelt ``deny`` must not silently become no rule at all.

This module reads the files (and the KILLSWITCH.md documents they name), keeps the line
map, hands each section to its domain's parser (``fleetgate.policy.parse_*``, all reporting
through one :class:`~fleetgate.policy.report.Reporter`), checks what spans files (a setting
given twice, aliases that lead nowhere) and assembles the :class:`Policy`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fleetgate.approvals.model import Tier
from fleetgate.errors import ConfigError
from fleetgate.kill.delegation import DelegationPolicy
from fleetgate.kill.model import Action
from fleetgate.kill.triggers import TriggerSpec
from fleetgate.limits.bucket import LimitKind
from fleetgate.llm.providers import ProviderTable
from fleetgate.netaddr import IPNetwork
from fleetgate.policy.credentials import CredentialRoute
from fleetgate.policy.lint import Lint
from fleetgate.policy.model import (
    A2aAgent,
    A2aSettings,
    AgentProfile,
    Budget,
    McpServer,
    McpSettings,
    Policy,
    RateLimit,
    Revocations,
)
from fleetgate.policy.parse_a2a import parse_a2a
from fleetgate.policy.parse_agents import parse_agent, parse_revoked
from fleetgate.policy.parse_approvals import parse_approvals
from fleetgate.policy.parse_budgets import parse_budgets
from fleetgate.policy.parse_credentials import parse_credentials
from fleetgate.policy.parse_killswitch import parse_delegation, parse_killswitch, parse_killswitch_file
from fleetgate.policy.parse_limits import parse_policies
from fleetgate.policy.parse_llm import LlmSection, alias_problems, load_source, parse_llm
from fleetgate.policy.parse_mcp import parse_mcp, parse_mcp_authorization
from fleetgate.policy.parse_rules import parse_authorization, parse_destinations
from fleetgate.policy.report import (
    IdSpaces,
    LineMap,
    Problem,
    Reporter,
    as_list,
    check_keys,
    str_list,
)
from fleetgate.policy.schema import keys
from fleetgate.rule import Rule

__all__ = ["API_VERSION", "PolicyError", "Problem", "load_policy", "policy_files"]

API_VERSION = "fleetgate/v1"
# libyaml's loader when PyYAML was built with it: ~8x faster on large rule sets (bench (g)).
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_TOP_KEYS = keys("Policy")


class PolicyError(ConfigError):
    """The rules cannot be loaded. ``problems`` lists every reason found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


def policy_files(path: Path) -> list[Path]:
    """The YAML files that make up the policy at ``path`` (a file or a directory).

    Directory entries starting with ``.`` are skipped: Kubernetes mounts a ConfigMap as
    ``..data`` plus timestamped hidden directories with symlinks at the top, and the
    visible symlinks are the files to read. Subdirectories (such as ``cases/``) are not read,
    nor is a ``kustomization.yaml`` (the one in ``rules/`` turns the directory into the
    gateway's ConfigMap, see deploy/).
    """
    if path.is_dir():
        return sorted(
            p for p in path.iterdir()
            if not p.name.startswith(".") and p.suffix in (".yaml", ".yml") and p.is_file()
            and p.stem.lower() != "kustomization"
        )
    return [path]


def _watched_files(path: Path) -> list[Path]:
    """What a change to must reload the rules: the rules files and, in a rules directory,
    the documents they refer to (KILLSWITCH.md files and price lists sit next to them)."""
    files = policy_files(path)
    if path.is_dir():
        files += sorted(p for p in path.iterdir()
                        if not p.name.startswith(".") and p.suffix in (".md", ".json")
                        and p.is_file())
    return files


def fingerprint(path: Path) -> tuple[tuple[str, int, int, int], ...]:
    """A cheap change detector for hot reload: (name, inode, size, mtime_ns) per file.

    ``stat`` follows symlinks, so a ConfigMap's atomic ``..data`` symlink swap changes
    the inode seen through every visible file, even when the size and mtime do not.
    """
    out = []
    for f in _watched_files(path) if path.exists() else []:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append((str(f), st.st_ino, st.st_size, st.st_mtime_ns))
    if path.is_dir():
        data = path / "..data"
        if data.is_symlink():
            out.append((str(data) + "->" + os.readlink(data), 0, 0, 0))
    return tuple(out)


ESTIMATE_FACT = "estimated_input_tokens"


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read every file at ``path`` and build the policy, or raise :class:`PolicyError`."""
    root = Path(path)
    if not root.exists():
        raise PolicyError([Problem(str(root), None, "", "rules path does not exist")])
    files = policy_files(root)
    if not files:
        raise PolicyError([Problem(str(root), None, "", "no .yaml/.yml files in directory")])
    parts = _Parts()
    digest = hashlib.sha256()
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            parts.report.error_at(str(f), None, "", f"cannot read: {exc}")
            continue
        digest.update(f.name.encode() + b"\0" + text.encode() + b"\0")
        _add_file(parts, str(f), text)
        parts.mentions_estimate |= ESTIMATE_FACT in text
    for name, text in parts.documents:  # referenced KILLSWITCH.md files are policy too
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    listed = load_source(parts.llm)  # llm.pricing.source: the price list, read once
    if listed is not None:
        parts.report.problems.append(listed)
    elif parts.llm.price_list is not None:
        digest.update(b"price-list\0" + parts.llm.price_list.digest.encode() + b"\0")
    for key_path, message in alias_problems(parts.llm):
        parts.report.error_at(parts.report.file, None, key_path, message)
    if parts.report.problems:
        raise PolicyError(parts.report.problems)
    parts.lint.finish(parts.report)
    policy = parts.build(digest.hexdigest()[:12], tuple(str(f) for f in files))
    _ = policy.profile_index  # built here, in the loader's thread, not on a request
    return policy


@dataclass
class _Parts:
    """What the documents read so far declare, in file order, and the reporter locating
    their problems."""

    report: Reporter = field(default_factory=Reporter)
    lint: Lint = field(default_factory=Lint)
    ids: IdSpaces = field(default_factory=IdSpaces)
    rules: list[Rule] = field(default_factory=list)
    agents: list[AgentProfile] = field(default_factory=list)
    revoked: list[Revocations] = field(default_factory=list)
    allow_private: list[IPNetwork] = field(default_factory=list)
    llm: LlmSection = field(default_factory=LlmSection)
    mcp_rules: list[Rule] = field(default_factory=list)
    mcp_servers: list[McpServer] = field(default_factory=list)
    mcp_flags: dict[str, bool] = field(default_factory=dict)  # revealDenied, detect
    limits: list[RateLimit] = field(default_factory=list)
    budgets: list[Budget] = field(default_factory=list)
    credentials: list[CredentialRoute] = field(default_factory=list)
    kill_actions: list[Action] = field(default_factory=list)
    kill_triggers: list[TriggerSpec] = field(default_factory=list)
    delegation: DelegationPolicy | None = None
    approvals: list[Tier] = field(default_factory=list)  # file order: first match wins
    documents: list[tuple[str, str]] = field(default_factory=list)  # (name, text) read
    a2a_agents: list[A2aAgent] = field(default_factory=list)
    a2a_names: set[str] = field(default_factory=set)
    a2a_max_depth: int | None = None
    mentions_estimate: bool = False  # some rules file names llm.estimated_input_tokens

    def build(self, revision: str, files: tuple[str, ...]) -> Policy:
        return Policy(
            revision=revision,
            files=files,
            warnings=tuple(str(w) for w in self.report.warnings),
            rules=tuple(self.rules),
            agents=tuple(self.agents),
            revoked=Revocations(*(frozenset().union(*(getattr(r, k) for r in self.revoked))
                                  for k in ("agents", "tokens", "roles", "sessions"))),
            allow_private=tuple(self.allow_private),
            cel_inputs=_cel_inputs(self.rules, self.agents),
            needs_input_estimate=self.needs_input_estimate(),
            providers=ProviderTable(self.llm.providers),
            pricing=self.llm.pricing(),
            limits=tuple(self.limits),
            budgets=tuple(self.budgets),
            credentials=tuple(self.credentials),
            kill_actions=tuple(self.kill_actions),
            kill_triggers=tuple(self.kill_triggers),
            delegation=self.delegation or DelegationPolicy(),
            a2a=A2aSettings(tuple(self.a2a_agents),
                            5 if self.a2a_max_depth is None else self.a2a_max_depth),
            approvals=tuple(self.approvals),
            mcp=McpSettings(servers=tuple(self.mcp_servers), rules=tuple(self.mcp_rules),
                            reveal_denied=self.mcp_flags.get("revealDenied", False),
                            detect=self.mcp_flags.get("detect", True)),
        )

    def needs_input_estimate(self) -> bool:
        """Whether LLM requests need a pre-flight input estimate (tiktoken, ~80 MiB of
        tables): a budget reserves estimated cost, a ``type: tokens`` limit reserves
        estimated tokens, and an expression may read ``llm.estimated_input_tokens``. The
        name anywhere in a rules file (even a comment) counts: over-including only costs
        memory, leaving it out would hand a rule 0."""
        limits = [*self.limits, *(lim for a in self.agents for lim in a.limits)]
        return (self.mentions_estimate or bool(self.budgets)
                or any(a.budgets for a in self.agents)
                or any(lim.spec.kind is LimitKind.TOKENS for lim in limits))


def _cel_inputs(rules: list[Rule], agents: list[AgentProfile]) -> frozenset[str]:
    sources = [r.expr.source for r in rules]
    for a in agents:
        sources.append(a.match.source)
        sources.extend(r.expr.source for r in a.rules)
    text = "\n".join(sources)
    # A name that appears anywhere (even in a string) keeps its input: over-including
    # only costs time, leaving out something a rule reads would make it error (deny).
    return frozenset(k for k in ("query", "headers", "llm", "a2a") if k in text)


def _add_file(parts: _Parts, file: str, text: str) -> None:
    report = parts.report
    report.document(file)
    try:
        nodes = list(yaml.compose_all(text, Loader=_YAML_LOADER))
        docs = list(yaml.load_all(text, Loader=_YAML_LOADER))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        report.error_at(file, line, "", f"invalid YAML: {getattr(exc, 'problem', exc)}")
        return
    for node, doc in zip(nodes, docs, strict=True):
        if node is None or doc is None:
            continue
        lines = LineMap(node)
        report.document(file, lines)
        for dup, line in lines.duplicates:
            report.error_at(file, line, dup, "duplicate key (YAML would keep only the last)")
        _add_document(parts, doc, Path(file))


def _add_document(parts: _Parts, doc: Any, file: Path) -> None:
    """One YAML document: each section to its parser, then what spans files."""
    report, ids, owner = parts.report, parts.ids, file.stem
    if not isinstance(doc, dict):
        report.error("", "a rules document must be a mapping")
        return
    if doc.get("apiVersion") != API_VERSION:
        report.error("apiVersion", f"apiVersion must be {API_VERSION!r}, got "
                     f"{doc.get('apiVersion')!r}")
    if doc.get("kind", "Policy") != "Policy":
        report.error("kind", "kind must be 'Policy'")
    check_keys(doc, "", _TOP_KEYS, report)
    str_list(doc.get("claims"), "claims", report)  # read by the lint (parts.lint)
    parts.lint.document(doc, report)
    if "authorization" in doc:
        parts.rules += parse_authorization(doc["authorization"], "authorization", report,
                                           owner=owner, ids=ids.rules)
    for i, entry in enumerate(as_list(doc.get("agents", []), "agents", report)):
        agent = parse_agent(entry, f"agents[{i}]", report, ids=ids)
        if agent is not None:
            parts.agents.append(agent)
    if "mcpAuthorization" in doc:
        parts.mcp_rules += parse_mcp_authorization(doc["mcpAuthorization"], "mcpAuthorization",
                                                   report, owner=owner, ids=ids.rules)
    _add_mcp(parts, doc.get("mcp"))
    _add_a2a(parts, doc.get("a2a"))
    if "policies" in doc:
        parts.limits += parse_policies(doc["policies"], "policies", report, owner=owner,
                                       ids=ids.limits)
    if "budgets" in doc:
        parts.budgets += parse_budgets(doc["budgets"], "budgets", report, owner=owner,
                                       ids=ids.limits)
    if "approvals" in doc:
        parts.approvals += parse_approvals(doc["approvals"], "approvals", report,
                                           ids=ids.approvals)
    if "credentials" in doc:
        parts.credentials += parse_credentials(doc["credentials"], "credentials", report,
                                               owner=owner, taken=ids.credentials)
    revoked = parse_revoked(doc.get("revoked"), "revoked", report)
    if revoked is not None:
        parts.revoked.append(revoked)
    if "killswitch" in doc:
        _add_killswitch(parts, doc["killswitch"], file)
    if "delegation" in doc:
        if parts.delegation is not None:
            report.error("delegation", "delegation is declared in more than one rules file")
        else:
            parts.delegation = parse_delegation(doc["delegation"], "delegation", report)
    parts.allow_private += parse_destinations(doc.get("destinations"), "destinations",
                                              report) or []
    llm = parse_llm(doc.get("llm"), "llm", report, seen=parts.llm)
    if llm is not None:
        parts.llm.merge(llm)


def _add_mcp(parts: _Parts, node: Any) -> None:
    section = parse_mcp(node, "mcp", parts.report, ids=parts.ids.rules,
                        names=parts.ids.mcp_servers)
    if section is None:
        return
    for key, value in (("revealDenied", section.reveal_denied), ("detect", section.detect)):
        if value is None:
            continue
        if parts.mcp_flags.get(key, value) != value:
            parts.report.error(f"mcp.{key}", f"mcp.{key} is set differently in two files")
        else:
            parts.mcp_flags[key] = value
    parts.mcp_servers += section.servers


def _add_a2a(parts: _Parts, node: Any) -> None:
    section = parse_a2a(node, "a2a", parts.report, names=parts.a2a_names)
    if section is None:
        return
    parts.a2a_agents += section.agents
    if section.max_depth is not None:
        if parts.a2a_max_depth not in (None, section.max_depth):
            parts.report.error("a2a.maxDepth", "a2a.maxDepth is set differently in two files")
        else:
            parts.a2a_max_depth = section.max_depth


def _add_killswitch(parts: _Parts, node: Any, file: Path) -> None:
    """The ``killswitch`` section and the KILLSWITCH.md documents it names (read from the
    rules file's directory: a ConfigMap is flat)."""
    report = parts.report
    section = parse_killswitch(node, "killswitch", report)
    if section is None:
        return
    parts.kill_actions += section.actions
    _add_triggers(parts, section.triggers, "killswitch.triggers")
    for name, where in section.files:
        path = file.parent / name
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            report.error(where, f"cannot use {name}: {exc}")
            continue
        parts.documents.append((name, text))
        added = parse_killswitch_file(text, where, report, name=name, path=str(path),
                                      ids=parts.ids.rules)
        if added is not None:
            _add_triggers(parts, added.triggers, where)
            parts.rules += added.rules
            parts.mcp_rules += added.mcp_rules


def _add_triggers(parts: _Parts, triggers: tuple[TriggerSpec, ...], where: str) -> None:
    """Trigger ids are unique across the rules files and the KILLSWITCH.md documents."""
    for t in triggers:
        first = parts.ids.triggers.claim(t.id, parts.report.source(where))
        if first is not None:
            parts.report.error(where, f"trigger id {t.id!r} is already used at {first}")
            continue
        parts.kill_triggers.append(t)


def iter_problems(exc: PolicyError) -> Iterator[str]:
    """One human line per problem: what ``fleetgate rules check``, the reload log and
    ``/healthz/ready`` all show."""
    for p in exc.problems:
        yield str(p)
