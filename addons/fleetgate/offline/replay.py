"""Replay: recorded requests judged again under a new policy, and what changes.

The command line (:mod:`fleetgate.cli_replay`) reads mitmproxy flow files into
:class:`Recorded` requests; this module judges each under the NEW policy and under the OLD
one (or takes the decision recorded with the flow when there is no OLD), and returns the
:class:`Change` s: flows whose decision (allow or deny, and the rule that decided) differs.

Flows are judged in the order they were recorded, on a clock that follows their timestamps,
by one :class:`~fleetgate.offline.evaluate.Evaluator` per policy: rate limits and budgets
count across the recording as one gateway would have counted them. A flow without a verified
identity is reported as such, never judged as somebody.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fleetgate.llm.usage import Usage
from fleetgate.offline.evaluate import Evaluator, OfflineRequest, Verdict
from fleetgate.policy.model import Policy

__all__ = ["Change", "Recorded", "ReplayReport", "replay"]


@dataclass(frozen=True)
class Recorded:
    """One recorded request: who sent it (``claims``; ``None``: no identity could be
    established), what it was, when, and what the gateway decided then (``decision``: the
    flow's ``fleetgate.decision``, when recorded through the gateway)."""

    id: str
    request: OfflineRequest
    claims: Mapping[str, Any] | None
    timestamp: float = 0.0
    decision: Mapping[str, Any] | None = None
    usage: Usage | None = None
    mcp_answer: Any = None
    identity_note: str = ""  # how the identity was found (metadata, token) or why not
    # the MCP messages the gateway judged in it (``fleetgate.mcp`` calls: method, target,
    # allow, rule), when it was an MCP request
    mcp_calls: tuple[Mapping[str, Any], ...] = ()

    def recorded_rule(self) -> str:
        """The rule that decided, named as :attr:`Verdict.rule` names it: for an allowed MCP
        request the MCP rule of its first message (the gateway's ``decision.rule`` is the
        HTTP rule that let it reach MCP governance), else the decision's rule."""
        d = self.decision or {}
        if d.get("allow") and self.mcp_calls and self.mcp_calls[0].get("rule"):
            return str(self.mcp_calls[0]["rule"])
        return str(d.get("rule") or "")


@dataclass(frozen=True)
class Change:
    flow: Recorded
    old_allow: bool
    old_rule: str
    new: Verdict

    def as_dict(self) -> dict[str, Any]:
        claims = self.flow.claims or {}
        return {"flow": self.flow.id, "method": self.flow.request.method,
                "url": self.flow.request.url,
                "agent": claims.get("agent_id") or claims.get("sub"),
                "old": {"allow": self.old_allow, "rule": self.old_rule},
                "new": {"allow": self.new.allow, "rule": self.new.rule,
                        "status": self.new.status, "reason": self.new.reason}}

    def line(self) -> str:
        def word(allow: bool) -> str:
            return "allow" if allow else "deny"
        return (f"{self.flow.request.method} {self.flow.request.url}: "
                f"{word(self.old_allow)} ({self.old_rule}) -> {word(self.new.allow)} "
                f"({self.new.rule})")


@dataclass(frozen=True)
class ReplayReport:
    judged: int
    changes: tuple[Change, ...]
    no_identity: tuple[Recorded, ...]
    no_baseline: tuple[Recorded, ...]  # no OLD policy and no decision recorded with the flow


def _judge(ev: Evaluator, r: Recorded) -> Verdict:
    if r.timestamp > ev.now:
        ev.now = r.timestamp
    return ev.evaluate(r.claims, r.request, usage=r.usage, mcp_answer=r.mcp_answer)


def replay(flows: Iterable[Recorded], new: Policy, old: Policy | None = None) -> ReplayReport:
    """Judge ``flows`` under ``new`` and under ``old`` (or their recorded decision)."""
    ordered = sorted(flows, key=lambda r: r.timestamp)
    start = ordered[0].timestamp if ordered else 0.0
    ev_new = Evaluator(new, start=start)
    ev_old = Evaluator(old, start=start) if old is not None else None
    changes: list[Change] = []
    no_identity: list[Recorded] = []
    no_baseline: list[Recorded] = []
    judged = 0
    for r in ordered:
        if r.claims is None:
            no_identity.append(r)
            continue
        verdict = _judge(ev_new, r)
        judged += 1
        if ev_old is not None:
            before = _judge(ev_old, r)
            old_allow, old_rule = before.allow, before.rule
            same = (old_allow, old_rule) == (verdict.allow, verdict.rule)
        elif r.decision and "allow" in r.decision:
            old_allow, old_rule = bool(r.decision["allow"]), r.recorded_rule()
            # an allowed MCP request recorded without its messages' rules has only the HTTP
            # rule: either names the same decision
            same = old_allow == verdict.allow and old_rule in (verdict.rule, verdict.http_rule)
        else:
            no_baseline.append(r)
            continue
        if not same:
            changes.append(Change(r, old_allow, old_rule, verdict))
    return ReplayReport(judged, tuple(changes), tuple(no_identity), tuple(no_baseline))
