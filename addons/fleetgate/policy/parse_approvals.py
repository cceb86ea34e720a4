"""``approvals: [...]``: tiers of human approval (seed 004), first match wins.

Each tier: ``id``, ``when`` (CEL over ``jwt``, ``request``, ``llm``, ``mcp``, ``a2a``),
``approvers`` (0: no approval, immediate; 1; 2: two distinct people), ``approvedBy`` (operator
names or ``group:NAME``; empty: any operator), ``secondary`` (who may give the second of two
approvals), ``escalateTo`` (notified when the window passes, and may approve from then on),
``window`` (how long people have before it escalates, e.g. 24h), ``hold`` (how long the
agent's request is held open waiting, e.g. 30s; 0 answers at once), ``reason``.
"""

from __future__ import annotations

from typing import Any

from fleetgate.approvals.model import Tier
from fleetgate.celexpr import CelError, compile_expr
from fleetgate.durations import seconds
from fleetgate.policy.report import Ids, Reporter, as_list, check_keys, str_list
from fleetgate.policy.schema import keys

__all__ = ["APPROVAL_ROOTS", "MAX_HOLD", "parse_approvals"]

APPROVAL_ROOTS = ("jwt", "request", "llm", "mcp", "a2a")
_KEYS = keys("Approval")
# a held request keeps the agent's connection (and an SDK timeout) open: beyond a few
# minutes the agent should be told "pending" and retry
MAX_HOLD = 600.0


def parse_approvals(node: Any, where: str, report: Reporter, *, ids: Ids) -> list[Tier]:
    out = []
    for i, entry in enumerate(as_list(node, where, report)):
        tier = _tier(entry, f"{where}[{i}]", report, ids)
        if tier is not None:
            out.append(tier)
    return out


def _principals(node: dict[str, Any], key: str, where: str, report: Reporter) -> tuple[str, ...]:
    items = str_list(node.get(key), f"{where}.{key}", report)
    for j, p in enumerate(items):
        if p.startswith("group:") and not p[6:]:
            report.error(f"{where}.{key}[{j}]", "group: needs a group name (group:oncall)")
    return tuple(items)


def _tier(node: Any, where: str, report: Reporter, ids: Ids) -> Tier | None:
    if not isinstance(node, dict):
        report.error(where, "an approval tier is a mapping {id, when, approvers, window, ...}")
        return None
    check_keys(node, where, _KEYS, report)
    tid = node.get("id")
    if not isinstance(tid, str) or not tid:
        report.error(f"{where}.id", "every approval tier needs an id (it is shown to approvers "
                     "and agents)")
        return None
    first = ids.claim(tid, report.source(where))
    if first is not None:
        report.error(f"{where}.id", f"duplicate approval tier id {tid!r} (first at {first})")
        return None
    if not isinstance(node.get("when"), str):
        report.error(f"{where}.when", "when must be a CEL expression (string)")
        return None
    try:
        when = compile_expr(node["when"], APPROVAL_ROOTS)
    except CelError as exc:
        report.error(f"{where}.when", f"CEL: {exc}")
        return None
    approvers = node.get("approvers", 1)
    if isinstance(approvers, bool) or approvers not in (0, 1, 2):
        report.error(f"{where}.approvers", "approvers must be 0 (no approval), 1, or 2 (two "
                     "distinct people: human + secondary review)")
        return None
    durations: dict[str, float] = {}
    for key, default in (("window", 86400.0), ("hold", 30.0)):
        try:
            durations[key] = seconds(node.get(key, default))
        except ValueError as exc:
            report.error(f"{where}.{key}", str(exc))
            return None
    if durations["window"] <= 0:
        report.error(f"{where}.window", "window must be positive (e.g. 24h)")
        return None
    if not 0 <= durations["hold"] <= MAX_HOLD:
        report.error(f"{where}.hold", f"hold must be between 0 and {int(MAX_HOLD)}s: the "
                     "agent's request waits open that long")
        return None
    secondary = _principals(node, "secondary", where, report)
    if secondary and approvers != 2:
        report.error(f"{where}.secondary", "secondary names who gives the second of two "
                     "approvals: set approvers: 2")
    reason = node.get("reason", "")
    if not isinstance(reason, str):
        report.error(f"{where}.reason", "reason must be a string")
        reason = ""
    return Tier(id=tid, when=when, approvers=int(approvers),
                approved_by=_principals(node, "approvedBy", where, report),
                secondary=secondary,
                escalate_to=_principals(node, "escalateTo", where, report),
                window=durations["window"], hold=durations["hold"], reason=reason,
                source=report.source(where))
