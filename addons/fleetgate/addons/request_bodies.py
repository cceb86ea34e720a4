"""RequestBodies: every request body bounded; streamed when nothing reads it, refused early
when something must and cannot (see :mod:`fleetgate.body_plan` for the decision).

Three things mitmproxy 12 does not do, so :func:`install` wraps three ``HttpStream`` steps
(once per process, as :mod:`fleetgate.addons.upstream_errors` does):

- A streamed request runs the ``request`` hook only after its whole body was forwarded, too
  late for every check of the chain (rules, kill switch, limits, credentials). So when this
  addon streams a body, ``start_request_stream`` first runs the ``request`` hook (all addons,
  in their order) and only then dials upstream; a denial there is answered at once. The hook
  mitmproxy fires again at the end of the stream is dropped: it runs exactly once, before
  anything is forwarded.
- A flow answered in ``requestheaders`` (a 413 from ``Content-Length``, a 407, ...) is still
  read whole into memory by mitmproxy before the answer goes out. Here the answer is sent at
  once and the rest of the body is discarded as it arrives, up to :data:`DRAIN_MAX` bytes
  (so an HTTP/1 client that writes its whole body before reading sees the answer, not a
  reset), then the connection is closed.
- A body of unknown length that a reader must buffer is counted as it arrives: past the
  reader's limit it is refused (413) at once, not after buffering all of it.

A streamed body is counted too: past ``fleetgate_max_request_body`` the flow is cut.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers.http._events import RequestData, RequestEndOfMessage
from mitmproxy.proxy.layers.http._hooks import HttpRequestHook

from fleetgate.addons.flowtools import cut_flow, deny, fail_closed, settled
from fleetgate.addons.layerpatch import relay
from fleetgate.addons.mcp_flow import mcp_server
from fleetgate.addons.state import HEADER, decision_id, record_decision, set_comment
from fleetgate.body_plan import BodyFacts, BodyPlan, parse_content_length, plan_body
from fleetgate.normalize import normalize_host, normalize_path
from fleetgate.runtime.kill import KillService
from fleetgate.runtime.mcp import McpService
from fleetgate.runtime.policy import PolicyService
from fleetgate.wire import jsonrpc_error_body

log = logging.getLogger(__name__)

PLAN = "fleetgate.body"  # {"action", "limit", "reader"}: what was decided for the body
EARLY = "fleetgate.request_hook_early"  # the request hook ran before the body (streamed)
# Bytes of a refused request's body read and thrown away (memory: none) before hanging up.
# HTTP/1 clients (httpx, the SDKs) write their whole body before reading the answer: a body
# within this is drained and the connection stays usable; past it the client may see a reset
# instead of the answer. 8 MiB left a refused 16 MiB upload racing the hang-up.
DRAIN_MAX = 64 * 1024 * 1024
_MARK = "_fleetgate_bodies"


class RequestBodies:
    def __init__(self, store: PolicyService, mcp: McpService, kill: KillService) -> None:
        self.store = store
        self.mcp = mcp
        self.kill = kill

    def load(self, loader: Any) -> None:
        loader.add_option(
            "fleetgate_max_request_body", int, 1 << 30,
            "Largest request body (bytes on the wire) fleetgate forwards to any destination. "
            "Bodies nothing inspects are streamed, never buffered; past this bound they are "
            "refused (413, from Content-Length) or cut. Bodies an inspector must read are "
            "bounded by that inspector's own limit (fleetgate_llm_max_body, ...).")
        install()

    def configure(self, updated: set[str]) -> None:
        if "fleetgate_max_request_body" in updated and ctx.options.fleetgate_max_request_body <= 0:
            raise exceptions.OptionsError("fleetgate_max_request_body must be > 0")

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if settled(flow):
            return
        plan = plan_body(self._facts(flow))
        flow.metadata[PLAN] = {"action": plan.action, "limit": plan.limit, "reader": plan.reader}
        if plan.action == "refuse":
            refuse(flow, plan)
        elif plan.action == "stream":
            flow.request.stream = _counter(flow, plan)

    def _facts(self, flow: http.HTTPFlow) -> BodyFacts:
        req = flow.request
        length = parse_content_length(req.headers.get_all("content-length"))
        if length == "invalid":
            raise ValueError("unreadable Content-Length")  # validate_inbound_headers refuses it
        chunked = "transfer-encoding" in req.headers
        has_body = chunked or bool(length) or (length is None and (req.is_http2 or req.is_http3))
        policy = self.store.policy
        llm_limit = mcp_limit = a2a_limit = None
        if policy is not None:
            path = normalize_path(req.path.partition("?")[0])
            route = policy.providers.route(normalize_host(req.host), req.port, path)
            if policy.a2a.agent_for(normalize_host(req.host), req.port, path) is not None:
                a2a_limit = ctx.options.fleetgate_a2a_max_body
            if route is not None and req.method == "POST":
                llm_limit = ctx.options.fleetgate_llm_max_body
            if route is None and mcp_server(self.mcp, policy, flow) is not None:
                mcp_limit = ctx.options.fleetgate_mcp_max_body
        depth_header = self.kill.depth_header
        depth_check = bool(self.kill.max_depth) and "json" in req.headers.get(
            "content-type", "") and not (depth_header and depth_header in req.headers)
        return BodyFacts(has_body=has_body, content_length=None if chunked else length,
                         llm_limit=llm_limit, mcp_limit=mcp_limit, a2a_limit=a2a_limit,
                         depth_check=depth_check,
                         max_body=ctx.options.fleetgate_max_request_body,
                         stream_min_bytes=ctx.options.fleetgate_stream_min_bytes or 1 << 20)


def refuse(flow: http.HTTPFlow, plan: BodyPlan | dict[str, Any], size: int | None = None) -> None:
    """413 in the client's format: a JSON-RPC error on an MCP endpoint, else the usual JSON."""
    limit = plan.limit if isinstance(plan, BodyPlan) else plan.get("limit")
    reader = plan.reader if isinstance(plan, BodyPlan) else str(plan.get("reader"))
    reason = plan.reason if isinstance(plan, BodyPlan) and plan.reason else (
        f"request body is over the {limit}-byte limit of what must inspect it ({reader})"
        + (f" ({size} bytes and more arrived)" if size else "") + "; refused unread")
    rule = "request.body-too-large"
    hint = f"send at most {limit} bytes of body to this destination"
    if reader == "mcp":
        did = decision_id(flow)
        body = jsonrpc_error_body(None, -32600,
                                  f"fleetgate refused this MCP request: {reason}. {hint}",
                                  decision_id=did, rule=rule)
        flow.response = http.Response.make(413, body, {"Content-Type": "application/json",
                                                       HEADER: did})
        record_decision(flow, False, rule, reason, 413)
        flow.marked = ":no_entry:"
        set_comment(flow, f"refused by {rule}: {reason}")
    else:
        deny(flow, 413, rule, reason, hint=hint)


