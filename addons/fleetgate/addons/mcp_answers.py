"""McpAnswers: every answer to an MCP request is read and rewritten before the agent sees it.

``responseheaders``: event streams get a re-framing callable (one event held at a time, never
the stream), every event's data parsed strictly; every other answer, whatever its
Content-Type, is read whole as JSON within ``fleetgate_mcp_max_body`` and withheld if it is
not JSON (``response``). List results are filtered for the agent, tools vetted (poisoning,
pins), placeholders swapped for errors (:mod:`fleetgate.addons.mcp_stream`). A server that
names a session on ``initialize`` has it bound to the agent here.

Works only on flows :class:`fleetgate.addons.mcp.McpGuard` recorded as MCP and allowed.
"""

from __future__ import annotations

from mitmproxy import ctx, http

from fleetgate.addons.flowtools import cut_flow, fail_closed
from fleetgate.addons.mcp_flow import content_type, mcp_scope, mcp_server
from fleetgate.addons.mcp_stream import AnswerFilter, StreamRewriter
from fleetgate.addons.state import (
    HEADER,
    agent_of,
    clear_mcp,
    decision_id,
    decision_of,
    mcp_of,
    need_body,
    record_decision,
    set_comment,
)
from fleetgate.bodies import BodyError, decode_body
from fleetgate.mcp.messages import INVALID_REQUEST
from fleetgate.metrics import GatewayMetrics
from fleetgate.policy.model import McpServer
from fleetgate.runtime.mcp import McpService
from fleetgate.runtime.policy import PolicyService
from fleetgate.wire import jsonrpc_error_body

__all__ = ["McpAnswers"]


class McpAnswers:
    def __init__(self, store: PolicyService, metrics: GatewayMetrics, mcp: McpService) -> None:
        self.store = store
        self.metrics = metrics
        self.mcp = mcp

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        meta = mcp_of(flow)
        resp = flow.response
        if meta is None or resp is None or flow.error:
            return
        if not (decision_of(flow) or {}).get("allow"):
            return
        policy = self.store.policy
        if policy is None:
            cut_flow(flow, "no-policy", "the gateway lost its policy")
            return
        server = mcp_server(self.mcp, policy, flow) or McpServer(meta["server"], (),
                                                                 declared=False)
        if len(resp.headers.get_all("mcp-session-id")) > 1:
            cut_flow(flow, "mcp.answer", "the MCP server named two sessions in one answer")
            return
        sid = resp.headers.get("mcp-session-id") or meta.get("session")
        if sid and not meta.get("session"):  # initialize: the server names the session
            problem = self.mcp.sessions.claim(server.name, sid, agent_of(flow))
            if problem:
                cut_flow(flow, "mcp.session-owner", problem)
                return
        answer = AnswerFilter(self.mcp, self.metrics, flow,
                              mcp_scope(self.mcp, policy, flow, server, sid), meta)
        ctype = content_type(resp.headers)
        limit = ctx.options.fleetgate_mcp_max_body
        encoding = resp.headers.get("content-encoding", "")
        if meta.get("sniff") and ctype != "text/event-stream":
            clear_mcp(flow)  # a GET of something else: not the older MCP transport
            return
        if ctype == "text/event-stream":
            resp.headers.pop("content-encoding", None)
            resp.headers.pop("content-length", None)
            resp.stream = StreamRewriter(answer, encoding, limit, sse=True)
            return
        # JSON, or labelled otherwise (text/plain, none at all): every answer is read by the
        # same strict parser; what is not JSON is withheld (see response()).
        length = resp.headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) <= limit:
            meta["buffered"] = True  # read whole by mitmproxy; rewritten in response()
            need_body(flow)
            return
        resp.headers.pop("content-encoding", None)
        resp.headers.pop("content-length", None)
        resp.stream = StreamRewriter(answer, encoding, limit, sse=False)

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        meta = mcp_of(flow)
        resp = flow.response
        if meta is None or not meta.get("buffered") or resp is None:
            return
        policy = self.store.policy
        assert policy is not None
        server = mcp_server(self.mcp, policy, flow) or McpServer(meta["server"], (),
                                                                 declared=False)
        answer = AnswerFilter(self.mcp, self.metrics, flow,
                              mcp_scope(self.mcp, policy, flow, server, meta.get("session")),
                              meta)
        try:
            text = decode_body(resp.raw_content or b"", resp.headers.get("content-encoding", ""),
                               ctx.options.fleetgate_mcp_max_body)
            new = answer.json(text)
        except (BodyError, ValueError) as exc:
            self._bad_answer(flow, exc.message if isinstance(exc, BodyError) else str(exc))
            return
        if new is not None:
            resp.headers.pop("content-encoding", None)
            resp.content = new

    def _bad_answer(self, flow: http.HTTPFlow, why: str) -> None:
        """An answer we cannot judge is not passed on: the agent gets a JSON-RPC error."""
        self.metrics.mcp_refused.labels(reason="answer").inc()
        did = decision_id(flow)
        msg = f"fleetgate could not check the MCP server's answer ({why}); it was withheld"
        assert flow.response is not None
        # an error status is kept (a client re-initialises on 404...), its body is not
        status = flow.response.status_code if flow.response.status_code >= 400 else 502
        flow.response = http.Response.make(
            status, jsonrpc_error_body(None, INVALID_REQUEST, msg, decision_id=did),
            {"Content-Type": "application/json", HEADER: did})
        record_decision(flow, False, "mcp.answer", msg, status)
        flow.marked = ":no_entry:"
        set_comment(flow, msg)
