"""ConnectionGuard: refuse what would let traffic bypass fleetgate.

mitmproxy's built-in addons run *after* ours, and some of them move a flow after we decided
(``map_remote``) or never show it to us at all (``ignore_hosts``, ``tcp_hosts``...). Those
options are refused at startup. Traffic we cannot inspect (raw TCP, UDP, QUIC) is closed.
Upstream connections are opened lazily, only after a request inside the tunnel was allowed.
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import ctx, exceptions, tcp, udp

from fleetgate.addons.flowtools import fail_closed
from fleetgate.addons.state import set_comment
from fleetgate.metrics import GatewayMetrics

log = logging.getLogger(__name__)

# option -> why it is refused
BYPASS_OPTIONS = {
    "ignore_hosts": "passes TLS through uninspected",
    "allow_hosts": "passes other hosts' TLS through uninspected",
    "tcp_hosts": "turns HTTP into uninspected raw TCP",
    "udp_hosts": "turns traffic into uninspected raw UDP",
    "map_remote": "rewrites the destination after fleetgate decided",
    "map_local": "answers from local files without a decision",
    "modify_headers": "changes requests after fleetgate decided",
    "modify_body": "changes requests after fleetgate decided",
    "proxyauth": "fleetgate does its own proxy authentication",
    "rfile": "replays flows that were never authorized",
    "server_replay": "answers without the real upstream",
}


class ConnectionGuard:
    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def configure(self, updated: set[str]) -> None:
        o = ctx.options
        for name, why in BYPASS_OPTIONS.items():
            if name in updated and hasattr(o, name) and getattr(o, name):
                raise exceptions.OptionsError(
                    f"fleetgate refuses option {name!r}: it {why}. Unset it.")
        if "mode" in updated:
            for mode in o.mode:
                if not (mode == "regular" or mode.startswith("regular@")):
                    raise exceptions.OptionsError(
                        f"fleetgate runs only as a regular (HTTPS_PROXY) proxy, not {mode!r}: "
                        "other modes carry no proxy credentials to identify the agent")
        if "validate_inbound_headers" in updated and not o.validate_inbound_headers:
            raise exceptions.OptionsError(
                "fleetgate refuses validate_inbound_headers=false: mitmproxy would then pass "
                "requests with two Content-Length headers, or Transfer-Encoding and "
                "Content-Length, whose body the gateway and the server could frame differently")
        if "connection_strategy" in updated and o.connection_strategy != "lazy":
            # Eager would dial the CONNECT target before any request was authorized.
            o.connection_strategy = "lazy"

    @fail_closed
    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        self._close(flow, "raw-tcp")

    @fail_closed
    def udp_start(self, flow: udp.UDPFlow) -> None:
        self._close(flow, "raw-udp")

    @fail_closed
    def tls_clienthello(self, data: Any) -> None:
        # Nothing may turn interception off for a connection (ignore_hosts does via this hook;
        # a crash here leaves it off too: see flowtools._fail).
        data.ignore_connection = False

    def _close(self, flow: Any, reason: str) -> None:
        if flow.killable:  # first: nothing after this may let the connection run
            flow.kill()
        self.metrics.connections_refused.labels(reason=reason).inc()
        log.info("fleetgate: closing %s connection from %s: fleetgate only carries HTTP(S)",
                 reason, flow.client_conn.peername)
        flow.marked = ":no_entry:"
        set_comment(flow, f"denied: {reason} is not inspected, so it is not allowed")