def _counter(flow: http.HTTPFlow, plan: BodyPlan) -> Callable[[bytes], bytes]:
    """Pass a streamed body through, counting; cut the flow past the gateway's bound."""
    limit = plan.limit or 0
    seen = 0

    def count(chunk: bytes) -> bytes:
        nonlocal seen
        seen += len(chunk)
        if seen > limit:
            cut_flow(flow, "request.body-too-large",
                     f"streamed request body passed the gateway's limit of {limit} bytes")
            return b""
        return chunk
    return count


# -- the three HttpStream steps ----------------------------------------------------------


def install() -> None:
    """Wrap the HttpStream steps once; refuse to start if mitmproxy no longer has them."""
    cls: Any = getattr(http_layer, "HttpStream", None)
    names = ("start_request_stream", "state_stream_request_body", "state_consume_request_body",
             "state_wait_for_request_headers", "send_response", "state_errored", "flow_done")
    if cls is None or any(not hasattr(cls, n) for n in names):
        raise RuntimeError("fleetgate: this mitmproxy's HttpStream lacks the request-body steps "
                           "fleetgate bounds; request bodies could not be bounded")
    if getattr(cls.start_request_stream, _MARK, False):
        return
    start, streamed = cls.start_request_stream, cls.state_stream_request_body
    consume, headers = cls.state_consume_request_body, cls.state_wait_for_request_headers

    def start_request_stream(self: Any) -> Generator[Any, Any, Any]:
        if isinstance(self.flow.metadata.get(PLAN), dict) and not self.flow.response:
            # judge now, before anything is dialled or forwarded
            yield HttpRequestHook(self.flow)
            self.flow.metadata[EARLY] = True
            if (yield from self.check_killed(True)):
                return
            if self.flow.response is not None:
                self.flow.request.stream = False
                yield from _answer_now(self)
                return
        return (yield from start(self))

    def state_stream_request_body(self: Any, event: Any) -> Generator[Any, Any, Any]:
        def replace(cmd: Any) -> tuple[()] | None:
            if isinstance(cmd, HttpRequestHook) and self.flow.metadata.get(EARLY):
                return ()  # it already ran, before the body
            return None

        return (yield from relay(streamed(self, event), replace))

    def state_consume_request_body(self: Any, event: Any) -> Generator[Any, Any, Any]:
        plan = self.flow.metadata.get(PLAN)
        limit = plan.get("limit") if isinstance(plan, dict) else None
        if (isinstance(event, RequestData) and isinstance(limit, int)
                and self.flow.response is None
                and len(self.request_body_buf) + len(event.data) > limit):
            size = len(self.request_body_buf) + len(event.data)
            self.request_body_buf.clear()
            refuse(self.flow, plan, size)
            yield from _answer_now(self)
            return
        yield from consume(self, event)

    def state_wait_for_request_headers(self: Any, event: Any) -> Generator[Any, Any, Any]:
        yield from headers(self, event)
        if (getattr(self, "flow", None) is not None and self.flow.response is not None
                and self.client_state == self.state_consume_request_body):
            # answered in requestheaders: say so now, never buffer the body it came with
            yield from _answer_now(self)

    for name, fn in (("start_request_stream", start_request_stream),
                     ("state_stream_request_body", state_stream_request_body),
                     ("state_consume_request_body", state_consume_request_body),
                     ("state_wait_for_request_headers", state_wait_for_request_headers)):
        setattr(fn, _MARK, True)
        setattr(cls, name, fn)


def _answer_now(stream: Any) -> Generator[Any, Any, None]:
    """Send the flow's response before its body was read; discard the body as it arrives.

    On HTTP/1 the answer says ``Connection: close`` (RFC 9112 9.6: a server answering before
    the body was read closes afterwards): the client opens a new connection for its next
    request instead of reusing one whose request was cut short."""
    response = stream.flow.response
    if response is not None and not (stream.flow.request.is_http2 or stream.flow.request.is_http3):
        response.headers["Connection"] = "close"
    stream.server_state = stream.state_done
    stream.client_state = _drain(stream)
    yield from stream.send_response()


def _drain(stream: Any) -> Callable[[Any], Generator[Any, Any, None]]:
    drained = 0

    def state(event: Any) -> Generator[Any, Any, None]:
        nonlocal drained
        if isinstance(event, RequestData):
            drained += len(event.data)
            if drained > DRAIN_MAX:  # enough time given to read the answer: hang up
                stream.client_state = stream.state_errored
                yield commands.CloseConnection(stream.context.client)
        elif isinstance(event, RequestEndOfMessage):
            stream.client_state = stream.state_done
            if stream.server_state == stream.state_done:
                yield from stream.flow_done()
    return state
