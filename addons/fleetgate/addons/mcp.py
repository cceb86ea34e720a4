"""McpGuard: MCP requests judged on every transport, as a thin mitmproxy addon.

The logic is pure (:mod:`fleetgate.mcp.exchange`, :mod:`fleetgate.mcp.engine`); the state that
outlives an exchange (sessions, vetting, pins) is :class:`fleetgate.runtime.mcp.McpService`.
This addon finds MCP traffic, feeds it in and applies the answer, in ``request`` (after
HttpAuthorization allowed the HTTP request):

every identifier the gateway judges must have one reading and the method must be POST, or
GET/DELETE without a body (:mod:`fleetgate.mcp.exchange`; else ``400 mcp.ambiguous`` /
``405 mcp.method``, never forwarded); the body is decoded and parsed strictly (bounded, no
duplicate keys, JSON-RPC only), ``Mcp-Method``/``Mcp-Name`` checked against it, the session's
owner checked, every element judged. A fully denied body is answered here with JSON-RPC
errors; otherwise denied elements become ``ping`` placeholders (see the engine).
``Accept-Encoding`` is pinned to identity so answers can be read as they stream.

Answers: :mod:`fleetgate.addons.mcp_answers`. Options and operator commands:
:mod:`fleetgate.addons.mcp_operator`.
"""

from __future__ import annotations

import json
from typing import Any

from mitmproxy import ctx, http

from fleetgate.addons.flowtools import allowed, fail_closed
from fleetgate.addons.mcp_flow import has_body, mcp_scope, mcp_server
from fleetgate.addons.report_mode import note_would_deny
from fleetgate.addons.state import (
    HEADER,
    agent_of,
    clear_mcp,
    decision_id,
    decision_of,
    record_decision,
    set_comment,
    set_mcp,
)
from fleetgate.bodies import BodyError, decode_body, parse_json
from fleetgate.mcp.engine import RequestPlan, check_headers, judge_request
from fleetgate.mcp.exchange import JUDGED_HEADERS, method_problem, read_identifiers
from fleetgate.mcp.messages import HEADER_MISMATCH, INVALID_REQUEST, McpError, parse_messages
from fleetgate.metrics import GatewayMetrics, LabelBudget
from fleetgate.runtime.mcp import McpService
from fleetgate.runtime.policy import PolicyService
from fleetgate.wire import jsonrpc_error_body

__all__ = ["McpGuard"]

PARSE_ERROR = -32700


