"""HttpAuthorization: the rules decide every request; the dialled address is re-checked.

The decision itself is :func:`fleetgate.policy.decide.decide` (pure). This addon builds the
request facts, refuses domain fronting (a ``Host`` header or TLS SNI naming another host than
the one dialled), and in ``server_connect`` resolves the destination itself, refuses internal
addresses and pins the connection to the address it checked, so DNS cannot change between
check and dial.

The pin is undone once the socket is open (``server_connected``): mitmproxy reuses an upstream
connection only for a request whose ``(host, port)`` equals the connection's address, and
limits itself to five open connections per address. Leaving the checked IP there made every
request to a *name* open a new connection and the sixth on a keep-alive tunnel wait forever.
The address actually dialled is kept in ``server.peername``.

``fleetgate_resolve`` (``NAME:PORT=ADDRESS[:PORT]``, like curl's ``--connect-to``) replaces
DNS for the names it lists; the address it gives is judged like a resolved one.

An internal address that ``destinations.allowPrivate`` admits is dialled only for a request
an *explicit* egress entry admitted (:attr:`Decision.named`), never one that only ``*`` or
``*.domain`` admitted. The request hook records, per client connection and destination,
whether every approval was explicit; ``server_connect`` judges the resolved addresses with
it. An open connection to an internal address is not dialled again, so a later request on
the same client connection admitted by a wildcard alone is refused in the request hook.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
import weakref
from collections.abc import Sequence
from typing import Any

from mitmproxy import connection, ctx, exceptions, http

from fleetgate.addons.flowtools import deny, fail_closed, settled
from fleetgate.addons.report_mode import CANARY, note_would_deny
from fleetgate.addons.state import (
    a2a_of,
    add_comment,
    llm_request_of,
    record_decision,
    set_comment,
    verified_claims,
)
from fleetgate.metrics import GatewayMetrics
from fleetgate.netaddr import Endpoint, internal_reason, parse_resolve_overrides
from fleetgate.normalize import RequestFacts, normalize_host, request_facts
from fleetgate.policy.decide import Decision, decide, private_destination_reason
from fleetgate.runtime.canary import CanaryService
from fleetgate.runtime.listeners import HttpListener
from fleetgate.runtime.policy import PolicyService

log = logging.getLogger(__name__)


class HttpAuthorization:
    def __init__(self, store: PolicyService, metrics: GatewayMetrics,
                 servers: list[HttpListener] | None = None,
                 canary: CanaryService | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.canary = canary  # fleetgate_canary_rules: judged beside, never enforced
        self.servers = servers or []  # our own listeners (metrics, admin): never proxied to
        # (host, port) pairs a request on this client connection was allowed to reach.
        # server_connect dials nothing else: not a raw-TCP tunnel, not a destination
        # some later hook rewrote.
        self.approved: weakref.WeakKeyDictionary[connection.Client, set[tuple[str, int]]] = (
            weakref.WeakKeyDictionary())
        # (host, port) -> True while every approval of it on this client connection came
        # from an explicit egress entry (Decision.named): only then may it be dialled at an
        # internal address that allowPrivate admits. Missing means "not named" (fail closed).
        self.named_egress: weakref.WeakKeyDictionary[
            connection.Client, dict[tuple[str, int], bool]] = weakref.WeakKeyDictionary()
        # (host, port) pairs dialled at an internal address on this client connection: a
        # reused connection skips server_connect, so the request hook checks these.
        self.internal_dials: weakref.WeakKeyDictionary[
            connection.Client, set[tuple[str, int]]] = weakref.WeakKeyDictionary()
        # (name, port) -> (address, port) to dial instead of asking DNS (fleetgate_resolve)
        self.overrides: dict[Endpoint, Endpoint] = {}
        # server connection -> the (host, port) the request named, while its dial is pinned
        self.named: weakref.WeakKeyDictionary[connection.Server, tuple[str, int]] = (
            weakref.WeakKeyDictionary())

    def load(self, loader: Any) -> None:
        loader.add_option(
            "fleetgate_resolve", Sequence[str], [],
            "Dial ADDRESS[:PORT] instead of asking DNS for NAME:PORT, as "
            "'NAME:PORT=ADDRESS[:PORT]' (curl's --connect-to). Host header, SNI and "
            "certificate checks keep NAME; the address is judged like a resolved one.")

    def configure(self, updated: set[str]) -> None:
        if "fleetgate_resolve" in updated:
            try:
                self.overrides = parse_resolve_overrides(ctx.options.fleetgate_resolve)
            except ValueError as exc:
                raise exceptions.OptionsError(f"fleetgate_resolve: {exc}") from None

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if settled(flow):
            return
        claims = verified_claims(flow)
        if claims is None:
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
        decision = decide(policy, claims, facts, llm_request_of(flow), a2a_of(flow))
        self.metrics.decision_seconds.observe(time.perf_counter() - started)
        self._apply(flow, decision, policy.revision)
        if decision.would_deny:  # after the answer: a denial's comment keeps the report
            note_would_deny(flow, self.metrics, decision.would_deny)
        if self.canary is not None and self.canary.policy is not None:
            self._compare(flow, claims, facts, decision)

    def _compare(self, flow: http.HTTPFlow, claims: dict[str, Any], facts: RequestFacts,
                 enforced: Decision) -> None:
        """Judge the request with the canary policy too; record where it disagrees. Never
        changes the flow's fate: a canary that crashes is logged, not failed closed."""
        canary = self.canary.policy if self.canary is not None else None
        if canary is None:
            return
        try:
            verdict = decide(canary, claims, facts, llm_request_of(flow), a2a_of(flow))
        except Exception:  # decide is total; a bug in it must still not touch traffic
            log.exception("fleetgate: the canary policy failed to judge a request")
            return
        if verdict.allow == enforced.allow:
            return
        flow.metadata[CANARY] = {"allow": verdict.allow, "rule": verdict.rule,
                                 "reason": verdict.reason, "revision": canary.revision}
        self.metrics.canary_disagreements.labels(rule=verdict.rule).inc()
        add_comment(flow, f"canary: would {'allow' if verdict.allow else 'deny'} by "
                    f"{verdict.rule}: {verdict.reason}")

    def _apply(self, flow: http.HTTPFlow, decision: Decision, revision: str) -> None:
        req = flow.request
        dest = (req.host, req.port)
        if (decision.allow and not decision.named
                and dest in self.internal_dials.get(flow.client_conn, ())):
            deny(flow, 403, "egress.private",
                 f"{req.host}:{req.port} was dialled at an internal address on this connection; "
                 "only a profile whose egress names it explicitly (host, IP or CIDR), not a "
                 "wildcard, may reach it")
            flow.metadata["fleetgate.decision"]["profiles"] = list(decision.profiles)
            return
        if decision.allow:
            record_decision(flow, True, decision.rule, decision.reason,
                            profiles=list(decision.profiles), revision=revision)
            self.approved.setdefault(flow.client_conn, set()).add(dest)
            named = self.named_egress.setdefault(flow.client_conn, {})
            named[dest] = named.get(dest, True) and decision.named
        else:
            deny(flow, decision.status, decision.rule, decision.reason)
            flow.metadata["fleetgate.decision"]["profiles"] = list(decision.profiles)

    @staticmethod
    def _fronting(flow: http.HTTPFlow) -> str | None:
        dest = normalize_host(flow.request.host)
        header = flow.request.host_header
        if header:
            if header.endswith("]") or ":" not in header:
                hh, port = header, None
            else:
                hh, _, port = header.rpartition(":")
            if normalize_host(hh) != dest:
                return f"Host header {header!r} does not name the destination {dest!r}"
            if port is not None and (not port.isdigit() or int(port) != flow.request.port):
                # the server would read that port: an app routing on it saw another request
                return (f"Host header {header!r} names another port than the destination's "
                        f"({flow.request.port})")
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
        dial_port = port
        override = self.overrides.get((normalize_host(host), port))
        if override is not None:
            addresses = [override[0]]
            dial_port = override[1]
        else:
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
        named = self.named_egress.get(data.client, {}).get((host, port), False)
        for addr in addresses:
            why = private_destination_reason(policy, addr, named=named)
            if why is None and self._is_self(addr, dial_port):
                why = f"{addr}:{dial_port} is fleetgate itself"
            if why:
                self.metrics.connections_refused.labels(reason="internal-destination").inc()
                data.server.error = f"fleetgate refused to connect to {host}: {why}"
                return
        if any(internal_reason(ipaddress.ip_address(a)) for a in addresses):
            self.internal_dials.setdefault(data.client, set()).add((host, port))
        if (addresses[0], dial_port) != (host, port):
            self.named[data.server] = (host, port)
            data.server.address = (addresses[0], dial_port)

    def server_connected(self, data: Any) -> None:
        """Give the connection back its name, so mitmproxy reuses it for that name.

        The socket is open to the checked address (``server.peername``); from here on the
        address only serves mitmproxy's reuse lookup, which compares it to the next request's
        ``(host, port)``. ``Server.__setattr__`` refuses any change of address on an open
        connection, to stop addons from re-targeting one; this is not a re-target (the
        socket stays where it is, and the name is the one the request was judged for), so
        the guard is stepped around on purpose. The e2e test of reuse by name
        (``tests/e2e/test_upstream_by_name.py``) fails if mitmproxy stops honouring it.
        """
        named = self.named.pop(data.server, None)
        if named is not None:
            object.__setattr__(data.server, "address", named)

    def server_connect_error(self, data: Any) -> None:
        self.named.pop(data.server, None)

    def error(self, flow: http.HTTPFlow) -> None:
        """A connection we refused in ``server_connect`` is a denial: record it as one."""
        msg = flow.error.msg if flow.error else ""
        if "fleetgate refused to connect" in msg:
            reason = msg.split("Connection killed: ", 1)[-1]
            record_decision(flow, False, "destinations.connect", reason, 502)
            flow.marked = ":no_entry:"
            set_comment(flow, f"denied by destinations.connect: {reason}")

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
