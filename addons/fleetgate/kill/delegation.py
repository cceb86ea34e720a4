"""Delegation: a parent's token buys a child token whose scope can only narrow.

The gateway, not the agent, mints the child token and records the parent-to-child edge at the
same moment, so the session graph that kill cascades walk is one no agent can forge. The
child's authority is the parent's, narrowed:

* its role must be one the rules allow the parent's role to spawn (``delegation.roles``);
* it expires no later than the parent (and within ``delegation.maxTtl``);
* it carries the parent's user claim, issuer and audience and nothing else of the parent's
  claims (no custom claim a profile might match on is inherited);
* the family is bounded: ``maxDepth`` levels below a root, ``maxChildren`` children per
  session.

Everything here is pure; the addon signs the claims with the gateway's key.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fleetgate.errors import FleetgateError
from fleetgate.kill.graph import SessionGraph

__all__ = ["DelegationError", "DelegationPolicy", "child_claims"]

_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class DelegationError(FleetgateError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class DelegationPolicy:
    """The rules' ``delegation:`` section."""

    roles: Mapping[str, frozenset[str]] = field(default_factory=dict)
    max_depth: int = 3
    max_children: int = 10
    max_ttl: float = 3600.0


def child_claims(parent: Mapping[str, Any], request: Mapping[str, Any],
                 policy: DelegationPolicy, graph: SessionGraph, now: float) -> dict[str, Any]:
    """The claims of the child token ``request`` asks for, or :class:`DelegationError`.

    ``request`` is the agent's JSON: ``role`` (required), ``name`` (optional, appended to the
    parent's agent id) and ``ttl`` (optional seconds).
    """
    p_agent = str(parent.get("agent_id") or parent.get("sub") or "")
    p_role = parent.get("agent_role")
    p_session = parent.get("session_id", parent.get("sid"))
    if not p_session:
        raise DelegationError(400, "delegation.no_session",
                              "your token has no session_id claim, so a child cannot be linked "
                              "to it; mint parent tokens with a session")
    role = request.get("role")
    if not isinstance(role, str) or not role:
        raise DelegationError(400, "delegation.bad_request", "give the child's 'role'")
    allowed = policy.roles.get(str(p_role), frozenset())
    if role not in allowed:
        raise DelegationError(
            403, "delegation.role",
            f"role {p_role!r} may not delegate to role {role!r} (allowed: "
            f"{', '.join(sorted(allowed)) or 'none'}); see the rules' delegation.roles")
    node = graph.get(str(p_session))
    depth = (node.depth if node else int(parent.get("delegation_depth") or 0)) + 1
    if depth > policy.max_depth:
        raise DelegationError(403, "delegation.depth",
                              f"a child here would be {depth} levels deep; delegation.maxDepth "
                              f"is {policy.max_depth}")
    if graph.fanout(str(p_session)) >= policy.max_children:
        raise DelegationError(403, "delegation.fanout",
                              f"session {p_session!r} already has {policy.max_children} children "
                              f"(delegation.maxChildren)")
    name = request.get("name")
    if name is not None and (not isinstance(name, str) or not name or len(name) > 64
                             or not set(name) <= _NAME_OK):
        raise DelegationError(400, "delegation.bad_request",
                              "'name' must be 1-64 letters, digits, '-', '_' or '.'")
    ttl = request.get("ttl", policy.max_ttl)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0:
        raise DelegationError(400, "delegation.bad_request", "'ttl' must be seconds > 0")
    p_exp = float(parent["exp"])
    exp = min(p_exp, now + min(float(ttl), policy.max_ttl))
    if exp <= now:
        raise DelegationError(403, "delegation.expired", "your token has expired")
    suffix = name or f"{role}-{uuid.uuid4().hex[:6]}"
    claims: dict[str, Any] = {
        "sub": f"{p_agent}/{suffix}",
        "agent_role": role,
        "session_id": f"s-{uuid.uuid4().hex}",
        "parent_session": str(p_session),
        # the family's first session: traces of a whole family share one trace id
        "root_session": str(parent.get("root_session") or p_session),
        "delegation_depth": depth,
        "jti": uuid.uuid4().hex,
        "iat": int(now),
        "exp": int(exp),
        "delegated_by": p_agent,
    }
    for inherited in ("user", "iss", "aud"):
        if inherited in parent:
            claims[inherited] = parent[inherited]
    return claims
