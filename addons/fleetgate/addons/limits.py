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

With ``fleetgate_state=redis://…`` the buckets are the fleet's, in Redis: ``request`` awaits
one script (bounded by ``fleetgate_state_wait_ms``) and a Redis that fails or is slower refuses
the rate-limited call with 503 ``ratelimit.state``; settlements run as tasks. The embedded
default never awaits anything here.

A limit in report mode (``mode: report``, or one of a report-mode profile) counts in buckets
of its own, in this gateway's memory (even with Redis), never in the enforcing ones: when it
runs out the call goes on, and the decision record's ``would_deny`` names it with the 429 it
would have been (:mod:`fleetgate.addons.report_mode`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, exceptions, http

from fleetgate.addons.flowtools import allowed, deny, fail_closed, metered_tokens
from fleetgate.addons.limit_facts import limit_activation, llm_facts, reserved_tokens
from fleetgate.addons.report_mode import note_would_deny
from fleetgate.addons.state import (
    HEADER,
    agent_of,
    decision_id,
    mcp_of,
    record_decision,
    set_comment,
)
from fleetgate.limits.bucket import Buckets, LimitKind, Take
from fleetgate.metrics import GatewayMetrics, LabelBudget
from fleetgate.policy.model import RateLimit
from fleetgate.rule import Mode, WouldDeny
from fleetgate.runtime.listeners import HttpListener
from fleetgate.runtime.policy import PolicyService
from fleetgate.runtime.reservations import ReservationBook
from fleetgate.runtime.reservations_rate import (
    RateReservations,
    applicable_limits,
    duration_text,
)
from fleetgate.wire import jsonrpc_error

LIMITS = "fleetgate.limits"
RATE_LIMITED = -32005  # JSON-RPC error for an MCP request refused by a rate limit
STATE_UNAVAILABLE = -32006  # JSON-RPC error: the shared state could not check the limit
STATE_RULE = "ratelimit.state"  # the rule id of a refusal because Redis could not answer


class RateLimiter:
    def __init__(self, store: PolicyService, metrics: GatewayMetrics, book: ReservationBook,
                 health: HttpListener | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.rates = book.rates
        self.rates.on_level = self._gauge  # a settlement on Redis reports its level later
        self.key_labels = LabelBudget(1000)
        # report-mode limits: their own buckets (memory, this gateway), never the real ones
        self.report_rates = RateReservations(book.rates.clock)
        self._report_holds: dict[str, list[str]] = {}  # flow id -> report reservation keys
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
    async def request(self, flow: http.HTTPFlow) -> None:
        policy = self.store.policy
        decision = allowed(flow)
        if policy is None or decision is None:
            return
        every = applicable_limits(policy, list(decision.get("profiles") or ()))
        if not every:
            return
        limits = [lim for lim in every if lim.mode is Mode.ENFORCE]
        report = [lim for lim in every if lim.mode is Mode.REPORT]
        llm = llm_facts(flow)
        tokens = None if llm is None else sum(reserved_tokens(llm))
        if limits:
            await self._enforce(flow, limits, tokens)
        if report and allowed(flow) is not None:  # what a limit refused counts nowhere
            self._report(flow, report, tokens)

    def _report(self, flow: http.HTTPFlow, limits: list[RateLimit], tokens: int | None) -> None:
        """Each report-mode limit on its own: take from its own bucket, report a refusal."""
        act = limit_activation(flow, limits)
        keys = self._report_holds.setdefault(flow.id, [])
        would: list[WouldDeny] = []
        for lim in limits:
            key = f"{flow.id}|{lim.id}"
            outcome = self.report_rates.reserve(key, [lim], agent=agent_of(flow),
                                                llm_tokens=tokens, act=act)
            if outcome.failed is not None and outcome.error is not None:
                would.append(WouldDeny(lim.id, f"rate limit {lim.id} could not be evaluated "
                                       f"({outcome.error})", 500))
            elif outcome.failed is not None and outcome.take is not None:
                reason, _ = refusal_text(lim, outcome.key, outcome.needed, outcome.take)
                would.append(WouldDeny(lim.id, reason, 429))
            elif outcome.held:
                keys.append(key)
                records = flow.metadata.setdefault(LIMITS, [])
                records.extend({**h.as_dict(), "mode": "report"} for h in outcome.held)
        if would:
            note_would_deny(flow, self.metrics, would)

    async def _enforce(self, flow: http.HTTPFlow, limits: list[RateLimit],
                       tokens: int | None) -> None:
        if self.rates.on_redis:
            outcome = await self.rates.reserve_shared(
                flow.id, limits, agent=agent_of(flow), llm_tokens=tokens,
                act=limit_activation(flow, limits),
                wait=ctx.options.fleetgate_state_wait_ms / 1000)
        else:  # the embedded default: nothing to wait for
            outcome = self.rates.reserve(flow.id, limits, agent=agent_of(flow), llm_tokens=tokens,
                                         act=limit_activation(flow, limits))
        for h in outcome.held:
            self._gauge(h.limit.id, h.key, h.take.remaining)
        lim = outcome.failed
        if lim is not None and outcome.state_error is not None:
            self._unavailable(flow, lim, outcome.state_error)
        elif lim is not None and outcome.error is not None:
            deny(flow, 500, lim.id, f"rate limit {lim.id} could not be evaluated "
                 f"({outcome.error}); denied rather than unlimited",
                 hint="report this to the gateway operator")
        elif lim is not None and outcome.take is not None:
            self._refuse(flow, lim, outcome.key, outcome.needed, outcome.take)
        elif outcome.held:
            flow.metadata[LIMITS] = [h.as_dict() for h in outcome.held]

    def _unavailable(self, flow: http.HTTPFlow, lim: RateLimit, cause: str) -> None:
        """Redis could not answer: the call is refused, never let through uncounted."""
        self.metrics.ratelimit_state_refusals.labels(limit=lim.id).inc()
        reason = (f"rate limit {lim.id} cannot be enforced: the shared state (Redis) failed "
                  f"({cause}); refused rather than unlimited")
        hint = "retry later; the gateway operator sees this in /healthz/ready (state)"
        headers = {"Retry-After": "5"}
        meta = mcp_of(flow)
        if meta is not None and meta.get("methods"):
            self._refuse_mcp(flow, STATE_RULE, reason, hint, headers, meta, 5, status=503,
                             code=STATE_UNAVAILABLE)
            return
        deny(flow, 503, STATE_RULE, reason, hint=hint, headers=headers)

    def _gauge(self, limit: str, key: str, level: float) -> None:
        self.metrics.ratelimit_level.labels(limit=limit, key=self.key_labels(key)).set(level)

    def _refuse(self, flow: http.HTTPFlow, lim: RateLimit, key: str, n: int, take: Take) -> None:
        self.metrics.ratelimit_rejections.labels(limit=lim.id).inc()
        spec = lim.spec
        reason, hint = refusal_text(lim, key, n, take)
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
            self._refuse_mcp(flow, lim.id, reason, hint, headers, meta, retry)
            return
        deny(flow, 429, lim.id, reason, hint=hint, headers=headers)

    @staticmethod
    def _refuse_mcp(flow: http.HTTPFlow, rule: str, reason: str, hint: str,
                    headers: dict[str, str], meta: dict[str, Any], retry: int,
                    status: int = 429, code: int = RATE_LIMITED) -> None:
        """MCP: a JSON-RPC error per request id, which the agent's MCP client surfaces."""
        did = decision_id(flow)
        errors = [jsonrpc_error(json.loads(k), code, f"fleetgate: {reason}. {hint}",
                                rule=rule, retry_after=retry, decision_id=did)
                  for k in meta["methods"]]
        body = errors[0] if len(errors) == 1 else errors
        flow.response = http.Response.make(
            status, json.dumps(body).encode(),
            {"Content-Type": "application/json", HEADER: did, **headers})
        record_decision(flow, False, rule, reason, status)
        flow.marked = ":no_entry:"
        set_comment(flow, f"denied by {rule}: {reason}")

    # -- settlement ---------------------------------------------------------------------

    def response(self, flow: http.HTTPFlow) -> None:
        self._settle(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._settle(flow)

    def _settle(self, flow: http.HTTPFlow) -> None:
        used = metered_tokens(flow)
        for key in self._report_holds.pop(flow.id, ()):
            self.report_rates.settle(key, used)
        settled = self.rates.settle(flow.id, used)
        if settled is None:
            return  # nothing held, or no usage known: the reservation stands
        for h, level in settled:
            if level is not None:  # on Redis the settlement's task reports it (on_level)
                self._gauge(h.limit.id, h.key, level)
        for rec in flow.metadata.get(LIMITS) or []:
            if rec.get("type") == "tokens":
                rec["used"] = used


def refusal_text(lim: RateLimit, key: str, n: int, take: Take) -> tuple[str, str]:
    """Why ``lim`` refuses a call needing ``n`` (the reason), and what the agent can do."""
    spec = lim.spec
    unit = "requests" if spec.kind is LimitKind.REQUESTS else "tokens"
    every = f"{spec.tokens_per_fill} {unit} every {duration_text(spec.fill_interval)}"
    if take.never:
        return (f"rate limit {lim.id} ({spec.max_tokens} {unit} max, {every}) can never "
                f"allow this request: it needs {n} {unit}",
                "lower max_tokens or the prompt size, or ask an operator to raise the limit")
    return (f"rate limit {lim.id} for {key!r} is exhausted: {take.remaining} of "
            f"{spec.max_tokens} {unit} left, this request needs {n}; {every}, next "
            f"fill in {math.ceil(take.reset_after)} s",
            f"retry after {math.ceil(take.retry_after)} s")
