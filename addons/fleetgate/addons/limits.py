"""RateLimiter: the seed's ``localRateLimit`` per agent, enforced before anything is forwarded.

``request`` (after the rules and MCP judged the flow): every limit that applies (the top-level
``policies`` and those of the agent's profiles, filtered by their ``when``) takes from its
bucket — one per identity unless the limit's ``key`` says otherwise. ``type: requests`` takes
1; ``type: tokens`` applies to LLM calls and reserves the estimated input plus ``max_tokens``
(or ``fleetgate_limits_default_max_tokens``). All must pass; if one refuses, what the others
took is given back and the agent gets a 429 its SDK understands. When the call ends, token
reservations are settled to the usage the LLM meter recorded. The buckets and the holds live
in the :class:`fleetgate.runtime.reservations.ReservationBook` (shared with budgets and the
meter); this addon turns flows into facts and outcomes into answers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, exceptions, http

from fleetgate.addons.flowtools import allowed, deny, fail_closed, metered_tokens
from fleetgate.addons.limit_facts import limit_activation, llm_facts, reserved_tokens
from fleetgate.addons.state import HEADER, agent_of, decision_id, mcp_of, record_decision
from fleetgate.limits.bucket import Buckets, LimitKind, Take
from fleetgate.metrics import GatewayMetrics, LabelBudget
from fleetgate.policy.model import RateLimit
from fleetgate.runtime.listeners import HttpListener
from fleetgate.runtime.policy import PolicyService
from fleetgate.runtime.reservations import ReservationBook
from fleetgate.runtime.reservations_rate import applicable_limits, duration_text
from fleetgate.wire import jsonrpc_error

LIMITS = "fleetgate.limits"
RATE_LIMITED = -32005  # JSON-RPC error for an MCP request refused by a rate limit


class RateLimiter:
    def __init__(self, store: PolicyService, metrics: GatewayMetrics, book: ReservationBook,
                 health: HttpListener | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.rates = book.rates
        self.key_labels = LabelBudget(1000)
        if health is not None:
            health.routes.get("/limits", self.rates.snapshot)

    @property
    def buckets(self) -> Buckets:
        return self.rates.buckets

    @property
    def clock(self) -> Callable[[], float]:
        return self.rates.clock

    def load(self, loader: Any) -> None:
        loader.add_option(
            "fleetgate_limits_default_max_tokens", int, 4096,
            "Output tokens a token limit reserves for an LLM request that sets no max_tokens "
            "(settled to the real usage when the answer ends).")
        loader.add_option(
            "fleetgate_limits_no_retry_after", int, 60,
            "A 429 whose wait is longer than this many seconds (or that can never pass) says "
            "'x-should-retry: false', so SDKs do not retry it by themselves.")

    def configure(self, updated: set[str]) -> None:
        if ("fleetgate_limits_default_max_tokens" in updated
                and ctx.options.fleetgate_limits_default_max_tokens <= 0):
            raise exceptions.OptionsError("fleetgate_limits_default_max_tokens must be > 0")

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        policy = self.store.policy
        decision = allowed(flow)
        if policy is None or decision is None:
            return
        limits = applicable_limits(policy, list(decision.get("profiles") or ()))
        if not limits:
            return
        llm = llm_facts(flow)
        outcome = self.rates.reserve(flow.id, limits, agent=agent_of(flow),
                                     llm_tokens=None if llm is None else sum(reserved_tokens(llm)),
                                     act=limit_activation(flow, limits))
        for h in outcome.held:
            self._gauge(h.limit.id, h.key, h.take.remaining)
        lim = outcome.failed
        if lim is not None and outcome.error is not None:
            deny(flow, 500, lim.id, f"rate limit {lim.id} could not be evaluated "
                 f"({outcome.error}); denied rather than unlimited",
                 hint="report this to the gateway operator")
        elif lim is not None and outcome.take is not None:
            self._refuse(flow, lim, outcome.key, outcome.needed, outcome.take)
        elif outcome.held:
            flow.metadata[LIMITS] = [h.as_dict() for h in outcome.held]

    def _gauge(self, limit: str, key: str, level: float) -> None:
        self.metrics.ratelimit_level.labels(limit=limit, key=self.key_labels(key)).set(level)

    def _refuse(self, flow: http.HTTPFlow, lim: RateLimit, key: str, n: int, take: Take) -> None:
        self.metrics.ratelimit_rejections.labels(limit=lim.id).inc()
        spec = lim.spec
        unit = "requests" if spec.kind is LimitKind.REQUESTS else "tokens"
        every = f"{spec.tokens_per_fill} {unit} every {duration_text(spec.fill_interval)}"
        if take.never:
            reason = (f"rate limit {lim.id} ({spec.max_tokens} {unit} max, {every}) can never "
                      f"allow this request: it needs {n} {unit}")
            hint = "lower max_tokens or the prompt size, or ask an operator to raise the limit"
        else:
            reason = (f"rate limit {lim.id} for {key!r} is exhausted: {take.remaining} of "
                      f"{spec.max_tokens} {unit} left, this request needs {n}; {every}, next "
                      f"fill in {math.ceil(take.reset_after)} s")
            hint = f"retry after {math.ceil(take.retry_after)} s"
        retry = max(1, math.ceil(take.retry_after))
        headers = {
            "Retry-After": str(retry),
            "x-ratelimit-limit": str(spec.max_tokens),
            "x-ratelimit-remaining": str(take.remaining),
            "x-ratelimit-reset": str(math.ceil(take.reset_after)),
        }
        if take.never or take.retry_after > ctx.options.fleetgate_limits_no_retry_after:
            headers["x-should-retry"] = "false"
        meta = mcp_of(flow)
        if meta is not None and meta.get("methods"):
            self._refuse_mcp(flow, lim, reason, hint, headers, meta, retry)
            return
        deny(flow, 429, lim.id, reason, hint=hint, headers=headers)

    @staticmethod
    def _refuse_mcp(flow: http.HTTPFlow, lim: RateLimit, reason: str, hint: str,
                    headers: dict[str, str], meta: dict[str, Any], retry: int) -> None:
        """MCP: a JSON-RPC error per request id, which the agent's MCP client surfaces."""
        did = decision_id(flow)
        errors = [jsonrpc_error(json.loads(k), RATE_LIMITED, f"fleetgate: {reason}. {hint}",
                                rule=lim.id, retry_after=retry, decision_id=did)
                  for k in meta["methods"]]
        body = errors[0] if len(errors) == 1 else errors
        flow.response = http.Response.make(
            429, json.dumps(body).encode(),
            {"Content-Type": "application/json", HEADER: did, **headers})
        record_decision(flow, False, lim.id, reason, 429)
        flow.marked = ":no_entry:"
        flow.comment = f"denied by {lim.id}: {reason}"

    # -- settlement ---------------------------------------------------------------------

    def response(self, flow: http.HTTPFlow) -> None:
        self._settle(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._settle(flow)

    def _settle(self, flow: http.HTTPFlow) -> None:
        used = metered_tokens(flow)
        settled = self.rates.settle(flow.id, used)
        if settled is None:
            return  # nothing held, or no usage known: the reservation stands
        for h, level in settled:
            self._gauge(h.limit.id, h.key, level)
        for rec in flow.metadata.get(LIMITS) or []:
            if rec.get("type") == "tokens":
                rec["used"] = used
