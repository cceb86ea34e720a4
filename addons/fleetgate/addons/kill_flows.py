"""The kill switch's facts about a flow, and what it does to one.

Shared by the kill-switch addons (gate, watch, commands) and the control endpoint: who a flow
is (:func:`subject_of`), the inter-agent message depth it carries, what a cut flow had done
(:func:`flow_report`), the 503 of a stopped identity (:func:`refuse_stop`), and
:func:`kill_service`, which builds the :class:`~fleetgate.runtime.kill.KillService` with
mitmproxy's way of cutting flows and closing tunnels.
"""

from __future__ import annotations

import json
import time
from typing import Any

from mitmproxy import http

from fleetgate.addons.flowtools import close_client, cut_flow, deny
from fleetgate.addons.llm_meter import settle_cut
from fleetgate.addons.state import annotate_decision, claims_of, identity_of, llm_usage_of, mcp_of
from fleetgate.kill.board import Verdict
from fleetgate.kill.model import Subject
from fleetgate.metrics import GatewayMetrics
from fleetgate.runtime.identity import IdentityRegistry
from fleetgate.runtime.kill import FlowEffects, KillService
from fleetgate.runtime.shared import SharedState

__all__ = ["DELEGATION", "DEPTH", "RX", "flow_report", "kill_service", "message_depth",
           "refuse_stop", "subject_of"]

RX = "fleetgate.kill.rx"  # bytes received from upstream so far (streamed responses)
DEPTH = "fleetgate.kill.depth"  # the inter-agent message depth a request carried
DELEGATION = "fleetgate.kill.delegation"  # (child depth, parent's children) of a delegation


def subject_of(flow: http.HTTPFlow) -> Subject | None:
    """The kill-switch subject of a flow's verified identity (``None`` without one)."""
    ident = identity_of(flow)
    if ident is None:
        return None
    return Subject.from_identity({**ident.as_dict(),
                                  "user": claims_of(flow).get("user", ident.user)})


def kill_service(metrics: GatewayMetrics, identities: IdentityRegistry,
                 shared: SharedState | None = None) -> KillService:
    """The kill service, cutting flows and closing tunnels the mitmproxy way; ``shared``:
    the Redis state, used when ``fleetgate_state`` names one."""
    return KillService(metrics, identities, shared=shared, effects=FlowEffects(
        cut=lambda flow, rule, reason, abort: cut_flow(flow, rule, reason, abort=abort),
        close=lambda client, abort: close_client(client, abort=abort),
        report=flow_report,
        client=lambda flow: flow.client_conn,
        facts=flow_facts, settle=flow_settle))


def refuse_stop(flow: http.HTTPFlow, v: Verdict, metrics: GatewayMetrics) -> None:
    metrics.kill_refused.labels(verb="stop").inc()
    deny(flow, 503, "killswitch.stop", v.reason,
         hint=f"this identity is stopped (action {v.action.id}); only an operator can lift "
              "it ('fleetgate unrevoke ...')",
         headers={"x-should-retry": "false"})  # SDKs retry 503s; this one will not pass
    annotate_decision(flow, action=v.action.id)


def message_depth(flow: http.HTTPFlow, header: str) -> int | None:
    """Seed 004's hop count: the ``header`` value, else a JSON body's top-level ``depth``."""
    raw = flow.request.headers.get(header) if header else None
    if raw is not None:
        try:
            return int(raw.strip())
        except ValueError:
            return None
    ctype = flow.request.headers.get("content-type", "")
    body = flow.request.raw_content
    if "json" in ctype and body and len(body) < (1 << 20) and b'"depth"' in body:
        try:
            doc = json.loads(flow.request.get_content(strict=False) or b"")
        except (ValueError, UnicodeDecodeError):
            return None
        d = doc.get("depth") if isinstance(doc, dict) else None
        return d if isinstance(d, int) and not isinstance(d, bool) else None
    return None


def flow_report(flow: http.HTTPFlow) -> dict[str, Any]:
    """What an operator needs to reconcile a cut flow's half-finished external effects.

    Taken as the flow is cut (the kill switch's only use of it), so an LLM answer's usage so
    far is recorded first: the row's ``llm`` carries provider, model, tokens and cost."""
    settle = flow_settle(flow)
    return {**flow_facts(flow), **settle}


def flow_settle(flow: http.HTTPFlow) -> dict[str, Any]:
    """Record a cut flow's LLM usage so far, now (a cut stream's may be a token estimate:
    the first one loads the tokenizer table); the kill-log row's ``llm``."""
    settle_cut(flow)
    return {"llm": llm_usage_of(flow)}


def flow_facts(flow: http.HTTPFlow) -> dict[str, Any]:
    """What a cut flow was (who, where, how far it had got): plain reads, no accounting;
    the admin API's answer to a stop carries these for each flow it cut."""
    ident = identity_of(flow)
    req, resp = flow.request, flow.response
    mcp = mcp_of(flow)
    tools = [c.get("target") for c in mcp.get("calls", [])
             if isinstance(c, dict) and c.get("target")] if mcp is not None else []
    if flow.websocket is not None:
        phase = f"websocket open ({len(flow.websocket.messages)} message(s))"
    elif resp is None:
        phase = "request sent, waiting for the response" if flow.server_conn.timestamp_start \
            else "before the upstream connection"
    elif flow.metadata.get(RX) is not None or resp.stream:
        phase = "streaming the response"
    else:
        phase = "response received, not yet delivered"
    received = flow.metadata.get(RX)
    if received is None and resp is not None and not resp.stream:
        received = len(resp.raw_content or b"")
    return {
        "flow": flow.id, "agent": ident.agent if ident else None,
        "session": ident.session if ident else None, "role": ident.role if ident else None,
        "method": req.method, "host": req.pretty_host,
        "path": req.path, "mcp_tools": tools[:20], "status": resp.status_code if resp else None,
        "bytes_sent": len(req.raw_content or b""), "bytes_received": received or 0,
        "phase": phase, "started": req.timestamp_start,
        "elapsed_s": round(time.time() - req.timestamp_start, 3) if req.timestamp_start else None,
    }
