"""The rules' ``killswitch:`` and ``delegation:`` sections.

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
      triggers: [...]                 # see fleetgate.kill.triggers
      files:                          # KILLSWITCH.md documents, one agent each
      - KILLSWITCH.general.md       # next to the rules files (a ConfigMap is flat)

``delegation:`` says which roles may spawn which, and how big a family may grow.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from fleetgate.identity.mint import parse_ttl
from fleetgate.kill.delegation import DelegationPolicy
from fleetgate.kill.model import Action, Scope, ScopeKind, Throttle, Verb

__all__ = ["parse_delegation", "parse_kill_actions"]

Err = Callable[[str, str], None]

_SCOPE_KEYS = {"agent": ScopeKind.AGENT, "token": ScopeKind.TOKEN, "session": ScopeKind.SESSION,
               "role": ScopeKind.ROLE, "user": ScopeKind.USER, "all": ScopeKind.GLOBAL}
_ACTION_KEYS = {*_SCOPE_KEYS, "cascade", "reason", "requests", "per"}
KILLSWITCH_KEYS = {"stop", "pause", "throttle", "triggers", "files"}


def _duration(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return float(parse_ttl(str(value)))


def parse_kill_actions(section: dict[str, Any], path: str, source: str, err: Err) -> list[Action]:
    """The ``stop``/``pause``/``throttle`` lists of a ``killswitch:`` section."""
    out: list[Action] = []
    for verb in (Verb.STOP, Verb.PAUSE, Verb.THROTTLE):
        entries = section.get(verb.value)
        if entries is None:
            continue
        if not isinstance(entries, list):
            err(f"{path}.{verb.value}", "must be a list of scopes (agent, token, session, role, "
                "user or all)")
            continue
        for i, entry in enumerate(entries):
            where = f"{path}.{verb.value}[{i}]"
            action = _action(verb, entry, where, source, err)
            if action is not None:
                out.append(action)
    return out


def _action(verb: Verb, entry: Any, where: str, source: str, err: Err) -> Action | None:
    if not isinstance(entry, dict):
        err(where, "an entry is a mapping such as {agent: rogue-agent, reason: ...}")
        return None
    bad = [k for k in entry if k not in _ACTION_KEYS or
           (verb is not Verb.THROTTLE and k in ("requests", "per"))]
    for k in bad:
        err(f"{where}.{k}", f"unknown key {k!r}")
    scopes = [k for k in entry if k in _SCOPE_KEYS]
    if len(scopes) != 1:
        err(where, "name exactly one scope: agent, token, session, role, user or all")
        return None
    kind = _SCOPE_KEYS[scopes[0]]
    value = entry[scopes[0]]
    if kind is ScopeKind.GLOBAL:
        if value is not True:
            err(f"{where}.all", "write 'all: true' to act on every agent")
            return None
        value = None
    elif not isinstance(value, str | int) or isinstance(value, bool) or not str(value).strip():
        err(f"{where}.{scopes[0]}", "must be a non-empty string")
        return None
    cascade = entry.get("cascade", False)
    if not isinstance(cascade, bool):
        err(f"{where}.cascade", "cascade is true or false")
        return None
    throttle = None
    if verb is Verb.THROTTLE:
        try:
            throttle = Throttle(int(entry.get("requests", 0)), _duration(entry.get("per", "")))
        except (TypeError, ValueError):
            err(where, "a throttle needs 'requests' (a positive count) and 'per' (a duration "
                "such as 10s or 1m)")
            return None
    scope = Scope(kind, None if value is None else str(value).strip(), cascade)
    reason = str(entry.get("reason") or f"{verb.value} declared in the rules")
    ident = hashlib.sha256(f"{verb.value}|{scope.label}".encode()).hexdigest()[:12]
    return Action(verb=verb, scope=scope, reason=reason, by=source, source="rules", at=0.0,
                  throttle=throttle, id=f"rules-{ident}")


def parse_delegation(section: Any, path: str, err: Err) -> DelegationPolicy | None:
    """``delegation: {roles: {parent: [child, ...]}, maxDepth, maxChildren, maxTtl}``."""
    if not isinstance(section, dict):
        err(path, "delegation must be a mapping with 'roles' and optional 'maxDepth', "
            "'maxChildren', 'maxTtl'")
        return None
    for k in section:
        if k not in {"roles", "maxDepth", "maxChildren", "maxTtl"}:
            err(f"{path}.{k}", f"unknown key {k!r}; expected roles, maxDepth, maxChildren, maxTtl")
    roles: dict[str, frozenset[str]] = {}
    raw = section.get("roles", {})
    if not isinstance(raw, dict):
        err(f"{path}.roles", "roles maps a parent role to the list of roles it may spawn")
        raw = {}
    for parent, children in raw.items():
        if not isinstance(children, list) or not all(isinstance(c, str) and c for c in children):
            err(f"{path}.roles.{parent}", "must be a list of role names")
            continue
        roles[str(parent)] = frozenset(children)
    policy = DelegationPolicy(roles=roles)
    ints = {}
    for key, default in (("maxDepth", policy.max_depth), ("maxChildren", policy.max_children)):
        v = section.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            err(f"{path}.{key}", f"{key} must be an integer >= 1")
            v = default
        ints[key] = v
    try:
        max_ttl = _duration(section.get("maxTtl", policy.max_ttl))
    except ValueError:
        err(f"{path}.maxTtl", "maxTtl must be a duration such as 15m or 1h")
        max_ttl = policy.max_ttl
    return DelegationPolicy(roles=roles, max_depth=ints["maxDepth"],
                            max_children=ints["maxChildren"], max_ttl=max_ttl)
