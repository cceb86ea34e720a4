"""What a report-mode element would have denied: logged, counted, shown; never enforced.

Every addon that judges with report-mode elements (the rules, MCP rules, rate limits,
budgets, the kill-switch triggers) hands what they would have denied to :func:`note_would_deny`:
the flow's decision record gets ``would_deny: [{rule, reason, status}]`` (under its own
metadata key, so a later denial that replaces the decision keeps it),
``fleetgate_would_deny_total{rule}`` counts it, and the flow's comment in mitmweb says
``report: would deny by <rule>: <reason>``. smokescreen's "enforce would deny".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mitmproxy import http

from fleetgate.addons.state import add_comment
from fleetgate.metrics import GatewayMetrics
from fleetgate.rule import WouldDeny

__all__ = ["CANARY", "WOULD_DENY", "canary_of", "note_would_deny", "would_deny_of"]

WOULD_DENY = "fleetgate.would_deny"
CANARY = "fleetgate.canary"


def note_would_deny(flow: http.HTTPFlow, metrics: GatewayMetrics,
                    items: Iterable[WouldDeny]) -> None:
    """Record, count and show each would-be denial once (a hook that runs twice, or two
    addons reporting the same rule for one flow, count it once)."""
    seen = flow.metadata.setdefault(WOULD_DENY, [])
    for w in items:
        entry = w.as_dict()
        if entry in seen:
            continue
        seen.append(entry)
        metrics.would_deny.labels(rule=w.rule).inc()
        add_comment(flow, f"report: would deny by {w.rule}: {w.reason}")


def would_deny_of(flow: http.HTTPFlow) -> list[dict[str, Any]] | None:
    """The would-be denials recorded on the flow, ``None`` when there were none."""
    value = flow.metadata.get(WOULD_DENY)
    return value if isinstance(value, list) and value else None


def canary_of(flow: http.HTTPFlow) -> dict[str, Any] | None:
    """The canary policy's verdict, recorded only where it differs from the enforced one."""
    value = flow.metadata.get(CANARY)
    return value if isinstance(value, dict) else None
