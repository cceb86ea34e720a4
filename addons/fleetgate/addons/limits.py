"""RateLimiter: the seed's ``localRateLimit`` per agent, enforced before anything is forwarded.

``request`` (after the rules and MCP judged the flow): every limit that applies (the top-level
``policies`` and those of the agent's profiles, filtered by their ``when``) takes from its
bucket — one per identity unless the limit's ``key`` says otherwise. ``type: requests`` takes
1; ``type: tokens`` applies to LLM calls and reserves the estimated input plus ``max_tokens``
(or ``fleetgate_limits_default_max_tokens``). All must pass; if one refuses, what the others
took is given back and the agent gets a 429 its SDK understands. When the call ends, token
reservations are settled to the usage the LLM meter recorded.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from mitmproxy import ctx, exceptions, http

from fleetgate.addons.flowtools import (
    CLAIMS,
    HEADER,
    IDENTITY,
    LLM_REQUEST,
    MCP,
    allowed,
    decision_id,
    deny,
    fail_closed,
    metered_tokens,
    record_decision,
)
from fleetgate.addons.rules import PolicyStore
from fleetgate.celexpr import Activation, CelError
from fleetgate.limits.bucket import Bucket, Buckets, LimitKind, Take
from fleetgate.mcp.facts import base_facts
from fleetgate.metrics import GatewayMetrics, HealthServer, LabelBudget
from fleetgate.policy.decide import NOT_LLM
from fleetgate.policy.model import Policy, RateLimit
from fleetgate.policy.normalize import request_facts

LIMITS = "fleetgate.limits"
RATE_LIMITED = -32005  # JSON-RPC error for an MCP request refused by a rate limit


def limit_activation(flow: http.HTTPFlow) -> Activation:
    """What a limit's or budget's ``key`` and ``when`` see: ``jwt``, ``request``, ``llm`` and
    ``mcp`` (the first MCP message's facts; empty facts for other traffic)."""
    req = flow.request
    facts = request_facts(req.method, req.scheme, req.host, req.port, req.path,
                          list(req.headers.items(multi=True)))
    llm = flow.metadata.get(LLM_REQUEST)
    meta = flow.metadata.get(MCP)
    mcp = meta.get("facts") if isinstance(meta, dict) else None
    return Activation({
        "jwt": dict(flow.metadata.get(CLAIMS) or {}),
        "request": facts.to_cel(frozenset({"query", "headers"})),
        "llm": dict(llm) if isinstance(llm, dict) else dict(NOT_LLM),
        "mcp": mcp if isinstance(mcp, dict) else base_facts("", "", "", None),
    })


@dataclass
class _Held:
    limit: RateLimit
    key: str
    bucket: Bucket
    taken: int
    take: Take
    extra: int = 0  # taken mid-stream beyond the reservation


class RateLimiter:
    def __init__(self, store: PolicyStore, metrics: GatewayMetrics,
                 health: HealthServer | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.buckets = Buckets()
        self.clock = time.monotonic
        self._held: dict[str, list[_Held]] = {}
        self.key_labels = LabelBudget(1000)
        self.watch: set[str] = set()  # shared with LlmMeter.watched (see stream_guard)
        if health is not None:
            health.json_routes["/limits"] = lambda: {"buckets": self.buckets.snapshot(self.clock())}

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

    @staticmethod
    def applicable(policy: Policy, profiles: list[str]) -> list[RateLimit]:
        return [*policy.limits, *(lim for p in policy.agents if p.name in profiles for lim in p.limits)]

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        policy = self.store.policy
        decision = allowed(flow)
        if policy is None or decision is None:
            return
        limits = self.applicable(policy, list(decision.get("profiles") or ()))
        if not limits:
            return
        # converting the request for the CEL engine is most of the limiter's cost: only when a
        # limit has a key or a condition to evaluate
        act = (limit_activation(flow)
               if any(lim.key is not None or lim.when is not None for lim in limits) else None)
        raw_llm = flow.metadata.get(LLM_REQUEST)
        llm = raw_llm if isinstance(raw_llm, dict) else NOT_LLM
        agent = str((flow.metadata.get(IDENTITY) or {}).get("agent") or "")
        now = self.clock()
        held: list[_Held] = []
        for lim in limits:
            if lim.spec.kind is LimitKind.TOKENS and not llm.get("is_llm"):
                continue  # token limits count LLM tokens
            try:
                if lim.when is not None and act is not None and not lim.when.evaluate(act):
                    continue
                key = agent if lim.key is None or act is None else str(lim.key.value(act))
            except CelError as exc:
                self._give_back(held, now)
                deny(flow, 500, lim.id, f"rate limit {lim.id} could not be evaluated ({exc}); "
                     "denied rather than unlimited", hint="report this to the gateway operator")
                return
            n = 1
            if lim.spec.kind is LimitKind.TOKENS:
                max_out = int(llm.get("max_tokens") or 0) or \
                    ctx.options.fleetgate_limits_default_max_tokens
                n = int(llm.get("estimated_input_tokens") or 0) + max_out
            bucket = self.buckets.get(lim.id, key, lim.spec, now)
            take = bucket.take(n, now)
            if not take.ok:
                self._give_back(held, now)
                self._refuse(flow, lim, key, n, take)
                return
            held.append(_Held(lim, key, bucket, n, take))
            self._gauge(lim.id, key, take.remaining)
        if held:
            self._held[flow.id] = held
            if any(h.limit.spec.kind is LimitKind.TOKENS for h in held):
                self.watch.add(flow.id)  # count its output as it streams
            flow.metadata[LIMITS] = [{"limit": h.limit.id, "key": h.key, "type": h.limit.spec.kind.value,
                                      "taken": h.taken, "remaining": h.take.remaining} for h in held]

    def _gauge(self, limit: str, key: str, level: float) -> None:
        self.metrics.ratelimit_level.labels(limit=limit, key=self.key_labels(key)).set(level)

    @staticmethod
    def _give_back(held: list[_Held], now: float) -> None:
        for h in held:
            h.bucket.settle(-h.taken, now)

    def _refuse(self, flow: http.HTTPFlow, lim: RateLimit, key: str, n: int, take: Take) -> None:
        self.metrics.ratelimit_rejections.labels(limit=lim.id).inc()
        spec = lim.spec
        unit = "requests" if spec.kind is LimitKind.REQUESTS else "tokens"
        every = f"{spec.tokens_per_fill} {unit} every {_duration(spec.fill_interval)}"
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
        meta = flow.metadata.get(MCP)
        if isinstance(meta, dict) and meta.get("methods"):
            self._refuse_mcp(flow, lim, reason, hint, headers, meta, retry)
            return
        deny(flow, 429, lim.id, reason, hint=hint, headers=headers)

    @staticmethod
    def _refuse_mcp(flow: http.HTTPFlow, lim: RateLimit, reason: str, hint: str,
                    headers: dict[str, str], meta: dict[str, Any], retry: int) -> None:
        """MCP: a JSON-RPC error per request id, which the agent's MCP client surfaces."""
        did = decision_id(flow)
        errors = [{"jsonrpc": "2.0", "id": json.loads(k),
                   "error": {"code": RATE_LIMITED, "message": f"fleetgate: {reason}. {hint}",
                             "data": {"rule": lim.id, "retry_after": retry,
                                      "decision_id": did}}}
                  for k in meta["methods"]]
        body = errors[0] if len(errors) == 1 else errors
        flow.response = http.Response.make(
            429, json.dumps(body).encode(),
            {"Content-Type": "application/json", HEADER: did, **headers})
        record_decision(flow, False, lim.id, reason, 429)
        flow.marked = ":no_entry:"
        flow.comment = f"denied by {lim.id}: {reason}"

    def stream_guard(self, flow: http.HTTPFlow, est_in: int, out: int) -> str | None:
        """While an LLM answer streams: tokens beyond the reservation are taken as they come;
        when the bucket has none left the stream ends there (see LlmMeter.stream_guards)."""
        held = self._held.get(flow.id)
        if not held:
            return None
        now = self.clock()
        for h in held:
            if h.limit.spec.kind is not LimitKind.TOKENS:
                continue
            over = est_in + out - (h.taken + h.extra)
            if over <= 0:
                continue
            if not h.bucket.take(over, now).ok:
                self.metrics.ratelimit_rejections.labels(limit=h.limit.id).inc()
                spec = h.limit.spec
                return (f"{h.limit.id}: rate limit {h.limit.id} for {h.key!r} "
                        f"({spec.tokens_per_fill} tokens every {_duration(spec.fill_interval)}) "
                        f"ran out after {out} output tokens; the rest of the answer was not sent")
            h.extra += over
        return None

    # -- settlement ---------------------------------------------------------------------

    def response(self, flow: http.HTTPFlow) -> None:
        self._settle(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._settle(flow)

    def _settle(self, flow: http.HTTPFlow) -> None:
        held = self._held.pop(flow.id, None)
        self.watch.discard(flow.id)
        if not held:
            return
        used = metered_tokens(flow)
        if used is None:
            return  # no usage known (not an LLM answer, or none recorded): the reservation stands
        now = self.clock()
        for h in held:
            if h.limit.spec.kind is LimitKind.TOKENS:
                h.bucket.settle(used - h.taken - h.extra, now)
                self._gauge(h.limit.id, h.key, h.bucket.level(now))
        for rec in flow.metadata.get(LIMITS) or []:
            if rec.get("type") == "tokens":
                rec["used"] = used


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
