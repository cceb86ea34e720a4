"""BudgetGuard: hard and soft spend limits per agent, role, session, user or fleet.

``request`` (LLM calls the rules allowed): every budget that applies reserves the call's
estimated cost — estimated input plus ``max_tokens`` (or the configured default), priced by the
pricing table — against spend (SQLite, survives restarts and reloads) plus what in-flight
calls already reserved. A hard limit that would be passed refuses the call with a 429 that
says which budget, what is spent and when it refills, and ``x-should-retry: false`` when that
is not soon. When the call ends the reservation is replaced by the metered cost; crossing a
soft limit logs a WARNING and counts ``fleetgate_budget_soft_exceeded_total``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http

from fleetgate.addons.flowtools import (
    CUT,
    DECISION,
    IDENTITY,
    LLM_REQUEST,
    LLM_USAGE,
    allowed,
    deny,
    fail_closed,
    metered_tokens,
)
from fleetgate.addons.limits import limit_activation
from fleetgate.addons.rules import PolicyStore
from fleetgate.celexpr import Activation, CelError
from fleetgate.limits.budget import Amount, Ledger, Refusal
from fleetgate.limits.store import SpendStore
from fleetgate.llm.usage import Usage
from fleetgate.metrics import GatewayMetrics, HealthServer, LabelBudget
from fleetgate.policy.model import Budget, Policy

log = logging.getLogger("fleetgate.budgets")

BUDGETS = "fleetgate.budgets"


@dataclass
class _Held:
    budget: Budget
    key: str
    amount: Amount


class BudgetGuard:
    def __init__(self, store: PolicyStore, metrics: GatewayMetrics,
                 health: HealthServer | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.ledger = Ledger(SpendStore(None))
        self.clock = time.time
        self.key_labels = LabelBudget(1000)
        self._held: dict[str, list[_Held]] = {}
        self.watch: set[str] = set()  # shared with LlmMeter.watched (see stream_guard)
        if health is not None:
            health.json_routes["/budgets"] = self.report

    def configure(self, updated: set[str]) -> None:
        if "fleetgate_state_dir" in updated:
            d = ctx.options.fleetgate_state_dir
            try:
                spend = SpendStore(Path(d) / "budgets.sqlite" if d else None)
            except Exception as exc:
                raise exceptions.OptionsError(f"fleetgate_state_dir: cannot open budget state "
                                              f"in {d!r}: {exc}") from None
            old, self.ledger = self.ledger, Ledger(spend)
            old.store.close()

    def done(self) -> None:
        self.ledger.store.close()

    @staticmethod
    def applicable(policy: Policy, profiles: list[str]) -> list[Budget]:
        return [*policy.budgets, *(b for p in policy.agents if p.name in profiles for b in p.budgets)]

    @staticmethod
    def _key(b: Budget, act: Activation | None, ident: dict[str, Any]) -> str:
        if b.key is not None and act is not None:
            return str(b.key.value(act))
        if b.per == "fleet":
            return "fleet"
        value = {"agent": ident.get("agent"), "role": ident.get("role"),
                 "session": ident.get("session")}[b.per]
        if not value:
            raise CelError(f"the identity has no {b.per} claim")
        return str(value)

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        policy = self.store.policy
        decision = allowed(flow)
        llm = flow.metadata.get(LLM_REQUEST)
        if policy is None or decision is None or not isinstance(llm, dict) or not llm.get("is_llm"):
            return  # budgets count LLM spend
        budgets = self.applicable(policy, list(decision.get("profiles") or ()))
        if not budgets:
            return
        act = (limit_activation(flow)  # for CEL keys and conditions only: ~70 µs
               if any(b.key is not None or b.when is not None for b in budgets) else None)
        ident = flow.metadata.get(IDENTITY) or {}
        est_in = int(llm.get("estimated_input_tokens") or 0)
        max_out = int(llm.get("max_tokens") or 0) or ctx.options.fleetgate_limits_default_max_tokens
        est_tokens = est_in + max_out
        usd = policy.pricing.cost(str(llm.get("model") or ""), Usage(input=est_in, output=max_out))
        now = self.clock()
        held: list[_Held] = []
        for b in budgets:
            try:
                if b.when is not None and act is not None and not b.when.evaluate(act):
                    continue
                key = self._key(b, act, ident)
            except CelError as exc:
                self._release(held)
                deny(flow, 500, b.id, f"budget {b.id} could not be evaluated ({exc}); denied "
                     "rather than unlimited", hint="report this to the gateway operator")
                return
            if usd is None and (b.spec.hard_usd is not None or b.spec.soft_usd is not None):
                self._release(held)
                deny(flow, 403, b.id, f"model {llm.get('model')!r} has no price in llm.pricing, "
                     f"so USD budget {b.id} cannot be enforced", hint="use a priced model, or ask "
                     "an operator to add its price to llm.pricing")
                return
            amount = Amount(usd or 0.0, est_tokens)
            refusal = self.ledger.reserve(b.id, key, b.spec, amount, now)
            if refusal is not None:
                self._release(held)
                self._refuse(flow, b, key, refusal, now)
                return
            held.append(_Held(b, key, amount))
        if held:
            self._held[flow.id] = held
            self.watch.add(flow.id)
            flow.metadata[BUDGETS] = [{"budget": h.budget.id, "key": h.key,
                                       "reserved_usd": round(h.amount.usd, 8),
                                       "reserved_tokens": h.amount.tokens} for h in held]

    def _release(self, held: list[_Held]) -> None:
        for h in held:
            self.ledger.release(h.budget.id, h.key, h.amount)

    def _refuse(self, flow: http.HTTPFlow, b: Budget, key: str, r: Refusal, now: float) -> None:
        self.metrics.budget_rejections.labels(budget=b.id).inc()
        wait = max(1, math.ceil(r.resets_at - now))
        if r.unit == "usd":
            limit = b.spec.hard_usd or 0.0
            used, asked = r.spent.usd + r.promised.usd, r.asked.usd
            state = f"${used:.4f} of ${limit:g} spent or reserved, this call may cost up to ${asked:.4f}"
            left = max(0.0, limit - used)
            left_s = f"${left:.4f}"
        else:
            limit_t = b.spec.hard_tokens or 0
            used_t = r.spent.tokens + r.promised.tokens
            state = (f"{used_t:,} of {limit_t:,} tokens spent or reserved, this call may use up "
                     f"to {r.asked.tokens:,}")
            left_s = f"{max(0, limit_t - used_t):,} tokens"
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.resets_at))
        reason = (f"budget {b.id} ({b.spec.describe()}) for {key!r} would be exceeded: {state}; "
                  f"it refills at {when}")
        headers = {"Retry-After": str(wait), "x-ratelimit-remaining": left_s.replace(",", ""),
                   "x-ratelimit-reset": str(wait)}
        if wait > ctx.options.fleetgate_limits_no_retry_after:
            headers["x-should-retry"] = "false"
        deny(flow, 429, b.id, reason, hint=f"{left_s} left; lower max_tokens, or wait until {when}",
             headers=headers)

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
        usage = flow.metadata.get(LLM_USAGE) or {}
        decision = flow.metadata.get(DECISION) or {}
        sent = bool(flow.server_conn and flow.server_conn.timestamp_start)
        refused = not decision.get("allow", True) and not flow.metadata.get(CUT)
        if used is None and (not sent or refused):
            self._release(held)  # refused by a later limit, or never reached the provider
            return
        now = self.clock()
        for h in held:
            if used is not None:
                cost = usage.get("cost_usd")
                actual = Amount(float(cost) if cost is not None else h.amount.usd, used)
            else:
                actual = h.amount  # sent but nothing metered: charge what was reserved (strict)
            before, after = self.ledger.settle(h.budget.id, h.key, h.budget.spec, h.amount,
                                               actual, now)
            self._soft(h, before, after)
            label = {"budget": h.budget.id, "key": self.key_labels(h.key)}
            self.metrics.budget_spend_usd.labels(**label).set(after.usd)
            self.metrics.budget_spend_tokens.labels(**label).set(after.tokens)
            spec = h.budget.spec
            if spec.hard_usd is not None:
                self.metrics.budget_remaining_usd.labels(**label).set(spec.hard_usd - after.usd)
            if spec.hard_tokens is not None:
                self.metrics.budget_remaining_tokens.labels(**label).set(spec.hard_tokens - after.tokens)
        for rec in flow.metadata.get(BUDGETS) or []:
            rec["settled"] = used is not None

    def _soft(self, h: _Held, before: Amount, after: Amount) -> None:
        spec = h.budget.spec
        unit = spec.over(after, hard=False)
        if unit is None or spec.over(before, hard=False) == unit:
            return
        self.metrics.budget_soft.labels(budget=h.budget.id).inc()
        log.warning("fleetgate: soft budget %s crossed for %r: %s (soft limit %s)", h.budget.id,
                    h.key, f"${after.usd:.4f}" if unit == "usd" else f"{after.tokens} tokens",
                    f"${spec.soft_usd:g}" if unit == "usd" else f"{spec.soft_tokens} tokens")

    def stream_guard(self, flow: http.HTTPFlow, est_in: int, out: int) -> str | None:
        """While an LLM answer streams: once the call has used more than it reserved, end it
        at the point where its budget's hard limit is reached (see LlmMeter.stream_guards)."""
        held = self._held.get(flow.id)
        policy = self.store.policy
        if not held or policy is None:
            return None
        llm = flow.metadata.get(LLM_REQUEST) or {}
        usd = policy.pricing.cost(str(llm.get("model") or ""), Usage(input=est_in, output=out))
        now = self.clock()
        for h in held:
            run = Amount(h.amount.usd if usd is None else usd, est_in + out)
            if run.tokens <= h.amount.tokens and run.usd <= h.amount.usd + 1e-12:
                continue  # within its reservation: admission already made room for it
            spec = h.budget.spec
            others = self.ledger.reserved.get((h.budget.id, h.key), Amount()) - h.amount
            if spec.over(self.ledger.spent(h.budget.id, h.key, spec, now) + others + run, hard=True):
                self.metrics.budget_rejections.labels(budget=h.budget.id).inc()
                return (f"{h.budget.id}: budget {h.budget.id} ({spec.describe()}) for {h.key!r} "
                        f"was reached after {out} output tokens; the rest of the answer was not "
                        "sent (set max_tokens so calls fit their budget)")
        return None

    def report(self) -> dict[str, Any]:
        """Spend against each budget, per key (``GET /budgets``)."""
        policy = self.store.policy
        if policy is None:
            return {"budgets": []}
        from fleetgate.limits.budget import counted_since
        now = self.clock()
        out = []
        for b in [*policy.budgets, *(b for p in policy.agents for b in p.budgets)]:
            rows = self.ledger.store.keys(b.id, counted_since(b.spec, now))
            out.append({"budget": b.id, "limit": b.spec.describe(),
                        "hard_usd": b.spec.hard_usd, "soft_usd": b.spec.soft_usd,
                        "hard_tokens": b.spec.hard_tokens, "soft_tokens": b.spec.soft_tokens,
                        "spend": [{"key": k, "usd": round(a.usd, 6), "tokens": a.tokens}
                                  for k, a in rows]})
        return {"budgets": out}
