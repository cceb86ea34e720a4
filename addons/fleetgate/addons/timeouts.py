"""Bounds on time: nothing an agent or an upstream sends (or fails to send) may hold the gateway.

The bounds on header size are :mod:`fleetgate.addons.header_bounds`.

Timeouts (late in the chain, so it times only what every check let through) keeps three clocks
(:mod:`fleetgate.bounds`) scanned by one periodic task, never one task per request:

- ``fleetgate_client_header_timeout``: a client connection that has not completed a request's
  headers (or a CONNECT) that long after it connected or after its last request finished is
  closed (slowloris; also ends idle keep-alive connections, as any web server does);
- ``fleetgate_upstream_connect_timeout``: an upstream connection not open that long after
  mitmproxy started opening it (address lookup included) is given up
  (:mod:`fleetgate.addons.upstream_connect`, a timer per connection) and the request that
  waits for it gets ``504 upstream.timeout``;
- ``fleetgate_upstream_response_timeout``: no response headers that long after the request
  was sent (connect and TLS included): the server connection is closed and the flow marked,
  so :class:`~fleetgate.addons.upstream_errors.UpstreamErrors` answers ``504 upstream.timeout``
  in the client's format;
- ``fleetgate_upstream_idle_timeout``: a response that started and then sends nothing that
  long (a streamed one is watched chunk by chunk; a buffered one, at most
  ``fleetgate_stream_min_bytes``, must arrive whole within it) is cut: its status is already
  sent, so the client connection is closed, logged and counted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mitmproxy import connection, ctx, exceptions, http

from fleetgate.addons import upstream_connect
from fleetgate.addons.flowtools import _close_now, close_client, cut_flow, fail_closed, settled
from fleetgate.addons.upstream_errors import TIMED_OUT
from fleetgate.bounds import (
    CLIENT_HEADERS,
    UPSTREAM_FIRST_BYTE,
    UPSTREAM_IDLE,
    Deadlines,
    Expired,
    tick_seconds,
)
from fleetgate.metrics import GatewayMetrics

log = logging.getLogger(__name__)

# A wave of deadlines due at once (hundreds of slowloris sockets) is acted on in about
# WAVE_STEPS steps with a short pause between them, so the agents' traffic runs in between
# instead of waiting behind one long stall of the event loop (each close wakes a connection
# task that tears the connection down). Measured with 500 slowloris sockets closed while a
# control agent worked: one close per 4 ms step left its p99 at 55-58 ms against 54 ms with
# no wave; batches of 10 per 10 ms gave 63 ms, all at once 218 ms. A wave of n takes
# ceil(n / WAVE_STEPS) per step, so even thousands are closed within about a second.
WAVE_STEPS = 250
WAVE_PAUSE = 0.004

# the connect still pending when the response bound ran out (answered by UpstreamErrors: 504)
CONNECT_GIVEN_UP = "fleetgate: the upstream connection did not open"


_TIMEOUT_OPTIONS = {
    "fleetgate_client_header_timeout": (30, "Seconds a client connection has to complete a "
                                        "request's headers (or a CONNECT) after connecting or "
                                        "after its previous request; then it is closed."),
    "fleetgate_upstream_connect_timeout": (30, "Seconds an upstream connection may take to "
                                           "open (address lookup and TCP connect) before "
                                           "the agent gets 504."),
    "fleetgate_upstream_response_timeout": (300, "Seconds an allowed request waits for the "
                                            "upstream's response headers (connect and TLS "
                                            "included) before the agent gets 504."),
    "fleetgate_upstream_idle_timeout": (300, "Seconds a started response may send nothing "
                                        "before it is cut."),
}


class Timeouts:
    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self.deadlines: Deadlines[Any] = Deadlines()
        self.open_requests: dict[str, int] = {}  # client id -> requests not finished on it
        self.counted: set[str] = set()  # flows counted there
        self._task: asyncio.Task[None] | None = None

    def load(self, loader: Any) -> None:
        for name, (default, text) in _TIMEOUT_OPTIONS.items():
            loader.add_option(name, int, default, text)
        upstream_connect.install()

    def configure(self, updated: set[str]) -> None:
        for name in _TIMEOUT_OPTIONS:
            if name in updated and getattr(ctx.options, name) < 1:
                raise exceptions.OptionsError(f"{name} must be at least 1 second")
        if "fleetgate_upstream_connect_timeout" in updated:
            upstream_connect.set_bound(ctx.options.fleetgate_upstream_connect_timeout)

    def running(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _bound(self, name: str) -> int:
        return int(getattr(ctx.options, f"fleetgate_{name}_timeout"))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(tick_seconds(
                self._bound(n) for n in ("client_header", "upstream_response", "upstream_idle")))
            due = self.deadlines.expired()
            step = max(1, -(-len(due) // WAVE_STEPS))
            for start in range(0, len(due), step):
                if start:
                    await asyncio.sleep(WAVE_PAUSE)
                try:
                    self.expire(due[start:start + step])
                except Exception:  # the watch must outlive any one bad entry
                    log.exception("fleetgate: timeout watch failed on one step")

    def expire(self, due: list[Expired[Any]]) -> None:
        """Act on deadlines that passed (taken by :meth:`Deadlines.expired`). One re-armed
        since then (a request arrived, a chunk moved) is no longer due and is left alone."""
        for late in due:
            if late.key in self.deadlines:
                continue
            if late.kind == CLIENT_HEADERS:
                if (self.open_requests.get(late.subject.id) == 0
                        and close_client(late.subject)):
                    self.metrics.connections_refused.labels(reason=CLIENT_HEADERS).inc()
                    log.info("fleetgate: closed client %s: no request headers within %ss",
                             late.subject.peername, late.seconds)
                continue
            flow: http.HTTPFlow = late.subject
            if flow.error or not flow.live:
                continue
            if late.kind == UPSTREAM_FIRST_BYTE and flow.response is None:
                flow.metadata[TIMED_OUT] = late.seconds
                log.warning("fleetgate: %s:%s sent no response headers within %ss; answering 504",
                            flow.request.pretty_host, flow.request.port, late.seconds)
                if not (_close_server(flow) or upstream_connect.give_up_client(
                        flow.client_conn.id, f"{CONNECT_GIVEN_UP} within {late.seconds}s")):
                    self._cut(flow, UPSTREAM_FIRST_BYTE,
                              f"the upstream sent no response within {late.seconds}s")
            elif late.kind == UPSTREAM_IDLE:
                self._cut(flow, UPSTREAM_IDLE,
                          f"the upstream sent nothing for {late.seconds}s mid-response")

    def _cut(self, flow: http.HTTPFlow, rule: str, reason: str) -> None:
        if cut_flow(flow, rule, reason):
            self.metrics.flows_cut.labels(rule=rule).inc()
            log.warning("fleetgate: cut (%s) %s %s%s: %s", rule, flow.request.method,
                        flow.request.pretty_host, flow.request.path[:80], reason)

    def server_connected(self, data: Any) -> None:
        upstream_connect.connected(data.server)

    def client_connected(self, client: connection.Client) -> None:
        self.open_requests[client.id] = 0
        self.deadlines.arm(client.id, CLIENT_HEADERS, self._bound("client_header"), client)

    def client_disconnected(self, client: connection.Client) -> None:
        self.open_requests.pop(client.id, None)
        self.deadlines.disarm(client.id)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # The CONNECT head is complete: the tunnel's first request is due in a full bound.
        client = flow.client_conn
        if self.open_requests.get(client.id) == 0:
            self.deadlines.arm(client.id, CLIENT_HEADERS, self._bound("client_header"), client)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        cid = flow.client_conn.id
        if cid in self.open_requests and flow.id not in self.counted:
            self.open_requests[cid] += 1
            self.counted.add(flow.id)
            self.deadlines.disarm(cid, CLIENT_HEADERS)

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if settled(flow):
            return
        # every check let it through: it goes upstream now
        self.deadlines.arm(flow.id, UPSTREAM_FIRST_BYTE, self._bound("upstream_response"), flow)
        inner = flow.request.stream
        if not inner:
            return
        # a streamed upload (RequestBodies): the request hook ran before its body, so the clock
        # restarts with every chunk sent — a long upload is not an upstream that never answers
        touch, key = self.deadlines.touch, flow.id

        def sending(chunk: bytes) -> Any:
            touch(key, UPSTREAM_FIRST_BYTE)
            return inner(chunk) if callable(inner) else chunk

        flow.request.stream = sending

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self.deadlines.disarm(flow.id, UPSTREAM_FIRST_BYTE)
        if flow.response is None or flow.error or not flow.live:
            return
        self.deadlines.arm(flow.id, UPSTREAM_IDLE, self._bound("upstream_idle"), flow)
        inner = flow.response.stream
        if not inner:
            return  # buffered: the whole body is due within the bound
        touch, key = self.deadlines.touch, flow.id

        def watched(chunk: bytes) -> Any:
            touch(key, UPSTREAM_IDLE)
            return inner(chunk) if callable(inner) else chunk
        flow.response.stream = watched

    def response(self, flow: http.HTTPFlow) -> None:
        self.deadlines.disarm(flow.id)
        if flow.websocket is None:  # a websocket stays open on its connection until it ends
            self._finished(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.deadlines.disarm(flow.id)
        self._finished(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def _finished(self, flow: http.HTTPFlow) -> None:
        if flow.id not in self.counted:
            return
        self.counted.discard(flow.id)
        client = flow.client_conn
        left = self.open_requests.get(client.id)
        if left is None:
            return
        self.open_requests[client.id] = left = max(0, left - 1)
        if left == 0:  # the next request's headers are due in a full bound
            self.deadlines.arm(client.id, CLIENT_HEADERS, self._bound("client_header"), client)


def _close_server(flow: http.HTTPFlow) -> bool:
    """Close the flow's upstream connection only: the agent's connection stays, and the
    HTTP layer reports the loss to the flow (answered by UpstreamErrors)."""
    proxyserver: Any = ctx.master.addons.get("proxyserver") if ctx.master else None
    handler = getattr(proxyserver, "connections", {}).get(flow.client_conn.id)
    if handler is None or flow.server_conn not in handler.transports:
        return False
    _close_now(handler, flow.server_conn)
    return True
