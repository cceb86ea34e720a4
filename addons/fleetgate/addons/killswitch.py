"""KillSwitch: revoked identities lose their next request and their in-flight flows.

Today the trigger is the rules' ``revoked`` list (a hot edit). The mechanism is the one
later triggers reuse: a registry of live flows and tunnels by identity, and
:meth:`KillSwitch.sweep` that cuts every one a predicate selects, streams included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import http

from fleetgate.addons.flowtools import DECISION, IDENTITY, close_client, cut_flow, fail_closed
from fleetgate.addons.identity import AgentIdentity
from fleetgate.metrics import GatewayMetrics
from fleetgate.policy.model import Policy

log = logging.getLogger(__name__)

Selector = Callable[[dict[str, Any]], str | None]


class KillSwitch:
    def __init__(self, identity: AgentIdentity, metrics: GatewayMetrics) -> None:
        self.identity = identity
        self.metrics = metrics
        self.live: dict[str, http.HTTPFlow] = {}

    # -- registry of in-flight allowed flows ------------------------------------------

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        decision = flow.metadata.get(DECISION)
        if flow.response is None and isinstance(decision, dict) and decision.get("allow"):
            self.live[flow.id] = flow

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:
            self.live.pop(flow.id, None)

    def error(self, flow: http.HTTPFlow) -> None:
        self.live.pop(flow.id, None)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self.live.pop(flow.id, None)

    # -- cutting ----------------------------------------------------------------------

    def sweep(self, rule: str, select: Selector) -> int:
        """Cut every live flow and bound tunnel whose identity ``select`` names a reason for.

        Returns how many flows were cut.
        """
        cut = 0
        for flow in list(self.live.values()):
            ident = flow.metadata.get(IDENTITY)
            why = select(ident) if isinstance(ident, dict) else None
            if why:
                if cut_flow(flow, rule, why):
                    cut += 1
                    self.metrics.flows_cut.labels(rule=rule).inc()
                log.warning("fleetgate: cut flow %s (%s %s) of %s: %s", flow.id,
                            flow.request.method, flow.request.pretty_url,
                            ident.get("agent") if isinstance(ident, dict) else "?", why)
                self.live.pop(flow.id, None)
        for client, bound in list(self.identity.bound.items()):
            why = select({"agent": bound.agent, "jti": bound.jti, "role": bound.role,
                          "session": bound.session})
            if why:
                self.identity.bound.pop(client, None)
                close_client(client)
        return cut

    def on_policy(self, old: Policy | None, new: Policy) -> None:
        """Policy listener: apply a hot-edited ``revoked`` list to work already running."""
        if old is not None and old.revoked == new.revoked:
            return

        def revoked(ident: dict[str, Any]) -> str | None:
            return new.revoked.reason(str(ident.get("agent") or ""), ident.get("jti"),
                                      ident.get("role"), ident.get("session"))

        n = self.sweep("revoked", revoked)
        if n:
            log.warning("fleetgate: revocation cut %d in-flight flow(s)", n)
