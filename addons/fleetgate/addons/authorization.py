"""HttpAuthorization: the rules decide every request; the dialled address is re-checked.

The decision itself is :func:`fleetgate.policy.decide.decide` (pure). This addon builds the
request facts, refuses domain fronting (a ``Host`` header or TLS SNI naming another host than
the one dialled), and in ``server_connect`` resolves the destination itself, refuses internal
addresses and pins the connection to the address it checked, so DNS cannot change between
check and dial.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
import weakref
from typing import Any

from mitmproxy import connection, ctx, http

from fleetgate.addons.flowtools import (
    CLAIMS,
    LLM_REQUEST,
    deny,
    fail_closed,
    record_decision,
    settled,
)
from fleetgate.addons.rules import PolicyStore
from fleetgate.metrics import GatewayMetrics, HealthServer
from fleetgate.policy.decide import decide, private_destination_reason
from fleetgate.policy.normalize import normalize_host, request_facts


class HttpAuthorization:
    def __init__(self, store: PolicyStore, metrics: GatewayMetrics,
                 servers: list[HealthServer] | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.servers = servers or []  # our own listeners (metrics, admin): never proxied to
        # (host, port) pairs a request on this client connection was allowed to reach.
        # server_connect dials nothing else: not a raw-TCP tunnel, not a destination
        # some later hook rewrote.
        self.approved: weakref.WeakKeyDictionary[connection.Client, set[tuple[str, int]]] = (
            weakref.WeakKeyDictionary())

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if settled(flow):
            return
        claims = flow.metadata.get(CLAIMS)
        if not isinstance(claims, dict):
            deny(flow, 407, "identity.missing", "request carries no verified identity",
                 headers={"Proxy-Authenticate": 'Basic realm="fleetgate"'})
            return
        policy = self.store.policy
        if policy is None:
            deny(flow, 503, "no-policy", "the gateway has no valid policy loaded",
                 headers={"Retry-After": "5"})
            return
        req = flow.request
        fronting = self._fronting(flow)
        if fronting:
            deny(flow, 403, "host-mismatch", fronting)
            return
        started = time.perf_counter()
        facts = request_facts(req.method, req.scheme, req.host, req.port, req.path,
                              list(req.headers.items(multi=True)))
        llm = flow.metadata.get(LLM_REQUEST)
        decision = decide(policy, claims, facts, llm if isinstance(llm, dict) else None)
        self.metrics.decision_seconds.observe(time.perf_counter() - started)
        if decision.allow:
            record_decision(flow, True, decision.rule, decision.reason,
                            profiles=list(decision.profiles), revision=policy.revision)
            self.approved.setdefault(flow.client_conn, set()).add((req.host, req.port))
        else:
            deny(flow, decision.status, decision.rule, decision.reason)
            flow.metadata["fleetgate.decision"]["profiles"] = list(decision.profiles)

    @staticmethod
    def _fronting(flow: http.HTTPFlow) -> str | None:
        dest = normalize_host(flow.request.host)
        header = flow.request.host_header
        if header:
            hh = header.rsplit(":", 1)[0] if not header.endswith("]") else header
            if normalize_host(hh) != dest:
                return f"Host header {header!r} does not name the destination {dest!r}"
        sni = flow.client_conn.sni
        if sni and normalize_host(sni) != dest:
            return f"TLS SNI {sni!r} does not name the destination {dest!r}"
        return None

    @fail_closed
    async def server_connect(self, data: Any) -> None:
        """Resolve, refuse internal addresses, pin the connection to the checked address."""
        if data.server.error or not data.server.address:
            return
        policy = self.store.policy
        if policy is None:
            data.server.error = "fleetgate: no policy loaded"
            return
        host, port = data.server.address
        if (host, port) not in self.approved.get(data.client, ()):
            self.metrics.connections_refused.labels(reason="unapproved-destination").inc()
            data.server.error = (f"fleetgate refused to connect to {host}:{port}: no request "
                                 "to it was allowed on this connection")
            return
        try:
            ipaddress.ip_address(host)
            addresses = [host]
        except ValueError:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                data.server.error = f"fleetgate: cannot resolve {host}: {exc}"
                return
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for addr in addresses:
            why = private_destination_reason(policy, addr)
            if why is None and self._is_self(addr, port):
                why = f"{addr}:{port} is fleetgate itself"
            if why:
                self.metrics.connections_refused.labels(reason="internal-destination").inc()
                data.server.error = f"fleetgate refused to connect to {host}: {why}"
                return
        data.server.address = (addresses[0], port)

    def error(self, flow: http.HTTPFlow) -> None:
        """A connection we refused in ``server_connect`` is a denial: record it as one."""
        msg = flow.error.msg if flow.error else ""
        if "fleetgate refused to connect" in msg:
            reason = msg.split("Connection killed: ", 1)[-1]
            record_decision(flow, False, "destinations.connect", reason, 502)
            flow.marked = ":no_entry:"
            flow.comment = f"denied by destinations.connect: {reason}"

    def _is_self(self, addr: str, port: int) -> bool:
        ours: list[tuple[str, int]] = []
        ours.extend(s.address for s in self.servers if s.address)
        proxyserver: Any = ctx.master.addons.get("proxyserver") if ctx.master else None
        if proxyserver is not None:
            ours.extend((str(a[0]), int(a[1])) for a in proxyserver.listen_addrs())
        ip = ipaddress.ip_address(addr)
        for host, p in ours:
            if p != port:
                continue
            try:
                ours_ip = ipaddress.ip_address(host or "0.0.0.0")
            except ValueError:
                continue
            if ours_ip == ip or ours_ip.is_unspecified or (ours_ip.is_loopback and ip.is_loopback):
                return True
        return False
