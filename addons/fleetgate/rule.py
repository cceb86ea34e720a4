"""A compiled rule: what one ``allow``/``deny``/``require`` entry becomes.

Shared by the HTTP rules (:mod:`fleetgate.policy.decide`) and the MCP rules
(:mod:`fleetgate.mcp.policy`), so it sits below both: a domain package may judge rules
without importing the policy package that loads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from fleetgate.celexpr import Expr
from fleetgate.netaddr import HostPattern

__all__ = ["Effect", "Rule"]


class Effect(StrEnum):
    """What a matching rule does.

    ``deny``: a match denies. ``require``: a non-match denies. ``allow``: a match is
    needed from at least one allow rule, otherwise the request is denied by default.
    """

    ALLOW = "allow"
    DENY = "deny"
    REQUIRE = "require"


@dataclass(frozen=True)
class Rule:
    """One ``authorization.rules`` entry."""

    id: str
    effect: Effect
    expr: Expr
    reason: str | None = None
    source: str = ""  # "file:line", for operators
    hosts: tuple[HostPattern, ...] = ()  # empty: applies to every destination
    # MCP rules: the same expression reading the list entry's name from a plain variable
    # (see fleetgate.mcp.policy.list_variant); None when it cannot be rewritten safely.
    list_expr: Expr | None = None

    def applies_to(self, host: str, port: int) -> bool:
        return not self.hosts or any(h.matches(host, port) for h in self.hosts)
