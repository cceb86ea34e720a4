"""UpstreamErrors: a request the rules let through whose upstream fails gets a real answer.

mitmproxy answers "cannot resolve", "connection refused", a TLS failure or a destination
``server_connect`` refused with its own HTML 502 page and no way for an addon to replace it:
the ``error`` hook may not set a response. SDKs cannot parse that page, and it carries no
decision id. So :func:`install` wraps mitmproxy's ``HttpStream.handle_protocol_error`` (once
per process): when the upstream failed *before any response existed*, it marks the flow for
the ``error`` hook; if an addon then gave the flow a response, that response is sent to the
client in place of mitmproxy's page. Everything else (client aborts, kills, failures after a
response started) goes through mitmproxy's own path unchanged.

The answer is JSON the client parses (the OpenAI/Anthropic error envelope of
:mod:`fleetgate.wire`, a JSON-RPC error for MCP flows) with ``X-Fleetgate-Decision-Id``;
what it says comes from :func:`fleetgate.upstream_failure.classify`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Generator, Iterable
from typing import Any

from mitmproxy import http
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers.http._events import (
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._hooks import HttpErrorHook

from fleetgate.addons.layerpatch import relay
from fleetgate.addons.state import (
    HEADER,
    annotate_decision,
    cut_of,
    decision_id,
    decision_of,
    mcp_of,
    record_decision,
    set_comment,
)
from fleetgate.metrics import GatewayMetrics
from fleetgate.upstream_failure import UpstreamFailure, classify, timed_out
from fleetgate.wire import denial_body, jsonrpc_error_body

log = logging.getLogger(__name__)

FAILED = "fleetgate.upstream_failed"  # set by the wrapper just before the error hook
# Set by Timeouts (the bound, in seconds) when it closed the upstream for not answering in time.
TIMED_OUT = "fleetgate.upstream_timed_out"
_MARK = "_fleetgate_wrapped"


def install() -> None:
    """Wrap ``HttpStream.handle_protocol_error`` once; refuse to start if it is not there."""
    stream_cls: Any = getattr(http_layer, "HttpStream", None)
    original = getattr(stream_cls, "handle_protocol_error", None)
    if original is None or not hasattr(http_layer, "SendHttp"):
        raise RuntimeError("fleetgate: this mitmproxy has no HttpStream.handle_protocol_error; "
                           "upstream failures could not be answered in the client's format")
    if getattr(original, _MARK, False):
        return

    def handle_protocol_error(self: Any, event: Any) -> Generator[Any, Any, Any]:
        upstream_failed = (isinstance(event, ResponseProtocolError)
                           and self.flow.response is None)

        def replace(cmd: Any) -> Iterable[Any] | None:
            if upstream_failed and isinstance(cmd, HttpErrorHook):
                self.flow.metadata[FAILED] = True  # before the error hook: UpstreamErrors answers
            elif (upstream_failed and isinstance(cmd, http_layer.SendHttp) and cmd.event is event
                  and self.flow.response is not None and self.flow.metadata.get(FAILED)):
                return _send(self, self.flow.response)  # instead of mitmproxy's HTML page
            return None

        return (yield from relay(original(self, event), replace))

    setattr(handle_protocol_error, _MARK, True)
    stream_cls.handle_protocol_error = handle_protocol_error


def _send(stream: Any, response: http.Response) -> Generator[Any, Any, None]:
    """The commands mitmproxy's ``send_response`` issues, minus the response hook."""
    response.timestamp_start = response.timestamp_start or time.time()
    response.timestamp_end = time.time()
    client = stream.context.client
    content = response.raw_content or b""
    yield http_layer.SendHttp(
        ResponseHeaders(stream.stream_id, response, not content), client)
    if content:
        yield http_layer.SendHttp(ResponseData(stream.stream_id, content), client)
    yield http_layer.SendHttp(ResponseEndOfMessage(stream.stream_id), client)


def _rpc_id(body: bytes | None) -> Any:
    try:
        msg = json.loads(body or b"")
    except ValueError:
        return None
    return msg.get("id") if isinstance(msg, dict) else None


class UpstreamErrors:
    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def load(self, loader: Any) -> None:
        install()

    def error(self, flow: http.HTTPFlow) -> None:
        if (flow.response is not None or not flow.metadata.get(FAILED) or cut_of(flow)
                or flow.error is None):
            return
        req = flow.request
        destination = f"{req.pretty_host}:{req.port}"
        bound = flow.metadata.get(TIMED_OUT)
        failure = (timed_out(destination, bound) if isinstance(bound, int | float)
                   else classify(flow.error.msg, destination))
        flow.response = self._answer(flow, failure)
        self.metrics.upstream_failures.labels(rule=failure.rule).inc()
        decision = decision_of(flow)
        if failure.rule == "destinations.connect":
            return  # a denial, recorded and marked by HttpAuthorization.error
        if decision is None:
            record_decision(flow, False, failure.rule, failure.reason, failure.status)
        else:  # the rules allowed it: keep their verdict, say what happened upstream
            annotate_decision(flow, status=failure.status,
                              upstream={"rule": failure.rule, "reason": failure.reason})
        flow.marked = ":warning:"
        set_comment(flow, f"upstream failed ({failure.rule}): {failure.reason}")

    @staticmethod
    def _answer(flow: http.HTTPFlow, failure: UpstreamFailure) -> http.Response:
        did = decision_id(flow)
        headers = {"Content-Type": "application/json", HEADER: did}
        if not failure.retry:
            headers["x-should-retry"] = "false"  # the OpenAI and Anthropic SDKs honour it
        lead = ("fleetgate refused to dial the upstream" if failure.rule == "destinations.connect"
                else "fleetgate could not reach the upstream")
        if mcp_of(flow) is not None:
            message = f"{lead} ({failure.rule}): {failure.reason}. {failure.hint}"
            body = jsonrpc_error_body(_rpc_id(flow.request.raw_content), -32603, message,
                                      decision_id=did, rule=failure.rule)
            return http.Response.make(failure.status, body, headers)
        return http.Response.make(
            failure.status,
            denial_body(failure.status, failure.rule, failure.reason, did, failure.hint, lead=lead),
            headers)
