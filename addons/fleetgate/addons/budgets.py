"""BudgetGuard: hard and soft spend limits per agent, role, session, user or fleet.

``request`` (LLM calls the rules allowed): every budget that applies reserves the call's
estimated cost — estimated input plus ``max_tokens`` (or the configured default), priced by the
pricing table — against spend (SQLite, survives restarts and reloads) plus what in-flight
calls already reserved. A hard limit that would be passed refuses the call with a 429 that
says which budget, what is spent and when it refills, and ``x-should-retry: false`` when that
is not soon. When the call ends the reservation is replaced by the metered cost; crossing a
soft limit logs a WARNING and counts ``fleetgate_budget_soft_exceeded_total``. Reservations
and spend live in the :class:`fleetgate.runtime.reservations.ReservationBook` (shared with
the rate limiter and the meter); this addon opens the spend store the options name, turns
flows into facts and outcomes into answers and metrics.

A reservation is written to the store (off the event loop) before the call is forwarded; the
hook waits for it at most ``fleetgate_state_wait_ms``. A store that cannot record it (disk
full, read-only, I/O error, locked past the wait) refuses the calls a budget governs with
``503 budget.state`` naming the budget and the cause: a budget that cannot count is not
enforced by letting calls through. Reservations a crash left open are charged at startup,
logged (WARNING, ``outcome=lost-in-crash``) and counted.

With ``fleetgate_state`` naming Redis, every replica reserves against the fleet's spend and
reservations in one atomic script (awaited with the same bound; Redis failing or slow is the
same 503 ``budget.state``), settles from a task, and every few seconds renews its calls'
reservations and sweeps those whose gateway died: each is charged its reserved amount once,
by whichever replica finds it first, logged and counted as ``lost-in-crash`` there.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http

from fleetgate.addons.flowtools import allowed, deny, fail_closed, metered_tokens
from fleetgate.addons.limit_facts import limit_activation, llm_facts, reserved_tokens
from fleetgate.addons.report_mode import note_would_deny
from fleetgate.addons.state import cut_of, decision_of, identity_of, llm_usage_of
from fleetgate.celexpr import Activation
from fleetgate.errors import StateError
from fleetgate.limits.budget import Refusal
from fleetgate.llm.usage import Usage
from fleetgate.metrics import GatewayMetrics, LabelBudget
from fleetgate.policy.model import Budget
from fleetgate.rule import Mode, WouldDeny
from fleetgate.runtime.listeners import HttpListener
from fleetgate.runtime.policy import PolicyService
from fleetgate.runtime.reservations import ReservationBook
from fleetgate.runtime.reservations_spend import Settled, SpendOutcome, applicable_budgets
from fleetgate.runtime.shared import SharedState
from fleetgate.stores.redis_spend import Swept
from fleetgate.stores.spend import SqliteSpendStore

log = logging.getLogger("fleetgate.budgets")

BUDGETS = "fleetgate.budgets"

SWEEP_EVERY = 2.0  # seconds between renewals of live reservations and sweeps (Redis)
EXPIRY_MARGIN = 5.0  # seconds past the response bound a reservation outlives its last renewal


class BudgetGuard:
    def __init__(self, store: PolicyService, metrics: GatewayMetrics, book: ReservationBook,
                 health: HttpListener | None = None, shared: SharedState | None = None) -> None:
        self.shared = shared
        self._task: asyncio.Task[None] | None = None
        self._settling: set[asyncio.Task[None]] = set()
        self.store = store
        self.metrics = metrics
        self.book = book
        self.spend = book.spend
        self.key_labels = LabelBudget(1000)
        self._report_holds: dict[str, list[str]] = {}  # flow id -> report-mode reservations
        if health is not None:
            health.routes.get("/budgets", lambda: self.spend.report(self.store.policy))
        store.add_status("budgets", lambda: self.spend.journal.status())
        self.spend.journal.on_error, self.spend.journal.on_ok = self._state_error, self._state_ok
        metrics.state_ok.labels(store="spend").set(1)

    def load(self, loader: Any) -> None:
        loader.add_option(
            "fleetgate_state_wait_ms", int, 2000,
            "Milliseconds a budgeted call waits for its reservation to be written to the spend "
            "store (locked by another process, slow disk) before it is refused with 503 "
            "budget.state. Calls no budget governs never wait.")

    def configure(self, updated: set[str]) -> None:
        if "fleetgate_state_wait_ms" in updated and ctx.options.fleetgate_state_wait_ms < 1:
            raise exceptions.OptionsError("fleetgate_state_wait_ms must be >= 1")
        if self.shared is not None and {"fleetgate_state", "fleetgate_state_password_file",
                                        "fleetgate_state_prefix"} & updated:
            self.spend.use_shared(self.shared if self.shared.enabled else None)
        if "fleetgate_state_dir" in updated:
            d = ctx.options.fleetgate_state_dir
            try:
                spend = SqliteSpendStore(Path(d) / "budgets.sqlite" if d else None)
                old = self.spend.use_store(spend)
            except Exception as exc:
                raise exceptions.OptionsError(f"fleetgate_state_dir: cannot open budget state "
                                              f"in {d!r}: {exc}") from None
            old.close()
            self.metrics.state_ok.labels(store="spend").set(1)
            for r in self.spend.journal.recovered:
                self.metrics.budget_lost_in_crash.labels(budget=r.budget).inc()
                # WARNING, not ERROR: mitmdump exits on an ERROR logged during startup
                log.warning("fleetgate: budget %s: a call in flight when the gateway stopped (flow "
                          "%s, key %r, reserved $%.6f and %d tokens at %s) was never settled; "
                          "charged its reservation, outcome=lost-in-crash", r.budget, r.flow,
                          r.key, r.amount.usd, r.amount.tokens,
                          time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.created)))

    def _state_error(self, op: str, message: str) -> None:
        """The spend store failed (writer thread or event loop): metrics and an ERROR line."""
        self.metrics.state_errors.labels(store="spend", op=op).inc()
        self.metrics.state_ok.labels(store="spend").set(0)
        log.error("fleetgate: budget spend store: %s failed: %s; calls a budget governs are "
                  "refused (503 budget.state) until it works again", op, message)

    def _state_ok(self) -> None:
        self.metrics.state_ok.labels(store="spend").set(1)
        log.warning("fleetgate: budget spend store works again; budgeted calls are admitted")

    def running(self) -> None:
        if self._task is None and self.shared is not None:
            self._task = asyncio.get_running_loop().create_task(self._sweeper())

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.book.close()

    @staticmethod
    def _ttl() -> float:
        """How long a reservation outlives its last renewal: the gateway's bound on an
        answer's headers, plus a margin for clock skew between replicas."""
        return float(getattr(ctx.options, "fleetgate_upstream_response_timeout", 300)) + EXPIRY_MARGIN

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            try:
                for r in await self.spend.tick(self._ttl()):
                    self._lost(r)
            except Exception:  # the loop must outlive any one failure; tick reports Redis's
                log.exception("fleetgate: budget sweep failed")

    def _lost(self, r: Swept) -> None:
        self.metrics.budget_lost_in_crash.labels(budget=r.budget).inc()
        log.warning("fleetgate: budget %s: a call in flight on replica %s (flow %s, key %r, "
                    "reserved $%.6f and %d tokens at %s) was never settled and its reservation "
                    "expired; charged its reservation, outcome=lost-in-crash", r.budget,
                    r.replica, r.flow, r.key, r.amount.usd, r.amount.tokens,
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.created)))

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        policy = self.store.policy
        decision = allowed(flow)
        llm = llm_facts(flow)
        if policy is None or decision is None or llm is None:
            return  # budgets count LLM spend
        every = applicable_budgets(policy, list(decision.get("profiles") or ()))
        if not every:
            return
        budgets = [b for b in every if b.mode is Mode.ENFORCE]
        report = [b for b in every if b.mode is Mode.REPORT]
        ident = identity_of(flow)
        est_in, max_out = reserved_tokens(llm)
        usd = policy.pricing.cost(str(llm.get("model") or ""), Usage(input=est_in, output=max_out))
        who = ident.as_dict() if ident else {}
        act = limit_activation(flow, every)
        if budgets:
            await self._enforce(flow, budgets, llm, who, usd, est_in + max_out, act)
        if report and allowed(flow) is not None:  # what a budget refused is spent nowhere
            self._report(flow, report, llm, who, usd, est_in + max_out, act)

    def _report(self, flow: http.HTTPFlow, budgets: list[Budget], llm: dict[str, Any],
                who: dict[str, Any], usd: float | None, tokens: int,
                act: Activation | None) -> None:
        """Report-mode budgets, each on its own: reserve (their spend is their own, by id),
        report what would have been refused, never refuse. In this gateway's memory and
        spend store even with Redis; no write-ahead (a crash loses a report reservation)."""
        would: list[WouldDeny] = []
        for b in budgets:
            key = f"{flow.id}|{b.id}"
            outcome = self.spend.reserve(key, [b], who=who, usd=usd, tokens=tokens, act=act)
            if outcome.failed is not None and outcome.error is not None:
                would.append(WouldDeny(b.id, f"budget {b.id} could not be evaluated "
                                       f"({outcome.error})", 500))
            elif outcome.failed is not None and outcome.unpriced:
                would.append(WouldDeny(b.id, f"model {llm.get('model')!r} has no price in "
                                       f"llm.pricing, so USD budget {b.id} cannot be enforced"))
            elif outcome.failed is not None and outcome.refusal is not None:
                reason, _, _ = refusal_text(b, outcome.key, outcome.refusal, outcome.now)
                would.append(WouldDeny(b.id, reason, 429))
            elif outcome.held:
                self._report_holds.setdefault(flow.id, []).append(key)
                flow.metadata.setdefault(BUDGETS, []).extend(
                    {**h.as_dict(), "mode": "report"} for h in outcome.held)
        if would:
            note_would_deny(flow, self.metrics, would)

    async def _enforce(self, flow: http.HTTPFlow, budgets: list[Budget], llm: dict[str, Any],
                       who: dict[str, Any], usd: float | None, tokens: int,
                       act: Activation | None) -> None:
        outcome: SpendOutcome
        if self.spend.redis is not None:
            outcome = await self.spend.reserve_shared(
                flow.id, budgets, who=who, usd=usd, tokens=tokens, act=act,
                ttl=self._ttl(), wait=ctx.options.fleetgate_state_wait_ms / 1000)
        else:
            outcome = self.spend.reserve(flow.id, budgets, who=who, usd=usd,
                                         tokens=tokens, act=act)
        b = outcome.failed
        if b is not None and outcome.state is not None:
            self._state_refuse(flow, b, f"the shared budget state could not record it "
                                        f"({outcome.state})")
        elif b is not None and outcome.error is not None:
            deny(flow, 500, b.id, f"budget {b.id} could not be evaluated ({outcome.error}); "
                 "denied rather than unlimited", hint="report this to the gateway operator")
        elif b is not None and outcome.unpriced:
            deny(flow, 403, b.id, f"model {llm.get('model')!r} has no price in llm.pricing, "
                 f"so USD budget {b.id} cannot be enforced", hint="use a priced model, or ask "
                 "an operator to add its price to llm.pricing")
        elif b is not None and outcome.refusal is not None:
            self._refuse(flow, b, outcome.key, outcome.refusal, outcome.now)
        elif outcome.held:
            flow.metadata[BUDGETS] = [h.as_dict() for h in outcome.held]
            if self.spend.redis is None:  # Redis: the script already made it durable
                await self._write_ahead(flow, outcome.held[0].budget, outcome.now)

    async def _write_ahead(self, flow: http.HTTPFlow, b: Budget, now: float) -> None:
        """Make the reservation durable before the call is forwarded, or refuse it."""
        wait = ctx.options.fleetgate_state_wait_ms / 1000
        cause = None
        try:
            fut = self.spend.write_ahead(flow.id, now)
            if fut is not None:
                await asyncio.wait_for(asyncio.wrap_future(fut), wait)
        except TimeoutError:
            cause = f"the budget store did not answer within {wait * 1000:g} ms"
            self.spend.journal.failed("reserve", cause)
        except StateError as exc:
            cause = f"the budget store could not record it ({exc})"
        if cause is None:
            return
        self.spend.abandon(flow.id)
        flow.metadata.pop(BUDGETS, None)
        self._state_refuse(flow, b, cause)

    @staticmethod
    def _state_refuse(flow: http.HTTPFlow, b: Budget, cause: str) -> None:
        deny(flow, 503, "budget.state", f"budget {b.id} cannot be enforced: this call's "
             f"reservation was not saved: {cause}; refused rather than unlimited",
             hint="retry later; the gateway operator sees this in /healthz/ready (state)",
             headers={"Retry-After": "5"})

    def _refuse(self, flow: http.HTTPFlow, b: Budget, key: str, r: Refusal, now: float) -> None:
        self.metrics.budget_rejections.labels(budget=b.id).inc()
        wait = max(1, math.ceil(r.resets_at - now))
        reason, left_s, when = refusal_text(b, key, r, now)
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
        used = metered_tokens(flow)
        cost = (llm_usage_of(flow) or {}).get("cost_usd")
        sent = bool(flow.server_conn and flow.server_conn.timestamp_start)
        refused = not (decision_of(flow) or {}).get("allow", True) and not cut_of(flow)
        for key in self._report_holds.pop(flow.id, ()):
            self._record(self.spend.settle(key, used, None if cost is None else float(cost),
                                           charge=sent and not refused))
        if self.spend.redis is not None and self.spend.holding(flow.id):
            pending = self.spend.settle_shared(flow.id, used, None if cost is None else float(cost),
                                               charge=sent and not refused)
            if pending is not None:
                task = asyncio.get_running_loop().create_task(self._settled_later(pending))
                self._settling.add(task)
                task.add_done_callback(self._settling.discard)
        else:
            self._record(self.spend.settle(flow.id, used, None if cost is None else float(cost),
                                           charge=sent and not refused))
        for rec in flow.metadata.get(BUDGETS) or []:
            rec["settled"] = used is not None

    async def _settled_later(self, pending: Awaitable[list[Settled] | None]) -> None:
        self._record(await pending)  # never raises: failures are reported by the service

    def _record(self, settled: list[Settled] | None) -> None:
        if not settled:
            return  # nothing held, or released (refused later, never reached the provider)
        for s in settled:
            self._soft(s)
            label = {"budget": s.hold.budget.id, "key": self.key_labels(s.hold.key)}
            self.metrics.budget_spend_usd.labels(**label).set(s.after.usd)
            self.metrics.budget_spend_tokens.labels(**label).set(s.after.tokens)
            spec = s.hold.budget.spec
            if spec.hard_usd is not None:
                self.metrics.budget_remaining_usd.labels(**label).set(spec.hard_usd - s.after.usd)
            if spec.hard_tokens is not None:
                self.metrics.budget_remaining_tokens.labels(**label).set(
                    spec.hard_tokens - s.after.tokens)

    def _soft(self, s: Settled) -> None:
        spec = s.hold.budget.spec
        unit = spec.over(s.after, hard=False)
        if unit is None or spec.over(s.before, hard=False) == unit:
            return
        self.metrics.budget_soft.labels(budget=s.hold.budget.id).inc()
        log.warning("fleetgate: soft budget %s crossed for %r: %s (soft limit %s)",
                    s.hold.budget.id, s.hold.key,
                    f"${s.after.usd:.4f}" if unit == "usd" else f"{s.after.tokens} tokens",
                    f"${spec.soft_usd:g}" if unit == "usd" else f"{spec.soft_tokens} tokens")


def refusal_text(b: Budget, key: str, r: Refusal, now: float) -> tuple[str, str, str]:
    """Why budget ``b`` refuses a call (the reason), what is left, and when it refills."""
    if r.unit == "usd":
        limit = b.spec.hard_usd or 0.0
        used, asked = r.spent.usd + r.promised.usd, r.asked.usd
        state = f"${used:.4f} of ${limit:g} spent or reserved, this call may cost up to ${asked:.4f}"
        left_s = f"${max(0.0, limit - used):.4f}"
    else:
        limit_t = b.spec.hard_tokens or 0
        used_t = r.spent.tokens + r.promised.tokens
        state = (f"{used_t:,} of {limit_t:,} tokens spent or reserved, this call may use up "
                 f"to {r.asked.tokens:,}")
        left_s = f"{max(0, limit_t - used_t):,} tokens"
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.resets_at))
    reason = (f"budget {b.id} ({b.spec.describe()}) for {key!r} would be exceeded: {state}; "
              f"it refills at {when}")
    return reason, left_s, when
