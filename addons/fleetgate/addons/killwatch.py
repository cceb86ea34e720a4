"""KillWatch: the end of the chain's side of the kill switch.

It registers the flows that will be forwarded in the kill service's live-flow registry (what
a stop sweeps), counts the bytes they receive (the kill log's "how far it got"), and feeds the
trigger engine (request rate, identical requests, denials, errors, tokens, spend, message
depth, delegations), whose firings are applied exactly like an operator's action.
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import http

from fleetgate.addons.flowtools import allowed, fail_closed
from fleetgate.addons.kill_flows import DELEGATION, DEPTH, RX, refuse_stop, subject_of
from fleetgate.addons.report_mode import note_would_deny
from fleetgate.addons.state import decision_of, llm_usage_of
from fleetgate.kill.model import Subject, Verb
from fleetgate.kill.triggers import Event, request_fingerprint
from fleetgate.metrics import GatewayMetrics
from fleetgate.rule import WouldDeny
from fleetgate.runtime.kill import KillService

log = logging.getLogger(__name__)


class KillWatch:
    def __init__(self, kill: KillService, metrics: GatewayMetrics) -> None:
        self.kill = kill
        self.metrics = metrics

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        subject = subject_of(flow)
        if subject is None:
            return
        if self.kill.triggers:
            self._observe_request(flow, subject)
        if allowed(flow):
            self.kill.live.add(flow.id, flow, subject)

    def _observe_request(self, flow: http.HTTPFlow, subject: Subject) -> None:
        decision = decision_of(flow)
        denied = decision is not None and not decision.get("allow")
        if denied and decision is not None and decision.get("rule") in (
                "killswitch.stop", "killswitch.pause"):
            return  # already stopped or held: waiting is not misbehaving (a throttled loop is)
        deleg = flow.metadata.get(DELEGATION) or (None, None)
        fp = None
        if self.kill.fingerprint_requests:  # hashing bodies only when a trigger compares them
            req = flow.request
            fp = request_fingerprint(req.method, req.pretty_host, req.path,
                                     (req.raw_content or b"")[: 1 << 16])
        self._observe(Event.request(subject, fingerprint=fp, denied=denied,
                                    message_depth=flow.metadata.get(DEPTH),
                                    delegation_depth=deleg[0], delegation_fanout=deleg[1]),
                      flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Count what a streamed response has delivered (the kill log's "how far")."""
        if flow.id not in self.kill.live or flow.response is None:
            return
        inner = flow.response.stream
        if not inner:
            return
        flow.metadata[RX] = 0

        def counted(chunk: bytes) -> Any:
            flow.metadata[RX] = flow.metadata.get(RX, 0) + len(chunk)
            return inner(chunk) if callable(inner) else chunk
        flow.response.stream = counted

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:
            self._finished(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def _finished(self, flow: http.HTTPFlow) -> None:
        was_live = self.kill.live.discard(flow.id)
        subject = subject_of(flow)
        if not was_live or subject is None or not self.kill.triggers:
            return
        usage = llm_usage_of(flow)
        tokens, usd = 0, 0.0
        if usage is not None:
            t = usage.get("tokens")
            if isinstance(t, dict):
                tokens = int(t.get("input") or 0) + int(t.get("output") or 0)
            usd = float(usage.get("cost_usd") or 0.0)
        status = flow.response.status_code if flow.response else 0
        error = flow.error is not None or status >= 500
        self._observe(Event.response(subject, error=error, tokens=tokens, usd=usd))

    def _observe(self, event: Event, flow: http.HTTPFlow | None = None) -> None:
        for firing in self.kill.fire(event):
            if firing.report:  # mode: report: say what it would do, put nothing in force
                log.warning("fleetgate: report: would %s %s: %s", firing.verb.value,
                            firing.scope.label, firing.reason)
                status = 503 if firing.verb in (Verb.STOP, Verb.PAUSE) else 429
                would = WouldDeny(f"trigger:{firing.trigger}",
                                  f"would {firing.verb.value} {firing.scope.label}: "
                                  f"{firing.reason}", status)
                if flow is not None:
                    note_would_deny(flow, self.metrics, [would])
                else:
                    self.metrics.would_deny.labels(rule=would.rule).inc()
                continue
            log.warning("fleetgate: %s", firing.reason)
            self.kill.apply(firing.to_action(self.kill.clock()),
                            spare=flow.client_conn if flow is not None else None)
            if flow is not None and firing.verb is Verb.STOP and allowed(flow):
                # the request that tripped the stop is refused, not cut mid-air
                v = self.kill.verdict(event.subject)
                if v is not None:
                    refuse_stop(flow, v, self.metrics)