class McpGuard:
    def __init__(self, store: PolicyService, metrics: GatewayMetrics, mcp: McpService) -> None:
        self.store = store
        self.metrics = metrics
        self.mcp = mcp
        self.agent_labels = LabelBudget(1000)
        self.tool_labels = LabelBudget(500)

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        policy = self.store.policy
        if policy is None or allowed(flow) is None:
            return
        server = mcp_server(self.mcp, policy, flow)
        if server is None:
            return
        req = flow.request
        agent = agent_of(flow)
        meta: dict[str, Any] = {"server": server.name, "declared": server.declared,
                                "session": None, "calls": [], "hidden": []}
        set_mcp(flow, meta)
        try:
            ref = read_identifiers(req.headers.items(multi=True), req.path)
        except McpError as exc:
            self.metrics.mcp_refused.labels(reason="ambiguous").inc()
            self._refuse(flow, 400, exc.code, exc.message, "mcp.ambiguous", _best_id(req), meta)
            return
        sid, in_query = ref.id, ref.in_query
        meta["session"] = sid
        problem = method_problem(req.method, has_body(req))
        if problem:
            self.metrics.mcp_refused.labels(reason="method").inc()
            self._refuse(flow, 405, INVALID_REQUEST, problem, "mcp.method", _best_id(req), meta)
            assert flow.response is not None
            flow.response.headers["Allow"] = "GET, POST, DELETE"
            return
        mcp_headers = any(k in req.headers for k in JUDGED_HEADERS)
        if not server.declared and req.method == "GET" and not mcp_headers:
            # An event stream from an undeclared host may be the older MCP transport (its GET
            # carries no MCP header): it is MCP only if its first event is ``endpoint``.
            meta["sniff"] = True
        # Answers must be readable as they pass: no compression on MCP responses.
        req.headers["accept-encoding"] = "identity"
        if sid:
            owner_problem = self.mcp.sessions.claim(server.name, sid, agent)
            if owner_problem:
                self._refuse(flow, 403, INVALID_REQUEST, owner_problem, "mcp.session-owner",
                             None, meta)
                return
        if req.method == "DELETE" and sid:
            self.mcp.sessions.forget(server.name, sid)
            return
        if req.method != "POST":  # a GET without a body: the event stream
            meta["transport"] = "stream"
            return
        session = self.mcp.sessions.get(server.name, sid) if sid else None
        legacy = bool(session and session.legacy) or (
            in_query and "text/event-stream" not in req.headers.get("accept", "").lower())
        meta["transport"] = "sse-legacy" if legacy else "streamable-http"
        scope = mcp_scope(self.mcp, policy, flow, server, sid)
        # an undeclared server recognised only by the client's Accept header: a body that is
        # not JSON-RPC means this is not MCP after all (only the HTTP rules apply)
        guessed = not server.declared and session is None and not mcp_headers
        body: Any = None
        try:
            raw = decode_body(req.raw_content or b"", req.headers.get("content-encoding", ""),
                              ctx.options.fleetgate_mcp_max_body)
            body = parse_json(raw)
            messages, batch = parse_messages(body)
            check_headers({k.lower(): v for k, v in req.headers.items()}, messages, batch)
        except (BodyError, McpError) as exc:
            if guessed:
                clear_mcp(flow)
                return
            self._refuse_unreadable(flow, exc, body, meta)
            return
        plan = judge_request(messages, batch, scope, answer_directly=not legacy)
        self._record(flow, plan, meta, server.name, agent)
        if sid and legacy:  # the answers will come on the session's GET stream
            self.mcp.sessions.expect(server.name, sid, plan.methods, plan.substitutions)
        self._apply(flow, plan, server.name)
        self._report(flow, plan)

    def _record(self, flow: http.HTTPFlow, plan: RequestPlan, meta: dict[str, Any],
                server: str, agent: str) -> None:
        for rec in plan.records:
            meta["calls"].append(rec.as_dict())
            self.metrics.mcp_messages.labels(
                server=server, method=rec.method, tool=self.tool_labels(rec.target),
                decision="allow" if rec.allow else "deny", rule=rec.rule,
                agent=self.agent_labels(agent)).inc()
        meta["methods"], meta["substitutions"] = plan.methods, plan.substitutions
        meta["facts"] = plan.facts

    def _report(self, flow: http.HTTPFlow, plan: RequestPlan) -> None:
        """Report-mode MCP rules that would have denied a message (after the comment a
        denial writes, so both show)."""
        would = [w for rec in plan.records for w in rec.would_deny]
        if would:
            note_would_deny(flow, self.metrics, would)

    @staticmethod
    def _apply(flow: http.HTTPFlow, plan: RequestPlan, server: str) -> None:
        denied = plan.denied
        if denied:
            first = denied[0]
            what = f"{first.method} {first.target}".strip()
            flow.marked = ":no_entry:"
            set_comment(flow, f"MCP {server}: denied {what} by {first.rule}: {first.reason}"
                        + (f" (+{len(denied) - 1} more)" if len(denied) > 1 else ""))
        if plan.answer_status:
            body_out = b"" if plan.answer is None else json.dumps(plan.answer).encode()
            headers = {HEADER: decision_id(flow)}
            if body_out:
                headers["Content-Type"] = "application/json"
            flow.response = http.Response.make(plan.answer_status, body_out, headers)
            record_decision(flow, False, denied[0].rule, denied[0].reason, plan.answer_status,
                            profiles=(decision_of(flow) or {}).get("profiles"))
            return
        if plan.forward is not None:
            flow.request.headers.pop("content-encoding", None)
            flow.request.content = json.dumps(plan.forward).encode()

    def _refuse_unreadable(self, flow: http.HTTPFlow, exc: BodyError | McpError, body: Any,
                           meta: dict[str, Any]) -> None:
        if isinstance(exc, BodyError):
            self.metrics.mcp_refused.labels(reason=f"body-{exc.status}").inc()
            self._refuse(flow, exc.status, PARSE_ERROR if exc.status == 400 else INVALID_REQUEST,
                         exc.message, "mcp.body", None, meta)
            return
        self.metrics.mcp_refused.labels(reason=str(exc.code)).inc()
        rid = body.get("id") if isinstance(body, dict) else None
        rule = "mcp.header-mismatch" if exc.code == HEADER_MISMATCH else "mcp.body"
        self._refuse(flow, 400, exc.code, exc.message, rule, rid, meta)

    @staticmethod
    def _refuse(flow: http.HTTPFlow, status: int, code: int, message: str, rule: str,
                rid: Any, meta: dict[str, Any]) -> None:
        did = decision_id(flow)
        text = (f"fleetgate refused this MCP request: {message}. Send one well-formed JSON-RPC "
                "message or batch per request, unchanged headers, on your own session.")
        flow.response = http.Response.make(
            status, jsonrpc_error_body(rid, code, text, decision_id=did),
            {"Content-Type": "application/json", HEADER: did})
        record_decision(flow, False, rule, message, status)
        meta["calls"].append({"method": "", "target": "", "allow": False, "rule": rule,
                              "reason": message})
        flow.marked = ":no_entry:"
        set_comment(flow, f"MCP refused by {rule}: {message}")


def _best_id(req: http.Request) -> Any:
    """The JSON-RPC id of a single-message body, for a refusal's answer; None if none can be
    read (the refusal never depends on it)."""
    try:
        raw = decode_body(req.raw_content or b"", req.headers.get("content-encoding", ""),
                          ctx.options.fleetgate_mcp_max_body)
        body = parse_json(raw)
    except (BodyError, ValueError):
        return None
    rid = body.get("id") if isinstance(body, dict) else None
    return rid if isinstance(rid, str | int) and not isinstance(rid, bool) else None
