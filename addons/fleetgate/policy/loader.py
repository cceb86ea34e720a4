"""Load, validate and compile a rules file or directory into a :class:`Policy`.

All or nothing: any problem anywhere raises :class:`PolicyError` listing every problem
found, each with file, line and the path of the offending key, and no policy is returned.
The running gateway keeps its last good policy when that happens.

The dialect (``apiVersion: fleetgate/v1``) accepts the seed articles' snippets verbatim:
``authorization: rules: [- deny: '<CEL>']``. Unknown keys are errors, never ignored: a
misspelt ``deny`` must not silently become no rule at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from fleetgate.celexpr import CelError, compile_expr
from fleetgate.identity.mint import parse_ttl
from fleetgate.kill.delegation import DelegationPolicy
from fleetgate.kill.killswitch_md import parse_killswitch_md
from fleetgate.kill.model import Action
from fleetgate.kill.triggers import TriggerSpec, parse_triggers
from fleetgate.limits.bucket import BucketSpec, LimitKind
from fleetgate.limits.budget import BudgetSpec, Period
from fleetgate.llm.pricing import Price, PricingTable, price_from_dict
from fleetgate.llm.providers import Provider, ProviderTable, provider_from_dict
from fleetgate.mcp.policy import compile_capability, compile_mcp_entry
from fleetgate.policy.credentials import CredentialRoute, parse_credentials
from fleetgate.policy.killswitch_rules import (
    KILLSWITCH_KEYS,
    parse_delegation,
    parse_kill_actions,
)
from fleetgate.policy.model import (
    AgentProfile,
    Budget,
    Effect,
    McpMode,
    McpServer,
    McpSettings,
    Policy,
    RateLimit,
    Revocations,
    Rule,
)
from fleetgate.policy.netaddr import HostPattern, IPNetwork, parse_networks

__all__ = ["API_VERSION", "PolicyError", "Problem", "load_policy", "policy_files"]

API_VERSION = "fleetgate/v1"
# libyaml's loader when PyYAML was built with it: ~8x faster on large rule sets (bench (g)).
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
REQUEST_ROOTS = ("jwt", "request", "llm")
MATCH_ROOTS = ("jwt",)

_TOP_KEYS = {"apiVersion", "kind", "metadata", "authorization", "agents", "revoked", "llm",
             "destinations", "mcpAuthorization", "mcp", "policies", "budgets",
             "killswitch", "delegation", "credentials"}
_AGENT_KEYS = {"name", "match", "egress", "authorization", "description", "mcpAuthorization",
               "allowed_tools", "denied_tools", "policies", "budgets"}
_BUDGET_KEYS = {"id", "per", "key", "when", "period", "rolling", "usd", "tokens"}
_BUDGET_PER = ("agent", "role", "session", "fleet")
_LIMIT_KEYS = {"maxTokens", "tokensPerFill", "fillInterval", "type", "id", "key", "when"}
# what a limit's key / when may read: the request, and what it asks of an LLM or MCP server
LIMIT_ROOTS = ("jwt", "request", "llm", "mcp")
_MCP_SERVER_KEYS = {"name", "hosts", "path", "poisoning", "pins", "mcpAuthorization"}
_RULE_KEYS = {"allow", "deny", "require", "id", "reason", "hosts"}

# Keys from the seed dialect that later releases implement. Until then they are refused
# by name, so an operator never believes a limit is enforced when it is not.
_NOT_YET = {
    "localRateLimit": "localRateLimit goes under 'policies:' (policies: {localRateLimit: [...]})",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the rules, located for a human."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        loc = f"{self.file}:{self.line}" if self.line else self.file
        where = f" at {self.path}" if self.path else ""
        return f"{loc}{where}: {self.message}"


class PolicyError(Exception):
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
    the documents they refer to (KILLSWITCH.md files sit next to them)."""
    files = policy_files(path)
    if path.is_dir():
        files += sorted(p for p in path.iterdir()
                        if not p.name.startswith(".") and p.suffix == ".md" and p.is_file())
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


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read every file at ``path`` and build the policy, or raise :class:`PolicyError`."""
    root = Path(path)
    if not root.exists():
        raise PolicyError([Problem(str(root), None, "", "rules path does not exist")])
    files = policy_files(root)
    if not files:
        raise PolicyError([Problem(str(root), None, "", "no .yaml/.yml files in directory")])
    builder = _Builder()
    digest = hashlib.sha256()
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            builder.problem(str(f), None, "", f"cannot read: {exc}")
            continue
        digest.update(f.name.encode() + b"\0" + text.encode() + b"\0")
        builder.add_file(str(f), text)
    for name, text in builder.documents:  # referenced KILLSWITCH.md files are policy too
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    builder._check_aliases()
    if builder.problems:
        raise PolicyError(builder.problems)
    return builder.build(digest.hexdigest()[:12], tuple(str(f) for f in files))


class _Lines:
    """Maps a key path such as ``agents[0].egress.hosts[1]`` to its YAML line."""

    def __init__(self) -> None:
        self.lines: dict[str, int] = {}
        self.duplicates: list[tuple[str, int]] = []

    def walk(self, node: yaml.Node, path: str, line: int | None = None) -> None:
        self.lines[path] = line or node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                k = str(key.value)
                child = f"{path}.{k}" if path else k
                if k in seen:
                    self.duplicates.append((child, key.start_mark.line + 1))
                seen.add(k)
                self.walk(value, child, key.start_mark.line + 1)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.walk(item, f"{path}[{i}]")

    def at(self, path: str) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return self.lines.get("")


class _Builder:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.rules: list[Rule] = []
        self.agents: list[AgentProfile] = []
        self.revoked_agents: set[str] = set()
        self.revoked_tokens: set[str] = set()
        self.revoked_roles: set[str] = set()
        self.revoked_sessions: set[str] = set()
        self.allow_private: list[IPNetwork] = []
        self.providers: list[Provider] = []
        self.prices: dict[str, tuple[Price, str]] = {}
        self.overrides: dict[str, tuple[Price, str]] = {}
        self.aliases: dict[str, str] = {}
        self.rule_ids: dict[str, str] = {}
        self.agent_names: dict[str, str] = {}
        self.mcp_rules: list[Rule] = []
        self.mcp_servers: list[McpServer] = []
        self.mcp_reveal: bool | None = None
        self.mcp_detect: bool | None = None
        self.limits: list[RateLimit] = []
        self.budgets: list[Budget] = []
        self.limit_ids: dict[str, str] = {}
        self.credentials: list[CredentialRoute] = []
        self.credential_ids: set[str] = set()  # unique across files
        self.kill_actions: list[Action] = []
        self.kill_triggers: list[TriggerSpec] = []
        self.trigger_ids: dict[str, str] = {}
        self.documents: list[tuple[str, str]] = []  # (name, text) of referenced documents
        self.delegation: DelegationPolicy | None = None
        self._file = ""
        self._lines = _Lines()

    def problem(self, file: str, line: int | None, path: str, message: str) -> None:
        self.problems.append(Problem(file, line, path, message))

    def err(self, path: str, message: str) -> None:
        self.problem(self._file, self._lines.at(path), path, message)

    def src(self, path: str) -> str:
        line = self._lines.at(path)
        return f"{os.path.basename(self._file)}:{line}" if line else os.path.basename(self._file)

    def add_file(self, file: str, text: str) -> None:
        self._file = file
        self._lines = _Lines()
        try:
            nodes = list(yaml.compose_all(text, Loader=_YAML_LOADER))
            docs = list(yaml.load_all(text, Loader=_YAML_LOADER))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            self.problem(file, line, "", f"invalid YAML: {getattr(exc, 'problem', exc)}")
            return
        for node, doc in zip(nodes, docs, strict=True):
            if node is None or doc is None:
                continue
            self._lines = _Lines()
            self._lines.walk(node, "")
            for dup, line in self._lines.duplicates:
                self.problem(file, line, dup, "duplicate key (YAML would keep only the last)")
            self.add_document(doc)

    def add_document(self, doc: Any) -> None:
        if not isinstance(doc, dict):
            self.err("", "a rules document must be a mapping")
            return
        if doc.get("apiVersion") != API_VERSION:
            self.err("apiVersion", f"apiVersion must be {API_VERSION!r}, got {doc.get('apiVersion')!r}")
        if doc.get("kind", "Policy") != "Policy":
            self.err("kind", "kind must be 'Policy'")
        self._check_keys(doc, "", _TOP_KEYS)
        if "authorization" in doc:
            owner = Path(self._file).stem
            self.rules.extend(self._authorization(doc["authorization"], "authorization", owner))
        for i, agent in enumerate(self._list(doc.get("agents", []), "agents")):
            self._agent(agent, f"agents[{i}]")
        if "mcpAuthorization" in doc:
            self.mcp_rules.extend(self._mcp_authorization(
                doc["mcpAuthorization"], "mcpAuthorization", Path(self._file).stem))
        self._mcp(doc.get("mcp"))
        if "policies" in doc:
            self.limits.extend(self._policies(doc["policies"], "policies", Path(self._file).stem))
        if "budgets" in doc:
            self.budgets.extend(self._budgets(doc["budgets"], "budgets", Path(self._file).stem))
        if "credentials" in doc:
            self.credentials.extend(parse_credentials(doc["credentials"], "credentials",
                                                      Path(self._file).stem, self.err,
                                                      taken=self.credential_ids))
        self._revoked(doc.get("revoked"))
        if "killswitch" in doc:
            self._killswitch(doc["killswitch"])
        if "delegation" in doc:
            self._delegation(doc["delegation"])
        self._destinations(doc.get("destinations"))
        self._llm(doc.get("llm"))

    # -- sections -------------------------------------------------------------------

    def _check_keys(self, obj: dict[str, Any], path: str, allowed: set[str]) -> None:
        for key in obj:
            where = f"{path}.{key}" if path else str(key)
            if key in _NOT_YET and key not in allowed:
                self.err(where, _NOT_YET[key])
            elif key not in allowed:
                self.err(where, f"unknown key {key!r}; expected one of {sorted(allowed)}")

    def _list(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.err(path, "must be a list")
            return []
        return value

    def _str_list(self, value: Any, path: str) -> list[str]:
        out = []
        for i, item in enumerate(self._list(value, path)):
            if isinstance(item, str | int) and not isinstance(item, bool) and str(item).strip():
                out.append(str(item).strip())
            else:
                self.err(f"{path}[{i}]", "must be a non-empty string")
        return out

    def _authorization(self, section: Any, path: str, owner: str) -> list[Rule]:
        return self._rules_section(section, path, lambda entry, where, i: self._rule(
            entry, where, f"{owner}.authorization[{i}]"))

    def _rules_section(self, section: Any, path: str,
                       build: Callable[[Any, str, int], Rule | None]) -> list[Rule]:
        """``{rules: [...]}``, each entry built by ``build(entry, key path, index)``."""
        if not isinstance(section, dict):
            self.err(path, "must be a mapping with a 'rules' list")
            return []
        self._check_keys(section, path, {"rules"})
        rules = []
        for i, entry in enumerate(self._list(section.get("rules"), f"{path}.rules")):
            rule = build(entry, f"{path}.rules[{i}]", i)
            if rule is not None:
                rules.append(rule)
        return rules

    def _rule(self, entry: Any, path: str, default_id: str) -> Rule | None:
        if isinstance(entry, str):  # agentgateway style: a bare expression allows
            entry = {"allow": entry}
        if not isinstance(entry, dict):
            self.err(path, "a rule is a mapping with one of allow/deny/require")
            return None
        self._check_keys(entry, path, _RULE_KEYS)
        effects = [e for e in Effect if e.value in entry]
        if len(effects) != 1:
            self.err(path, "a rule needs exactly one of 'allow', 'deny', 'require'")
            return None
        effect = effects[0]
        if isinstance(entry[effect.value], bool):  # `allow: true` in plain YAML
            entry = {**entry, effect.value: "true" if entry[effect.value] else "false"}
        rule_id = entry.get("id", default_id)
        if not isinstance(rule_id, str) or not rule_id:
            self.err(f"{path}.id", "id must be a non-empty string")
            return None
        if rule_id in self.rule_ids:
            self.err(f"{path}.id", f"duplicate rule id {rule_id!r} (first at {self.rule_ids[rule_id]})")
            return None
        self.rule_ids[rule_id] = self.src(path)
        reason = entry.get("reason")
        if reason is not None and not isinstance(reason, str):
            self.err(f"{path}.reason", "reason must be a string")
        hosts: list[HostPattern] = []
        for i, host in enumerate(self._str_list(entry.get("hosts"), f"{path}.hosts")):
            try:
                hosts.append(HostPattern(host, cidr=True))
            except ValueError as exc:
                self.err(f"{path}.hosts[{i}]", str(exc))
        try:
            expr = compile_expr(entry[effect.value], REQUEST_ROOTS)
        except CelError as exc:
            self.err(f"{path}.{effect.value}", f"CEL: {exc}")
            return None
        return Rule(id=rule_id, effect=effect, expr=expr,
                    reason=reason if isinstance(reason, str) else None, source=self.src(path),
                    hosts=tuple(hosts))

    def _agent(self, entry: Any, path: str) -> None:
        if not isinstance(entry, dict):
            self.err(path, "an agent profile must be a mapping")
            return
        self._check_keys(entry, path, _AGENT_KEYS)
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            self.err(f"{path}.name", "every agent profile needs a 'name'")
            return
        if name in self.agent_names:
            self.err(f"{path}.name", f"duplicate agent name {name!r} (first at {self.agent_names[name]})")
            return
        self.agent_names[name] = self.src(path)
        try:
            match = compile_expr(entry.get("match", ""), MATCH_ROOTS)
        except CelError as exc:
            self.err(f"{path}.match", f"CEL: {exc}")
            return
        egress: list[HostPattern] = []
        eg = entry.get("egress", {})
        if not isinstance(eg, dict):
            self.err(f"{path}.egress", "egress must be a mapping with a 'hosts' list")
        else:
            self._check_keys(eg, f"{path}.egress", {"hosts"})
            for i, host in enumerate(self._str_list(eg.get("hosts"), f"{path}.egress.hosts")):
                try:
                    egress.append(HostPattern(host, cidr=True))
                except ValueError as exc:
                    self.err(f"{path}.egress.hosts[{i}]", str(exc))
        rules = (self._authorization(entry["authorization"], f"{path}.authorization", name)
                 if "authorization" in entry else [])
        mcp_rules = (self._mcp_authorization(entry["mcpAuthorization"], f"{path}.mcpAuthorization",
                                             name) if "mcpAuthorization" in entry else [])
        for kind in ("allowed_tools", "denied_tools"):
            for i, pattern in enumerate(self._str_list(entry.get(kind), f"{path}.{kind}")):
                rule = self._register(f"{name}.{kind}[{i}]", f"{path}.{kind}[{i}]",
                                      lambda rid, k=kind, pat=pattern: compile_capability(k, pat, rid))
                if rule is not None:
                    mcp_rules.append(rule)
        limits = (self._policies(entry["policies"], f"{path}.policies", name)
                  if "policies" in entry else [])
        budgets = (self._budgets(entry["budgets"], f"{path}.budgets", name)
                   if "budgets" in entry else [])
        self.agents.append(AgentProfile(name=name, match=match, egress=tuple(egress),
                                        rules=tuple(rules), source=self.src(path),
                                        mcp_rules=tuple(mcp_rules), limits=tuple(limits),
                                        budgets=tuple(budgets)))

    # -- budgets --------------------------------------------------------------------

    def _limit_id(self, entry: dict[str, Any], path: str, default_id: str) -> str | None:
        """A rate limit's or budget's id: unique among both (they share the decision log)."""
        lid = entry.get("id", default_id)
        if not isinstance(lid, str) or not lid:
            self.err(f"{path}.id", "id must be a non-empty string")
            return None
        if lid in self.limit_ids:
            self.err(f"{path}.id", f"duplicate limit id {lid!r} (first at {self.limit_ids[lid]})")
            return None
        self.limit_ids[lid] = self.src(path)
        return lid

    def _key_and_when(self, entry: dict[str, Any], path: str) -> dict[str, Any] | None:
        """The optional CEL ``key`` and ``when`` of a rate limit or budget, compiled."""
        exprs: dict[str, Any] = {}
        for key in ("key", "when"):
            if key in entry:
                try:
                    exprs[key] = compile_expr(entry[key], LIMIT_ROOTS)
                except CelError as exc:
                    self.err(f"{path}.{key}", f"CEL: {exc}")
                    return None
        return exprs

    def _budgets(self, section: Any, path: str, owner: str) -> list[Budget]:
        out = []
        for i, entry in enumerate(self._list(section, path)):
            budget = self._budget(entry, f"{path}[{i}]", f"{owner}.budgets[{i}]")
            if budget is not None:
                out.append(budget)
        return out

    def _budget(self, entry: Any, path: str, default_id: str) -> Budget | None:
        if not isinstance(entry, dict):
            self.err(path, "a budget is a mapping {per, period or rolling, usd and/or tokens}")
            return None
        self._check_keys(entry, path, _BUDGET_KEYS)
        per = entry.get("per", "agent")
        if "key" in entry and "per" in entry:
            self.err(f"{path}.key", "use either 'per' or 'key', not both")
            return None
        if per not in _BUDGET_PER:
            self.err(f"{path}.per", f"per must be one of {', '.join(_BUDGET_PER)} (or use a CEL 'key')")
            return None
        if ("period" in entry) == ("rolling" in entry):
            self.err(path, "a budget needs exactly one of 'period' (hour, day, month) or 'rolling' "
                     "(a duration such as 24h)")
            return None
        rolling = 0.0
        if "period" in entry:
            try:
                period = Period(entry["period"])
                if period is Period.ROLLING:
                    raise ValueError
            except ValueError:
                self.err(f"{path}.period", "period must be hour, day or month (UTC calendar)")
                return None
        else:
            period = Period.ROLLING
            try:
                rolling = float(parse_ttl(str(entry["rolling"])))
            except ValueError:
                self.err(f"{path}.rolling", f"rolling must be a duration such as 1h or 24h (got "
                         f"{entry['rolling']!r})")
                return None
        amounts: dict[str, float | None] = {}
        for unit in ("usd", "tokens"):
            section = entry.get(unit)
            if section is None:
                continue
            if not isinstance(section, dict):
                self.err(f"{path}.{unit}", f"{unit} must be a mapping {{soft, hard}}")
                return None
            self._check_keys(section, f"{path}.{unit}", {"soft", "hard"})
            for level in ("soft", "hard"):
                v = section.get(level)
                if v is None:
                    continue
                if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
                    self.err(f"{path}.{unit}.{level}", f"{unit}.{level} must be a positive number")
                    return None
                amounts[f"{level}_{unit}"] = v
        if not any(v is not None for v in amounts.values()):
            self.err(path, "a budget needs at least one of usd.soft, usd.hard, tokens.soft, tokens.hard")
            return None
        exprs = self._key_and_when(entry, path)
        bid = self._limit_id(entry, path, default_id)
        if exprs is None or bid is None:
            return None
        hard_t, soft_t = amounts.get("hard_tokens"), amounts.get("soft_tokens")
        spec = BudgetSpec(period, rolling, hard_usd=amounts.get("hard_usd"),
                          soft_usd=amounts.get("soft_usd"),
                          hard_tokens=None if hard_t is None else int(hard_t),
                          soft_tokens=None if soft_t is None else int(soft_t))
        return Budget(bid, spec, "key" if "key" in entry else str(per), exprs.get("key"),
                      exprs.get("when"), self.src(path))

    # -- rate limits ----------------------------------------------------------------

    def _policies(self, section: Any, path: str, owner: str) -> list[RateLimit]:
        """The seed's ``policies: {localRateLimit: [...]}``."""
        if not isinstance(section, dict):
            self.err(path, "policies must be a mapping with a 'localRateLimit' list")
            return []
        self._check_keys(section, path, {"localRateLimit"})
        out = []
        for i, entry in enumerate(self._list(section.get("localRateLimit"),
                                             f"{path}.localRateLimit")):
            limit = self._limit(entry, f"{path}.localRateLimit[{i}]",
                                f"{owner}.localRateLimit[{i}]")
            if limit is not None:
                out.append(limit)
        return out

    def _limit(self, entry: Any, path: str, default_id: str) -> RateLimit | None:
        if not isinstance(entry, dict):
            self.err(path, "a limit is a mapping {maxTokens, tokensPerFill, fillInterval, type}")
            return None
        self._check_keys(entry, path, _LIMIT_KEYS)
        nums: dict[str, int] = {}
        for key in ("maxTokens", "tokensPerFill"):
            v = entry.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                self.err(f"{path}.{key}", f"{key} must be a positive integer")
                return None
            nums[key] = v
        interval = entry.get("fillInterval")
        try:
            seconds = (float(interval) if isinstance(interval, int | float)
                       and not isinstance(interval, bool) else float(parse_ttl(str(interval))))
            if seconds <= 0:
                raise ValueError("must be > 0")
        except ValueError:
            self.err(f"{path}.fillInterval", f"fillInterval must be a duration such as 1s, 1m, "
                     f"1h (got {interval!r})")
            return None
        try:
            kind = LimitKind(entry.get("type", "requests"))
        except ValueError:
            self.err(f"{path}.type", "type must be 'requests' or 'tokens'")
            return None
        exprs = self._key_and_when(entry, path)
        lid = self._limit_id(entry, path, default_id)
        if exprs is None or lid is None:
            return None
        spec = BucketSpec(nums["maxTokens"], nums["tokensPerFill"], seconds, kind)
        return RateLimit(lid, spec, exprs.get("key"), exprs.get("when"), self.src(path))

    # -- MCP ------------------------------------------------------------------------

    def _register(self, rule_id: str, path: str, build: Any) -> Rule | None:
        """Build one MCP rule with ``build(rule_id)``; record its id; report problems."""
        try:
            rule: Rule = build(rule_id)
        except ValueError as exc:
            self.err(path, str(exc))
            return None
        if rule.id in self.rule_ids:
            self.err(f"{path}", f"duplicate rule id {rule.id!r} (first at {self.rule_ids[rule.id]})")
            return None
        self.rule_ids[rule.id] = self.src(path)
        return replace(rule, source=self.src(path))

    def _mcp_authorization(self, section: Any, path: str, owner: str) -> list[Rule]:
        """The seed's ``mcpAuthorization: rules: [...]``: CEL strings allow; fleetgate adds
        ``{deny: CEL}`` entries (argument-aware exceptions) with optional id and reason."""
        return self._rules_section(section, path, lambda entry, where, i: self._register(
            f"{owner}.mcpAuthorization[{i}]", where, lambda rid: compile_mcp_entry(entry, rid)))

    def _mcp(self, section: Any) -> None:
        if section is None:
            return
        if not isinstance(section, dict):
            self.err("mcp", "mcp must be a mapping with 'servers', 'revealDenied', 'detect'")
            return
        self._check_keys(section, "mcp", {"servers", "revealDenied", "detect"})
        for key, attr in (("revealDenied", "mcp_reveal"), ("detect", "mcp_detect")):
            if key in section:
                if not isinstance(section[key], bool):
                    self.err(f"mcp.{key}", f"{key} must be true or false")
                elif getattr(self, attr) is not None and getattr(self, attr) != section[key]:
                    self.err(f"mcp.{key}", f"mcp.{key} is set differently in two files")
                else:
                    setattr(self, attr, section[key])
        names = {s.name for s in self.mcp_servers}
        for i, entry in enumerate(self._list(section.get("servers"), "mcp.servers")):
            where = f"mcp.servers[{i}]"
            if not isinstance(entry, dict):
                self.err(where, "a server is a mapping {name, hosts, path, poisoning, pins, "
                         "mcpAuthorization}")
                continue
            self._check_keys(entry, where, _MCP_SERVER_KEYS)
            name = entry.get("name")
            if not isinstance(name, str) or not name.strip():
                self.err(f"{where}.name", "every MCP server needs a 'name'")
                continue
            if name in names:
                self.err(f"{where}.name", f"duplicate MCP server name {name!r}")
                continue
            names.add(name)
            hosts: list[HostPattern] = []
            for j, host in enumerate(self._str_list(entry.get("hosts"), f"{where}.hosts")):
                try:
                    hosts.append(HostPattern(host))
                except ValueError as exc:
                    self.err(f"{where}.hosts[{j}]", str(exc))
            if not hosts:
                self.err(f"{where}.hosts", "an MCP server needs at least one host")
            mpath = entry.get("path", "")
            if not isinstance(mpath, str) or (mpath and not mpath.startswith("/")):
                self.err(f"{where}.path", "path must be a path prefix starting with '/'")
                mpath = ""
            modes: dict[str, McpMode] = {}
            for key in ("poisoning", "pins"):
                value = entry.get(key, "enforce")
                try:
                    modes[key] = McpMode(value)
                except ValueError:
                    self.err(f"{where}.{key}", f"{key} must be one of enforce, report, off")
                    modes[key] = McpMode.ENFORCE
            rules = (self._mcp_authorization(entry["mcpAuthorization"], f"{where}.mcpAuthorization",
                                             name) if "mcpAuthorization" in entry else [])
            self.mcp_servers.append(McpServer(
                name=name, hosts=tuple(hosts), path=mpath, poisoning=modes["poisoning"],
                pins=modes["pins"], rules=tuple(rules), source=self.src(where)))

    def _revoked(self, section: Any) -> None:
        if section is None:
            return
        if not isinstance(section, dict):
            self.err("revoked", "revoked must be a mapping with 'agents', 'tokens', 'roles' "
                     "and/or 'sessions'")
            return
        self._check_keys(section, "revoked", {"agents", "tokens", "roles", "sessions"})
        self.revoked_agents.update(self._str_list(section.get("agents"), "revoked.agents"))
        self.revoked_tokens.update(self._str_list(section.get("tokens"), "revoked.tokens"))
        self.revoked_roles.update(self._str_list(section.get("roles"), "revoked.roles"))
        self.revoked_sessions.update(self._str_list(section.get("sessions"), "revoked.sessions"))

    def _killswitch(self, section: Any) -> None:
        if not isinstance(section, dict):
            self.err("killswitch", "killswitch must be a mapping with 'stop', 'pause', "
                     "'throttle', 'triggers' and/or 'files'")
            return
        self._check_keys(section, "killswitch", KILLSWITCH_KEYS)
        self.kill_actions.extend(parse_kill_actions(section, "killswitch",
                                                    self.src("killswitch"), self.err))
        if "triggers" in section:
            self._add_triggers(parse_triggers(section["triggers"], "killswitch.triggers",
                                              self.err), "killswitch.triggers")
        for i, name in enumerate(self._str_list(section.get("files"), "killswitch.files")):
            self._killswitch_file(name, f"killswitch.files[{i}]")

    def _killswitch_file(self, name: str, path: str) -> None:
        """A KILLSWITCH.md document: its triggers join the rules' triggers, its FORBIDDEN
        lines become deny rules for its agent."""
        file = Path(self._file).parent / name
        try:
            text = file.read_text(encoding="utf-8")
            self.documents.append((name, text))
            doc = parse_killswitch_md(text, str(file))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            self.err(path, f"cannot use {name}: {exc}")
            return
        self._add_triggers(doc.triggers, path)
        if not doc.forbidden:
            return
        if not doc.agent:
            self.err(path, f"{name} has FORBIDDEN entries but names no agent")
            return
        who = f'(jwt.sub == {json.dumps(doc.agent)} || jwt.agent_role == {json.dumps(doc.agent)})'
        for j, item in enumerate(doc.forbidden):
            entry = {"deny": f"{who} && ({item.cel()})", "id": f"killswitch.{doc.agent}.forbidden[{j}]",
                     "reason": f"forbidden by {name}:{item.line}"}
            if item.kind == "tool":
                rule = self._register(entry["id"], path,
                                      lambda rid, e=entry: compile_mcp_entry(e, rid))
                if rule is not None:
                    self.mcp_rules.append(rule)
            else:
                rule = self._rule(entry, path, entry["id"])
                if rule is not None:
                    self.rules.append(rule)

    def _add_triggers(self, triggers: list[TriggerSpec], path: str) -> None:
        for t in triggers:
            where = self.trigger_ids.get(t.id)
            if where is not None:
                self.err(path, f"trigger id {t.id!r} is already used at {where}")
                continue
            self.trigger_ids[t.id] = self.src(path)
            self.kill_triggers.append(t)

    def _delegation(self, section: Any) -> None:
        if self.delegation is not None:
            self.err("delegation", "delegation is declared in more than one rules file")
            return
        self.delegation = parse_delegation(section, "delegation", self.err)

    def _destinations(self, section: Any) -> None:
        if section is None:
            return
        if not isinstance(section, dict):
            self.err("destinations", "destinations must be a mapping")
            return
        self._check_keys(section, "destinations", {"allowPrivate"})
        for i, cidr in enumerate(self._str_list(section.get("allowPrivate"),
                                                "destinations.allowPrivate")):
            try:
                self.allow_private.extend(parse_networks([cidr]))
            except ValueError as exc:
                self.err(f"destinations.allowPrivate[{i}]", str(exc))

    def _llm(self, section: Any) -> None:
        if section is None:
            return
        if not isinstance(section, dict):
            self.err("llm", "llm must be a mapping with 'providers' and/or 'pricing'")
            return
        self._check_keys(section, "llm", {"providers", "pricing"})
        names = {p.name for p in self.providers}
        for i, entry in enumerate(self._list(section.get("providers"), "llm.providers")):
            where = f"llm.providers[{i}]"
            if not isinstance(entry, dict):
                self.err(where, "a provider is a mapping {name, api, hosts, pathPrefix}")
                continue
            self._check_keys(entry, where, {"name", "api", "hosts", "pathPrefix"})
            try:
                provider = provider_from_dict(entry)
            except ValueError as exc:
                self.err(where, str(exc))
                continue
            if provider.name in names:
                self.err(f"{where}.name", f"duplicate provider name {provider.name!r}")
                continue
            names.add(provider.name)
            self.providers.append(provider)
        pricing = section.get("pricing")
        if pricing is None:
            return
        if not isinstance(pricing, dict):
            self.err("llm.pricing", "pricing must be a mapping with 'models' and 'aliases'")
            return
        self._check_keys(pricing, "llm.pricing", {"models", "overrides", "aliases"})
        for key, table in (("models", self.prices), ("overrides", self.overrides)):
            models = pricing.get(key) or {}
            if not isinstance(models, dict):
                self.err(f"llm.pricing.{key}", f"{key} must map model name -> {{input, output, ...}}")
                continue
            for model, entry in models.items():
                where = f"llm.pricing.{key}.{model}"
                name = str(model).lower()
                try:
                    price = price_from_dict(str(model), entry)
                except ValueError as exc:
                    self.err(where, str(exc))
                    continue
                if name in table:
                    self.err(where, f"{model!r} is priced twice in llm.pricing.{key} (first at "
                             f"{table[name][1]}); re-price a model with llm.pricing.overrides")
                    continue
                table[name] = (price, self.src(where))
        aliases = pricing.get("aliases") or {}
        if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
            self.err("llm.pricing.aliases", "aliases must map a model name to a priced model name")
            return
        self.aliases.update({str(k).lower(): v.lower() for k, v in aliases.items()})

    def _pricing(self) -> PricingTable:
        prices = {k: v[0] for k, v in self.prices.items()}
        prices.update({k: v[0] for k, v in self.overrides.items()})  # overrides always win
        return PricingTable(prices, self.aliases)

    def _check_aliases(self) -> None:
        table = self._pricing()
        for alias in self.aliases:
            if table.resolve(alias) is None:
                self.problem(self._file, None, f"llm.pricing.aliases.{alias}",
                             f"alias {alias!r} does not lead to a priced model "
                             f"(-> {self.aliases[alias]!r}; unknown or a cycle)")

    def _cel_inputs(self) -> frozenset[str]:
        sources = [r.expr.source for r in self.rules]
        for a in self.agents:
            sources.append(a.match.source)
            sources.extend(r.expr.source for r in a.rules)
        text = "\n".join(sources)
        # A name that appears anywhere (even in a string) keeps its input: over-including
        # only costs time, leaving out something a rule reads would make it error (deny).
        return frozenset(k for k in ("query", "headers", "llm") if k in text)

    def build(self, revision: str, files: tuple[str, ...]) -> Policy:
        return Policy(
            revision=revision,
            files=files,
            rules=tuple(self.rules),
            agents=tuple(self.agents),
            revoked=Revocations(frozenset(self.revoked_agents), frozenset(self.revoked_tokens),
                                frozenset(self.revoked_roles), frozenset(self.revoked_sessions)),
            allow_private=tuple(self.allow_private),
            cel_inputs=self._cel_inputs(),
            providers=ProviderTable(self.providers),
            pricing=self._pricing(),
            limits=tuple(self.limits),
            budgets=tuple(self.budgets),
            credentials=tuple(self.credentials),
            kill_actions=tuple(self.kill_actions),
            kill_triggers=tuple(self.kill_triggers),
            delegation=self.delegation or DelegationPolicy(),
            mcp=McpSettings(servers=tuple(self.mcp_servers), rules=tuple(self.mcp_rules),
                            reveal_denied=bool(self.mcp_reveal),
                            detect=True if self.mcp_detect is None else self.mcp_detect),
        )



def iter_problems(exc: PolicyError) -> Iterator[str]:
    """One human line per problem: what ``fleetgate rules check``, the reload log and
    ``/healthz/ready`` all show."""
    for p in exc.problems:
        yield str(p)
