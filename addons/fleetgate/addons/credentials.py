"""CredentialInjector: upstream credentials live in the gateway, never in the agent.

``request`` (flows the rules, MCP governance, budgets and rate limits allowed): the first
``credentials`` route covering the destination (host, port, normalised path; file order) sets
its ``header`` to its ``value`` template filled with the secret, after dropping the agent's
own ``header`` and every header in ``remove``. Providers that accept a key in more than one
header need those listed in ``remove`` so an agent cannot smuggle a key of its own next to
the gateway's: Anthropic ``x-api-key`` when injecting ``Authorization``, Gemini
``x-goog-api-key``, Azure ``api-key``. Only headers are handled: a query parameter such as
Gemini's ``?key=`` is left as the agent sent it.

The secret cannot be read (file missing or empty, variable unset) -> the request is refused
with ``503 credentials.<id>`` and never leaves: fail closed, never the agent's own header
instead. The agent's answer does not say where the secret lives; the gateway log does, once
per outage: WARNING when a policy loads with a route it cannot serve, ERROR when a request
finds a route unusable, INFO when it works again.

The secret is in ``flow.request.headers`` only while the request is sent: ``responseheaders``
(and ``response``/``error``, for flows that never got an upstream answer) replace the value
with ``[injected by fleetgate: <id>]``, before mitmweb's view, the flow dump, the save addon
or the decision log read the flow (mitmweb adds a flow at ``requestheaders``, before the
injection, and updates it at ``response``/``error``). Only an operator who intercepts the flow
in mitmweb between ``request`` and sending would see the value. ``flow.metadata
["fleetgate.credential"]`` and the decision carry the route id, the comment says
``credential <id> injected``. Request bodies are never streamed by fleetgate, so ``request``
always runs before anything is sent upstream.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from fleetgate.addons.flowtools import allowed, deny, fail_closed
from fleetgate.addons.state import add_comment, annotate_decision
from fleetgate.metrics import GatewayMetrics
from fleetgate.policy.credentials import CredentialUnavailable, find_route, redacted
from fleetgate.policy.model import Policy
from fleetgate.runtime.policy import PolicyService
from fleetgate.stores.secrets import SecretSource

log = logging.getLogger(__name__)

CREDENTIAL = "fleetgate.credential"  # the route id (never the value)
CREDENTIAL_HEADER = "fleetgate.credential_header"  # the header to redact once sent


class CredentialInjector:
    def __init__(self, store: PolicyService, metrics: GatewayMetrics,
                 secrets: SecretSource | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.secrets = secrets or SecretSource()
        self.unavailable: set[str] = set()  # route ids whose outage was logged
        self.in_flight: dict[str, http.HTTPFlow] = {}  # injected, not yet redacted
        store.subscribe(self.on_policy)

    def on_policy(self, old: Policy | None, new: Policy) -> None:
        """Policy listener: say at load time which routes cannot be served yet. A WARNING,
        not an ERROR: mitmdump exits on an ERROR logged at startup, and one missing key must
        not take every other route down (its own requests are refused)."""
        for route in new.credentials:
            try:
                self.secrets.read(route)
            except CredentialUnavailable as exc:
                self._down(exc, logging.WARNING)
            else:
                self._up(route.id)

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        policy = self.store.policy
        if policy is None or allowed(flow) is None or not policy.credentials:
            return
        req = flow.request
        route = find_route(policy.credentials, req.host, req.port, req.path)
        if route is None:
            return
        try:
            secret = self.secrets.read(route)
        except CredentialUnavailable as exc:
            self._down(exc, logging.ERROR)
            self.metrics.credentials_unavailable.labels(route=route.id).inc()
            deny(flow, 503, f"credentials.{route.id}",
                 f"the gateway holds no usable upstream credential {route.id!r} for this "
                 "destination, so the request was not sent",
                 hint="a gateway operator must restore it (the gateway log says what is "
                      "missing); sending a key of your own will not help",
                 headers={"x-should-retry": "false"})
            return
        self._up(route.id)
        for name in route.stripped:
            if name in req.headers:
                del req.headers[name]
        req.headers[route.header] = route.render(secret)
        flow.metadata[CREDENTIAL] = route.id
        flow.metadata[CREDENTIAL_HEADER] = route.header
        self.in_flight[flow.id] = flow
        annotate_decision(flow, credential=route.id)
        self.metrics.credentials_injected.labels(route=route.id).inc()

    # -- once the request has left: hide the value --------------------------------------

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._redact(flow)

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        self._redact(flow, note=True)

    def error(self, flow: http.HTTPFlow) -> None:
        self._redact(flow, note=True)

    def done(self) -> None:
        """Shutdown: the save addon writes the flows still in flight; none shows a secret."""
        for flow in list(self.in_flight.values()):
            self._redact(flow)

    def _redact(self, flow: http.HTTPFlow, note: bool = False) -> None:
        self.in_flight.pop(flow.id, None)
        rid, header = flow.metadata.get(CREDENTIAL), flow.metadata.get(CREDENTIAL_HEADER)
        if not isinstance(rid, str) or not isinstance(header, str):
            return
        flow.request.headers[header] = redacted(rid)
        # the comment is written last (response/error): the LLM meter writes its usage comment
        # only on an empty one, and mitmweb shows the flow's comment from its response on
        if note:
            add_comment(flow, f"credential {rid} injected")

    # -- operator log: one line per change of state, not one per request ------------------

    def _down(self, exc: CredentialUnavailable, level: int) -> None:
        if exc.route_id not in self.unavailable:
            self.unavailable.add(exc.route_id)
            log.log(level, "fleetgate: credentials %s cannot be used, its requests are refused "
                    "(503): %s", exc.route_id, exc.why)

    def _up(self, route_id: str) -> None:
        if route_id in self.unavailable:
            self.unavailable.discard(route_id)
            log.info("fleetgate: credentials %s can be used again", route_id)
