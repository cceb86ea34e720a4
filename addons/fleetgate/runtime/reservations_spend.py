"""Budget reservations: what each in-flight LLM call promised against which budget.

A call reserves its estimated cost against every budget that applies (spend in the store +
what other calls in flight promised, see :class:`fleetgate.limits.budget.Ledger`); while its
answer streams, it must end where a hard limit is reached; when it ends, the reservation is
replaced by the metered cost, or released when the call never reached the provider. Spend
lives in a :class:`fleetgate.stores.spend.SpendStore` behind a
:class:`fleetgate.runtime.reservations_journal.SpendJournal` (checks read its in-memory
mirror; reservations are written ahead, settles queued, all off the event loop); this class
keeps the per-flow holds, so the budget addon and the meter share them without reading each
other.

With ``fleetgate_state`` naming Redis (:meth:`SpendReservations.use_shared`), spend and every
replica's reservations live in Redis (:class:`fleetgate.stores.redis_spend.RedisSpendStore`):
:meth:`~SpendReservations.reserve_shared` checks and reserves all of a call's budgets in one
atomic script, :meth:`~SpendReservations.settle_shared` replaces the reservation by the
metered spend (idempotent), :meth:`~SpendReservations.tick` renews this replica's live
reservations and charges expired ones of replicas that died. The mid-stream check then uses
the spend and others' reservations the reserve script saw: concurrent calls can together pass
a hard limit only by what they use beyond their own reservations.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis

from fleetgate.celexpr import Activation, CelError
from fleetgate.errors import StateError
from fleetgate.limits.budget import Amount, BudgetSpec, Ledger, Period, Refusal, counted_since, window
from fleetgate.llm.pricing import PricingTable
from fleetgate.llm.usage import Usage
from fleetgate.policy.model import Budget, Policy
from fleetgate.runtime.reservations_journal import SpendJournal
from fleetgate.runtime.reservations_rate import Overrun
from fleetgate.runtime.shared import SharedState
from fleetgate.stores.redis_spend import HoldRequest, RedisSpendStore, SettleCharge, Swept
from fleetgate.stores.spend import Charge, Reservation, SpendStore

__all__ = ["Settled", "SpendHold", "SpendOutcome", "SpendReservations", "applicable_budgets"]

log = logging.getLogger("fleetgate.budgets")

SWEEP_BATCH = 100  # expired reservations one sweep script charges at a time


@dataclass(frozen=True)
class SpendHold:
    """What one call reserved against one budget's key."""

    budget: Budget
    key: str
    amount: Amount

    def as_dict(self) -> dict[str, Any]:
        """What ``flow.metadata["fleetgate.budgets"]`` and the decision log show."""
        return {"budget": self.budget.id, "key": self.key,
                "reserved_usd": round(self.amount.usd, 8), "reserved_tokens": self.amount.tokens}


class SpendOutcome(NamedTuple):
    """A call's reservation. ``failed`` is ``None`` when every budget had room; otherwise it
    is the budget that refused (``refusal``, ``key``), could not be evaluated (``error``) or
    counts USD for an unpriced model (``unpriced``); nothing stays reserved then. ``now`` is
    the wall-clock time of the check."""

    held: tuple[SpendHold, ...] = ()
    failed: Budget | None = None
    key: str = ""
    refusal: Refusal | None = None
    error: str | None = None
    unpriced: bool = False
    now: float = 0.0
    state: str | None = None  # the shared store could not answer: why (503 budget.state)


@dataclass(frozen=True)
class Settled:
    """A hold replaced by real spend: the key's spend before and after (soft-limit alerts)."""

    hold: SpendHold
    before: Amount
    after: Amount


def applicable_budgets(policy: Policy, profiles: Sequence[str]) -> list[Budget]:
    """The top-level budgets and those of the agent's profiles, in that order."""
    return [*policy.budgets, *(b for p in policy.named(profiles) for b in p.budgets)]


def budget_key(b: Budget, act: Activation | None, who: Mapping[str, str | None]) -> str:
    """Whose spend a call counts in: the ``key`` expression's value, ``fleet``, or the
    identity's ``per`` claim (``CelError`` when the identity has none)."""
    if b.key is not None and act is not None:
        return str(b.key.value(act))
    if b.per == "fleet":
        return "fleet"
    value = {"agent": who.get("agent"), "role": who.get("role"),
             "session": who.get("session")}[b.per]
    if not value:
        raise CelError(f"the identity has no {b.per} claim")
    return str(value)


