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

__all__ = ["Effect", "Mode", "Rule", "WouldDeny", "parse_mode"]


class Effect(StrEnum):
    """What a matching rule does.

    ``deny``: a match denies. ``require``: a non-match denies. ``allow``: a match is
    needed from at least one allow rule, otherwise the request is denied by default.
    """

    ALLOW = "allow"
    DENY = "deny"
    REQUIRE = "require"


class Mode(StrEnum):
    """Whether an element of the policy (rule, profile, limit, budget, MCP server, trigger)
    acts on what it finds (``enforce``, the default) or only says what it would have done
    (``report``: smokescreen's "enforce would deny"), for rolling a new rule out safely."""

    ENFORCE = "enforce"
    REPORT = "report"


def parse_mode(value: object) -> Mode:
    """``mode: enforce | report``; ``ValueError`` naming the choices otherwise."""
    if isinstance(value, str) and value in Mode.__members__.values():
        return Mode(value)
    raise ValueError(f"mode must be 'enforce' or 'report', not {value!r}")


@dataclass(frozen=True)
class WouldDeny:
    """What a report-mode element would have refused: logged and counted, not enforced."""

    rule: str
    reason: str
    status: int = 403

    def as_dict(self) -> dict[str, object]:
        return {"rule": self.rule, "reason": self.reason, "status": self.status}


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
    # report: a denial by this rule is logged (would_deny), never enforced, and an allow by
    # it never grants what the enforcing rules deny (see fleetgate.policy.decide)
    mode: Mode = Mode.ENFORCE

    @property
    def report(self) -> bool:
        return self.mode is Mode.REPORT

    def applies_to(self, host: str, port: int) -> bool:
        return not self.hosts or any(h.matches(host, port) for h in self.hosts)
