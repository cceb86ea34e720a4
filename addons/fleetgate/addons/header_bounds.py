"""Bounds on header size: no request head may hold the gateway or grow its memory without end.

HeaderBounds (first in the chain, ``requestheaders``): a request with more header fields than
``fleetgate_max_headers`` or a head larger than ``fleetgate_max_header_bytes`` is answered
``431 request.headers``. mitmproxy 12.3.1 bounds neither, and buffers an HTTP/1 head until its
blank line whatever its size, so :func:`install` also wraps ``Http1Server.read_headers`` (once
per process): a head still incomplete past the byte bound is answered 431 and the connection
closed, instead of growing a buffer without end.

The time bounds (slowloris, upstream connect, response and idle) are
:mod:`fleetgate.addons.timeouts`.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import Any

from h11._receivebuffer import ReceiveBuffer
from mitmproxy import ctx, exceptions, http
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers.http import _http1

from fleetgate.addons.flowtools import deny, fail_closed, settled
from fleetgate.addons.state import HEADER
from fleetgate.bounds import head_bytes, header_excess
from fleetgate.decisionlog import new_decision_id
from fleetgate.wire import denial_body

log = logging.getLogger(__name__)

HEADERS_RULE = "request.headers"
_MARK = "_fleetgate_head_bound"
_head_limit = [64 * 1024]  # the byte bound the wrapped HTTP/1 reader applies (per process)


def install() -> None:
    """Bound mitmproxy's HTTP/1 request-head buffer; refuse to start if it cannot be."""
    server_cls: Any = getattr(_http1, "Http1Server", None)
    original = getattr(server_cls, "read_headers", None)
    if original is None:
        raise RuntimeError("fleetgate: this mitmproxy has no Http1Server.read_headers; "
                           "request heads could not be bounded")
    if getattr(original, _MARK, False):
        return

    def read_headers(self: Any, event: Any) -> Generator[Any, Any, None]:
        yield from original(self, event)
        if (getattr(self.state, "__func__", None) is read_headers
                and len(self.buf) > _head_limit[0]):
            did = new_decision_id()
            reason = (f"the request head exceeds {_head_limit[0]} bytes before its end; "
                      "connection closed")
            log.info("fleetgate: %s from %s (decision %s)", reason, self.conn.peername, did)
            resp = http.Response.make(
                431, denial_body(431, HEADERS_RULE, reason, did, "send fewer or smaller headers"),
                {"Content-Type": "application/json", HEADER: did, "Connection": "close"})
            yield commands.SendData(self.conn, http1.assemble_response(resp))
            yield commands.CloseConnection(self.conn)
            self.buf = ReceiveBuffer()  # drop what was read; nothing more is parsed
            self.state = self.done

    setattr(read_headers, _MARK, True)
    server_cls.read_headers = read_headers


class HeaderBounds:
    def load(self, loader: Any) -> None:
        loader.add_option("fleetgate_max_headers", int, 256,
                          "Most header fields a request may carry; more is refused with 431.")
        loader.add_option("fleetgate_max_header_bytes", int, 64 * 1024,
                          "Largest request head (request line and every header) in bytes; "
                          "larger is refused with 431.")
        install()

    def configure(self, updated: set[str]) -> None:
        for name in ("fleetgate_max_headers", "fleetgate_max_header_bytes"):
            if name in updated and getattr(ctx.options, name) < 1:
                raise exceptions.OptionsError(f"{name} must be at least 1")
        if "fleetgate_max_header_bytes" in updated:
            _head_limit[0] = ctx.options.fleetgate_max_header_bytes

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if settled(flow):
            return
        data = flow.request.data
        fields = data.headers.fields
        line = len(data.method) + len(data.authority) + len(data.path) + len(data.http_version)
        reason = header_excess(len(fields), head_bytes(line + 2, fields),
                               ctx.options.fleetgate_max_headers,
                               ctx.options.fleetgate_max_header_bytes)
        if reason:
            deny(flow, 431, HEADERS_RULE, reason, hint="send fewer or smaller headers")