def _key_of(b: Budget, act: Activation | None, who: Mapping[str, str | None], usd: float | None,
            now: float) -> str | SpendOutcome | None:
    """The key a call counts in for ``b``; ``None``: ``b`` does not apply (``when``); an
    outcome when ``b`` cannot be evaluated or counts USD of an unpriced model."""
    try:
        if b.when is not None and act is not None and not b.when.evaluate(act):
            return None
        key = budget_key(b, act, who)
    except CelError as exc:
        return SpendOutcome(failed=b, error=str(exc), now=now)
    if usd is None and (b.spec.hard_usd is not None or b.spec.soft_usd is not None):
        return SpendOutcome(failed=b, unpriced=True, now=now)
    return key


def resets_at(spec: BudgetSpec, now: float) -> float:
    """When a refused budget has room again (as :meth:`Ledger.reserve` says it)."""
    return float(window(spec, now)[1]) if spec.period is not Period.ROLLING \
        else now + spec.rolling_seconds


def _keep_until(spec: BudgetSpec, now: float) -> int:
    """How long a key's spend must stay in Redis: a day past when it stops counting."""
    return int(resets_at(spec, now)) + 86400


class SpendReservations:
    """The ledger over the spend store, and the holds of the calls in flight."""

    def __init__(self, store: SpendStore, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.journal = SpendJournal(store, clock=clock)
        self.ledger = Ledger(self.journal.mirror)
        self._held: dict[str, list[SpendHold]] = {}
        self.shared: SharedState | None = None  # Redis: reserve_shared/settle_shared/tick
        self.redis: RedisSpendStore | None = None
        # Redis mode: per flow, each hold's spend + others' reservations when it was admitted
        self._snap: dict[str, list[Amount]] = {}
        self._tasks: set[asyncio.Future[Any]] = set()

    def use_store(self, store: SpendStore) -> SpendJournal:
        """Keep spend in ``store`` from now on (``fleetgate_state_dir`` changed); returns the
        previous journal for the caller to close. Reservations start afresh with it; the new
        journal's :attr:`~SpendJournal.recovered` are the reservations a crash left open."""
        journal = SpendJournal(store, clock=self.clock)
        journal.on_error, journal.on_ok = self.journal.on_error, self.journal.on_ok
        old, self.journal, self.ledger = self.journal, journal, Ledger(journal.mirror)
        self._held.clear()
        return old

    def write_ahead(self, flow_id: str, now: float) -> Future[None] | None:
        """Write ``flow_id``'s reservations to the store before the call is forwarded (off
        the event loop: the caller awaits the future with its bound). ``None``: it holds
        nothing. Raises :class:`fleetgate.errors.StateError` when the writer is backed up."""
        held = self._held.get(flow_id)
        if not held:
            return None
        return self.journal.hold([
            Reservation(flow_id, h.budget.id, h.key, window(h.budget.spec, now)[0], h.amount, now)
            for h in held])

    def abandon(self, flow_id: str) -> None:
        """The call is refused after all (its reservation could not be written): give back
        what it holds, and remove any row the writer may still write."""
        held = self._held.pop(flow_id, None)
        if held:
            self._release(held)
            self.journal.settle(flow_id, [], op="release")

    def reserve(self, flow_id: str, budgets: Sequence[Budget], *, who: Mapping[str, str | None],
                usd: float | None, tokens: int, act: Activation | None) -> SpendOutcome:
        """Reserve ``usd`` (``None``: the model has no price) and ``tokens`` for ``flow_id``
        against every budget that applies, all or nothing."""
        now = self.clock()
        held: list[SpendHold] = []
        for b in budgets:
            key = _key_of(b, act, who, usd, now)
            if isinstance(key, SpendOutcome):
                self._release(held)
                return key
            if key is None:
                continue
            amount = Amount(usd or 0.0, tokens)
            refusal = self.ledger.reserve(b.id, key, b.spec, amount, now)
            if refusal is not None:
                self._release(held)
                return SpendOutcome(failed=b, key=key, refusal=refusal, now=now)
            held.append(SpendHold(b, key, amount))
        if held:
            self._held[flow_id] = held
        return SpendOutcome(tuple(held), now=now)

    def _release(self, held: Sequence[SpendHold]) -> None:
        for h in held:
            self.ledger.release(h.budget.id, h.key, h.amount)

    def holding(self, flow_id: str) -> bool:
        return flow_id in self._held

    def overrun(self, flow_id: str, est_in: int, out: int, pricing: PricingTable | None,
                model: str) -> Overrun | None:
        """While an answer streams: once the call has used more than it reserved, it must end
        where its budget's hard limit is reached (``pricing`` ``None``: no policy, no check)."""
        held = self._held.get(flow_id)
        if not held or pricing is None:
            return None
        usd = pricing.cost(model, Usage(input=est_in, output=out))
        now = self.clock()
        snap = self._snap.get(flow_id)  # Redis: spend + others' reservations when admitted
        for i, h in enumerate(held):
            run = Amount(h.amount.usd if usd is None else usd, est_in + out)
            if run.tokens <= h.amount.tokens and run.usd <= h.amount.usd + 1e-12:
                continue  # within its reservation: admission already made room for it
            spec = h.budget.spec
            if snap is not None:
                base = snap[i]
            else:
                others = self.ledger.reserved.get((h.budget.id, h.key), Amount()) - h.amount
                base = self.ledger.spent(h.budget.id, h.key, spec, now) + others
            if spec.over(base + run, hard=True):
                return Overrun("budget", h.budget.id, (
                    f"budget {h.budget.id} ({spec.describe()}) for {h.key!r} was reached after "
                    f"{out} output tokens; the rest of the answer was not sent (set max_tokens "
                    "so calls fit their budget)"))
        return None

    def settle(self, flow_id: str, used: int | None, cost: float | None,
               charge: bool) -> list[Settled] | None:
        """The call ended: ``None`` when it held nothing. Without ``used`` (metered tokens) and
        ``charge`` (it was sent and not refused later), the reservation is released (``[]``).
        Otherwise spend is the metered tokens at ``cost`` (or the reserved USD when unpriced),
        or what was reserved when sent but nothing was metered (strict)."""
        held = self._held.pop(flow_id, None)
        if not held:
            return None
        if used is None and not charge:
            self._release(held)  # refused by a later limit, or never reached the provider
            self.journal.settle(flow_id, [], op="release")
            return []
        now = self.clock()
        out = []
        charges = []
        for h in held:
            if used is not None:
                actual = Amount(cost if cost is not None else h.amount.usd, used)
            else:
                actual = h.amount  # sent but nothing metered: charge what was reserved (strict)
            before, after = self.ledger.settle(h.budget.id, h.key, h.budget.spec, h.amount,
                                               actual, now)
            charges.append(Charge(h.budget.id, h.key, window(h.budget.spec, now)[0], actual))
            out.append(Settled(h, before, after))
        self.journal.settle(flow_id, charges)  # the rows' removal and the spend: one transaction
        return out

    def report(self, policy: Policy | None) -> dict[str, Any]:
        """Spend against each budget, per key (``GET /budgets``; Redis: the fleet's, read
        with the thread-safe client, this runs in an admin thread)."""
        if policy is None:
            return {"budgets": []}
        now = self.clock()
        out = []
        for b in [*policy.budgets, *(b for p in policy.agents for b in p.budgets)]:
            rows = self._report_rows(b.id, counted_since(b.spec, now))
            out.append({"budget": b.id, "limit": b.spec.describe(),
                        "hard_usd": b.spec.hard_usd, "soft_usd": b.spec.soft_usd,
                        "hard_tokens": b.spec.hard_tokens, "soft_tokens": b.spec.soft_tokens,
                        "spend": [{"key": k, "usd": round(a.usd, 6), "tokens": a.tokens}
                                  for k, a in rows]})
        return {"budgets": out}

    def _report_rows(self, budget: str, since: int) -> list[tuple[str, Amount]]:
        shared, store = self.shared, self.redis
        if shared is None or store is None:
            return self.journal.mirror.keys(budget, since)
        try:
            rows = store.report(shared.sync_client(), budget, since)
        except (redis.RedisError, OSError) as exc:
            shared.failed("budget.report", exc)
            raise StateError(f"cannot read budget spend from Redis ({exc})") from None
        shared.worked()
        return rows

    # -- shared state (Redis) ------------------------------------------------------------

    def use_shared(self, shared: SharedState | None) -> None:
        """Keep spend and reservations in Redis from now on (``None``: in the embedded
        store); calls in flight keep settling where they reserved."""
        self.shared = shared
        self.redis = RedisSpendStore(shared.key) if shared is not None else None

    async def reserve_shared(self, flow_id: str, budgets: Sequence[Budget], *,
                             who: Mapping[str, str | None], usd: float | None, tokens: int,
                             act: Activation | None, ttl: float, wait: float) -> SpendOutcome:
        """:meth:`reserve` against the fleet's spend and reservations in Redis (one atomic
        script, bounded by ``wait`` seconds). The reservation is due ``ttl`` seconds from
        now unless :meth:`tick` renews it. Redis failing or slow: ``state`` says why and
        nothing is held."""
        shared, store = self.shared, self.redis
        assert shared is not None and shared.settings is not None and store is not None
        now = self.clock()
        plan: list[SpendHold] = []
        for b in budgets:
            key = _key_of(b, act, who, usd, now)
            if isinstance(key, SpendOutcome):
                return key
            if key is not None:
                plan.append(SpendHold(b, key, Amount(usd or 0.0, tokens)))
        if not plan:
            return SpendOutcome(now=now)
        holds = [HoldRequest(h.budget.id, h.key, counted_since(h.budget.spec, now),
                             window(h.budget.spec, now)[0], h.amount, h.budget.spec.hard_usd,
                             h.budget.spec.hard_tokens, _keep_until(h.budget.spec, now))
                 for h in plan]
        try:
            snaps, refused = await asyncio.wait_for(store.reserve(
                shared.async_client(), flow_id, shared.settings.replica, now, now + ttl, holds),
                wait)
        except TimeoutError:
            cause = f"Redis did not answer within {wait * 1000:g} ms"
            shared.failed("budget.reserve", cause)
            self._later(self._settle_shared(flow_id, [], []))  # in case it landed after all
            return SpendOutcome(failed=plan[0].budget, state=cause, now=now)
        except (redis.RedisError, OSError) as exc:
            shared.failed("budget.reserve", exc)
            return SpendOutcome(failed=plan[0].budget, now=now,
                                state=f"Redis failed ({type(exc).__name__}: {exc})")
        shared.worked()
        if refused is not None:
            h = plan[refused.at]
            return SpendOutcome(failed=h.budget, key=h.key, now=now, refusal=Refusal(
                refused.unit, refused.spent, refused.promised, h.amount,
                resets_at(h.budget.spec, now)))
        self._held[flow_id] = plan
        self._snap[flow_id] = snaps
        return SpendOutcome(tuple(plan), now=now)

    def settle_shared(self, flow_id: str, used: int | None, cost: float | None,
                      charge: bool) -> Awaitable[list[Settled] | None] | None:
        """:meth:`settle` in Redis: what to await (in a task) for the settled holds, or
        ``None`` when the flow held nothing. The awaitable never raises: a settle Redis
        does not take is reported, and the reservation stays until its expiry, when a
        sweep charges what was reserved (strict)."""
        held = self._held.pop(flow_id, None)
        self._snap.pop(flow_id, None)
        if not held:
            return None
        if used is None and not charge:
            return self._settle_shared(flow_id, held, [])
        now = self.clock()
        charges = []
        for h in held:
            actual = (Amount(cost if cost is not None else h.amount.usd, used) if used is not None
                      else h.amount)
            spec = h.budget.spec
            charges.append(SettleCharge(h.budget.id, h.key, counted_since(spec, now),
                                        window(spec, now)[0], actual, _keep_until(spec, now)))
        return self._settle_shared(flow_id, held, charges)

    async def _settle_shared(self, flow_id: str, held: Sequence[SpendHold],
                             charges: Sequence[SettleCharge]) -> list[Settled] | None:
        shared, store = self.shared, self.redis
        if shared is None or store is None:
            return None
        try:
            before = await store.settle(shared.async_client(), flow_id, charges)
        except (redis.RedisError, OSError) as exc:
            shared.failed("budget.settle", exc)
            log.warning("fleetgate: budget settle of flow %s did not reach Redis (%s); its "
                        "reservation is charged in full when it expires", flow_id, exc)
            return None
        shared.worked()
        if before is None:
            return []  # swept already (or never landed): nothing added twice
        return [Settled(h, b, b + c.amount) for h, b, c in zip(held, before, charges, strict=False)]

    def _later(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def tick(self, ttl: float) -> list[Swept]:
        """Every few seconds (Redis mode): push the expiry of this replica's calls in flight
        (a long stream is never swept while alive), then charge reservations whose gateway
        died (their expiry passed). Returns what this replica's sweep charged."""
        shared, store = self.shared, self.redis
        if shared is None or store is None or shared.settings is None:
            return []
        swept: list[Swept] = []
        try:
            client = shared.async_client()
            now = self.clock()
            await store.renew(client, list(self._held), now + ttl)
            while True:
                batch = await store.sweep(client, now, SWEEP_BATCH)
                swept += batch
                if len(batch) < SWEEP_BATCH:
                    break
        except (redis.RedisError, OSError) as exc:
            shared.failed("budget.sweep", exc)
            return swept
        shared.worked()
        return swept
