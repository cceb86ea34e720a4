"""Approval tiers and the life of one held action. Pure: values in, values out.

A tier (``approvals[]`` in the rules) says which actions need people (a CEL ``when``), how
many distinct people (``approvers``: 0 means "no approval, immediate", as seed 004's
read-only tier), who may approve, the window within which someone should answer, and how
long the agent's request is held open waiting.

An :class:`Approval` moves one way::

    pending --approve (enough distinct people)--> approved --the agent's retry--> consumed
       |  \\--deny--> denied (final)                  \\--deny--> denied
       \\--window passes--> pending, escalated (notified again; escalateTo may approve too)

Nothing ever moves an action to "approved" but people, and nothing forwards it but one
retry of the same action, once (``consume``). A window that passes never drops the action and
never executes it: it escalates.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from fleetgate.approvals.operators import Operator
from fleetgate.celexpr import Activation, Expr
from fleetgate.errors import FleetgateError

__all__ = ["Approval", "ApprovalConflict", "NotAllowed", "Status", "Tier", "Vote", "select_tier"]


# the shared admin token's operator (and ``local``): may decide any tier, as one person
# (break-glass; two-person tiers still need a second, different operator)
ADMIN_GROUP = "admin"


class ApprovalConflict(FleetgateError, ValueError):
    """The approval is not in a state that allows this (already decided, same person twice).
    A ``ValueError``: the admin API answers 400 with this message."""


class NotAllowed(ApprovalConflict):
    """This operator may not decide this approval (not among the tier's approvers)."""


class Status(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    CONSUMED = "consumed"


@dataclass(frozen=True)
class Tier:
    """An ``approvals[]`` entry of the rules."""

    id: str
    when: Expr
    approvers: int = 1  # 0: immediate (no approval); 2: two distinct people
    approved_by: tuple[str, ...] = ()  # names or group:NAME; () any operator
    secondary: tuple[str, ...] = ()  # who may give the second of two approvals; () approved_by
    escalate_to: tuple[str, ...] = ()  # after the window: notified, and may approve too
    window: float = 86400.0
    hold: float = 30.0  # how long the agent's request waits open for a decision
    reason: str = ""
    source: str = ""


def select_tier(tiers: tuple[Tier, ...], activation: Activation,
                mcp_messages: list[dict[str, Any]]) -> tuple[Tier | None, dict[str, Any]]:
    """The tier that decides a request, and the MCP message it decided for.

    Each message gets the first tier whose ``when`` holds for it (file order). A request of
    several messages (an MCP batch) is decided by its strictest message: the one whose tier
    needs the most people, so a call that needs approval cannot ride along with a read-only
    one. ``mcp_messages``: the facts of every message of an MCP request; empty for other
    traffic, whose ``mcp`` in ``activation`` stays as built. A ``when`` that cannot be
    evaluated raises :class:`~fleetgate.celexpr.CelError`: the caller denies (never "no
    tier, forward")."""
    variants: list[dict[str, Any] | None] = list(mcp_messages) or [None]
    chosen: tuple[Tier | None, dict[str, Any]] = (None, {})
    for mcp in variants:
        if mcp is not None:
            activation.set("mcp", mcp)
        tier = next((t for t in tiers if t.when.evaluate(activation)), None)
        if tier is not None and (chosen[0] is None or tier.approvers > chosen[0].approvers):
            chosen = (tier, mcp or {})
    return chosen


@dataclass(frozen=True)
class Vote:
    by: str
    at: float
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"by": self.by, "at": self.at, "note": self.note}


@dataclass(frozen=True)
class Approval:
    """One action waiting for (or given) human approval. JSON round-trips (stores)."""

    id: str
    tier: str
    digest: str
    created: float
    deadline: float  # end of the current window; moved on at each escalation
    window: float
    needed: int
    agent: str
    action: dict[str, Any]  # what a human reads: method, url, tool, arguments, model, excerpt
    identity: dict[str, Any] = field(default_factory=dict)  # role, session, user, root_session
    approved_by: tuple[str, ...] = ()
    secondary: tuple[str, ...] = ()
    escalate_to: tuple[str, ...] = ()
    reason: str = ""  # the tier's reason: why people must look at this
    status: Status = Status.PENDING
    votes: tuple[Vote, ...] = ()
    denied_by: str | None = None
    denial_reason: str = ""
    decided_at: float | None = None
    consumed_at: float | None = None
    consumed_by_decision: str = ""  # decision id of the forwarded retry
    escalations: int = 0
    decision_id: str = ""  # decision id of the request that asked first
    outcome: dict[str, Any] | None = None  # what happened to the forwarded action

    # -- transitions ------------------------------------------------------------------

    def may_decide(self, op: Operator) -> bool:
        """Whether ``op`` may approve or deny now: one of ``approved_by`` (anyone when the
        tier names no one), the group ``admin`` (the shared admin token), or, once the window
        has passed, one of ``escalate_to``. A second
        approval must also come from ``secondary`` when the tier names it (:meth:`approve`)."""
        if not self.approved_by or op.is_in(self.approved_by) or ADMIN_GROUP in op.groups:
            return True
        return self.escalations > 0 and op.is_in(self.escalate_to)

    def approve(self, op: Operator, now: float, note: str = "") -> Approval:
        if self.status is not Status.PENDING:
            raise ApprovalConflict(f"approval {self.id} is {self.status.value}"
                                   + self._decided_text() + "; nothing to approve")
        if any(v.by == op.name for v in self.votes):
            raise ApprovalConflict(f"{op.name} already approved {self.id}; the tier "
                                   f"{self.tier!r} needs {self.needed} distinct people")
        second = len(self.votes) >= 1
        if second and self.secondary:
            ok = (op.is_in(self.secondary) or ADMIN_GROUP in op.groups
                  or (self.escalations > 0 and op.is_in(self.escalate_to)))
            if not ok:
                raise NotAllowed(f"{op.name} may not give the secondary review of {self.id} "
                                 f"(tier {self.tier!r}: {', '.join(self.secondary)})")
        elif not self.may_decide(op):
            raise NotAllowed(f"{op.name} may not approve {self.id} (tier {self.tier!r}: "
                             f"{', '.join(self.approved_by + self.escalate_to) or 'anyone'})")
        votes = (*self.votes, Vote(op.name, now, note))
        if len(votes) >= self.needed:
            return replace(self, votes=votes, status=Status.APPROVED, decided_at=now)
        return replace(self, votes=votes)

    def deny(self, op: Operator, now: float, reason: str) -> Approval:
        if self.status not in (Status.PENDING, Status.APPROVED):
            raise ApprovalConflict(f"approval {self.id} is {self.status.value}"
                                   + self._decided_text() + "; it cannot be denied now")
        if not self.may_decide(op) and not op.is_in(self.secondary):
            raise NotAllowed(f"{op.name} may not deny {self.id} (tier {self.tier!r})")
        return replace(self, status=Status.DENIED, denied_by=op.name,
                       denial_reason=reason or "no reason given", decided_at=now)

    def consume(self, now: float, decision_id: str) -> Approval:
        if self.status is not Status.APPROVED:
            raise ApprovalConflict(f"approval {self.id} is {self.status.value}, not approved")
        return replace(self, status=Status.CONSUMED, consumed_at=now,
                       consumed_by_decision=decision_id)

    def escalate(self, now: float) -> Approval:
        """The window passed with no decision: notify again, open the window again."""
        if self.status is not Status.PENDING or now < self.deadline:
            raise ApprovalConflict(f"approval {self.id} is not due for escalation")
        return replace(self, escalations=self.escalations + 1, deadline=now + self.window)

    def with_outcome(self, outcome: dict[str, Any]) -> Approval:
        return replace(self, outcome=outcome)

    def _decided_text(self) -> str:
        if self.status is Status.DENIED:
            return f" (denied by {self.denied_by}: {self.denial_reason})"
        if self.votes:
            return f" (approved by {', '.join(v.by for v in self.votes)})"
        return ""

    # -- serialisation ----------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "tier": self.tier, "digest": self.digest, "status": self.status.value,
            "created": self.created, "deadline": self.deadline, "window": self.window,
            "needed": self.needed, "agent": self.agent, "action": self.action,
            "identity": self.identity, "approved_by": list(self.approved_by),
            "secondary": list(self.secondary), "escalate_to": list(self.escalate_to),
            "reason": self.reason, "votes": [v.as_dict() for v in self.votes],
            "denied_by": self.denied_by, "denial_reason": self.denial_reason,
            "decided_at": self.decided_at, "consumed_at": self.consumed_at,
            "consumed_by_decision": self.consumed_by_decision,
            "escalations": self.escalations, "decision_id": self.decision_id,
            "outcome": self.outcome,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Approval:
        return cls(
            id=str(d["id"]), tier=str(d["tier"]), digest=str(d["digest"]),
            created=float(d["created"]), deadline=float(d["deadline"]),
            window=float(d["window"]), needed=int(d["needed"]), agent=str(d["agent"]),
            action=dict(d.get("action") or {}), identity=dict(d.get("identity") or {}),
            approved_by=tuple(d.get("approved_by") or ()),
            secondary=tuple(d.get("secondary") or ()),
            escalate_to=tuple(d.get("escalate_to") or ()), reason=str(d.get("reason") or ""),
            status=Status(d.get("status", "pending")),
            votes=tuple(Vote(str(v["by"]), float(v["at"]), str(v.get("note") or ""))
                        for v in d.get("votes") or ()),
            denied_by=d.get("denied_by"), denial_reason=str(d.get("denial_reason") or ""),
            decided_at=d.get("decided_at"), consumed_at=d.get("consumed_at"),
            consumed_by_decision=str(d.get("consumed_by_decision") or ""),
            escalations=int(d.get("escalations") or 0),
            decision_id=str(d.get("decision_id") or ""), outcome=d.get("outcome"),
        )

    @property
    def open(self) -> bool:
        """Still to be used: pending or approved (a retry matches it)."""
        return self.status in (Status.PENDING, Status.APPROVED)
