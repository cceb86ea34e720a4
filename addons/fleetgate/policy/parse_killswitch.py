"""The rules' ``killswitch:`` and ``delegation:`` sections, and what a KILLSWITCH.md adds.

``killswitch:`` makes stops, pauses and throttles durable in the rules YAML (they survive
redeploys because the YAML is their home) and declares automatic triggers::

    killswitch:
      stop:
      - agent: rogue-agent            # one of agent, token, session, role, user, all
        reason: leaked a credential
      - session: s-42
        cascade: true                 # and every sub-agent session below it
      pause:
      - role: cloud
      throttle:
      - agent: noisy-agent
        requests: 10
        per: 1m
      triggers: [...]                 # see fleetgate.policy.parse_triggers
      files:                          # KILLSWITCH.md documents, one agent each
      - KILLSWITCH.general.md       # next to the rules files (a ConfigMap is flat)

The loader reads each named file and hands its text to :func:`parse_killswitch_file`:
its triggers join the rules' triggers, its FORBIDDEN lines become deny rules for its agent.

``delegation:`` says which roles may spawn which, and how big a family may grow.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import partial
from typing import Any

from fleetgate.durations import seconds
from fleetgate.kill.delegation import DelegationPolicy
from fleetgate.kill.model import Action, Scope, ScopeKind, Throttle, Verb
from fleetgate.kill.triggers import TriggerSpec
from fleetgate.mcp.policy import compile_mcp_entry
from fleetgate.policy.killswitch_md import parse_killswitch_md
from fleetgate.policy.parse_mcp import compile_registered
from fleetgate.policy.parse_rules import parse_rule
from fleetgate.policy.parse_triggers import parse_triggers
from fleetgate.policy.report import Ids, Reporter, check_keys, str_list
from fleetgate.policy.schema import keys
from fleetgate.rule import Rule

__all__ = ["KillswitchFile", "KillswitchSection", "parse_delegation", "parse_kill_actions",
           "parse_killswitch", "parse_killswitch_file"]

_SCOPE_KEYS = {"agent": ScopeKind.AGENT, "token": ScopeKind.TOKEN, "session": ScopeKind.SESSION,
               "role": ScopeKind.ROLE, "user": ScopeKind.USER, "all": ScopeKind.GLOBAL}
_KILLSWITCH_KEYS = keys("Killswitch")


def _duration(value: Any) -> float:
    """A period or TTL: seconds (a number) or a duration such as ``1m``; never negative."""
    s = seconds(value)
    if s < 0:
        raise ValueError(f"negative duration {value!r}")
    return s


@dataclass(frozen=True)
class KillswitchSection:
    """One document's ``killswitch`` section; ``files``: (name, key path) of KILLSWITCH.md
    documents for the loader to read."""

    actions: tuple[Action, ...] = ()
    triggers: tuple[TriggerSpec, ...] = ()
    files: tuple[tuple[str, str], ...] = ()


def parse_killswitch(node: Any, where: str, report: Reporter) -> KillswitchSection | None:
    if not isinstance(node, dict):
        report.error(where, "killswitch must be a mapping with 'stop', 'pause', 'throttle', "
                     "'triggers' and/or 'files'")
        return None
    check_keys(node, where, _KILLSWITCH_KEYS, report)
    actions = parse_kill_actions(node, where, report)
    triggers = (parse_triggers(node["triggers"], f"{where}.triggers", report)
                if "triggers" in node else [])
    files = [(name, f"{where}.files[{i}]")
             for i, name in enumerate(str_list(node.get("files"), f"{where}.files", report))]
    return KillswitchSection(tuple(actions), tuple(triggers), tuple(files))


def parse_kill_actions(node: dict[str, Any], where: str, report: Reporter) -> list[Action]:
    """The ``stop``/``pause``/``throttle`` lists of a ``killswitch:`` section."""
    out: list[Action] = []
    source = report.source(where)
    for verb in (Verb.STOP, Verb.PAUSE, Verb.THROTTLE):
        entries = node.get(verb.value)
        if entries is None:
            continue
        if not isinstance(entries, list):
            report.error(f"{where}.{verb.value}", "must be a list of scopes (agent, token, "
                         "session, role, user or all)")
            continue
        for i, entry in enumerate(entries):
            action = _action(verb, entry, f"{where}.{verb.value}[{i}]", source, report)
            if action is not None:
                out.append(action)
    return out


def _action(verb: Verb, node: Any, where: str, source: str, report: Reporter) -> Action | None:
    if not isinstance(node, dict):
        report.error(where, "an entry is a mapping such as {agent: rogue-agent, reason: ...}")
        return None
    check_keys(node, where, keys("ThrottleAction" if verb is Verb.THROTTLE else "KillAction"),
               report)
    scopes = [k for k in node if k in _SCOPE_KEYS]
    if len(scopes) != 1:
        report.error(where, "name exactly one scope: agent, token, session, role, user or all")
        return None
    kind = _SCOPE_KEYS[scopes[0]]
    value = node[scopes[0]]
    if kind is ScopeKind.GLOBAL:
        if value is not True:
            report.error(f"{where}.all", "write 'all: true' to act on every agent")
            return None
        value = None
    elif not isinstance(value, str | int) or isinstance(value, bool) or not str(value).strip():
        report.error(f"{where}.{scopes[0]}", "must be a non-empty string")
        return None
    cascade = node.get("cascade", False)
    if not isinstance(cascade, bool):
        report.error(f"{where}.cascade", "cascade is true or false")
        return None
    throttle = None
    if verb is Verb.THROTTLE:
        try:
            throttle = Throttle(int(node.get("requests", 0)), _duration(node.get("per", "")))
        except (TypeError, ValueError):
            report.error(where, "a throttle needs 'requests' (a positive count) and 'per' (a "
                         "duration such as 10s or 1m)")
            return None
    scope = Scope(kind, None if value is None else str(value).strip(), cascade)
    reason = str(node.get("reason") or f"{verb.value} declared in the rules")
    ident = hashlib.sha256(f"{verb.value}|{scope.label}".encode()).hexdigest()[:12]
    return Action(verb=verb, scope=scope, reason=reason, by=source, source="rules", at=0.0,
                  throttle=throttle, id=f"rules-{ident}")


@dataclass(frozen=True)
class KillswitchFile:
    """What one KILLSWITCH.md adds: triggers, and deny rules for HTTP and MCP traffic."""

    triggers: tuple[TriggerSpec, ...] = ()
    rules: tuple[Rule, ...] = ()
    mcp_rules: tuple[Rule, ...] = ()


def parse_killswitch_file(node: str, where: str, report: Reporter, *, name: str, path: str,
                          ids: Ids) -> KillswitchFile | None:
    """The text of the KILLSWITCH.md named ``name`` at ``where`` (``path``: where it was read
    from). Its FORBIDDEN lines become deny rules for its agent (by agent id or role)."""
    try:
        doc = parse_killswitch_md(node, path)
    except ValueError as exc:
        report.error(where, f"cannot use {name}: {exc}")
        return None
    for note in doc.notes:  # what the file asks that the gateway does not enforce
        report.warn(where, note)
    if not doc.forbidden:
        return KillswitchFile(triggers=tuple(doc.triggers))
    if not doc.agent:
        report.error(where, f"{name} has FORBIDDEN entries but names no agent")
        return KillswitchFile(triggers=tuple(doc.triggers))
    who = f'(jwt.sub == {json.dumps(doc.agent)} || jwt.agent_role == {json.dumps(doc.agent)})'
    rules: list[Rule] = []
    mcp_rules: list[Rule] = []
    for j, item in enumerate(doc.forbidden):
        entry = {"deny": f"{who} && ({item.cel()})", "id": f"killswitch.{doc.agent}.forbidden[{j}]",
                 "reason": f"forbidden by {name}:{item.line}"}
        if item.kind == "tool":
            rule = compile_registered(entry["id"], where, report, ids,
                                      partial(compile_mcp_entry, entry))
            if rule is not None:
                mcp_rules.append(rule)
        else:
            rule = parse_rule(entry, where, report, default_id=entry["id"], ids=ids)
            if rule is not None:
                rules.append(rule)
    return KillswitchFile(tuple(doc.triggers), tuple(rules), tuple(mcp_rules))


def parse_delegation(node: Any, where: str, report: Reporter) -> DelegationPolicy | None:
    """``delegation: {roles: {parent: [child, ...]}, maxDepth, maxChildren, maxTtl}``."""
    if not isinstance(node, dict):
        report.error(where, "delegation must be a mapping with 'roles' and optional 'maxDepth', "
                     "'maxChildren', 'maxTtl'")
        return None
    check_keys(node, where, keys("Delegation"), report)
    roles: dict[str, frozenset[str]] = {}
    raw = node.get("roles", {})
    if not isinstance(raw, dict):
        report.error(f"{where}.roles", "roles maps a parent role to the list of roles it may spawn")
        raw = {}
    for parent, children in raw.items():
        if not isinstance(children, list) or not all(isinstance(c, str) and c for c in children):
            report.error(f"{where}.roles.{parent}", "must be a list of role names")
            continue
        roles[str(parent)] = frozenset(children)
    policy = DelegationPolicy(roles=roles)
    ints = {}
    for key, default in (("maxDepth", policy.max_depth), ("maxChildren", policy.max_children)):
        v = node.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            report.error(f"{where}.{key}", f"{key} must be an integer >= 1")
            v = default
        ints[key] = v
    try:
        max_ttl = _duration(node.get("maxTtl", policy.max_ttl))
    except ValueError:
        report.error(f"{where}.maxTtl", "maxTtl must be a duration such as 15m or 1h")
        max_ttl = policy.max_ttl
    return DelegationPolicy(roles=roles, max_depth=ints["maxDepth"],
                            max_children=ints["maxChildren"], max_ttl=max_ttl)
