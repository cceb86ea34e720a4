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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, NamedTuple

from fleetgate.celexpr import Activation, CelError
from fleetgate.limits.budget import Amount, Ledger, Refusal, counted_since, window
from fleetgate.llm.pricing import PricingTable
from fleetgate.llm.usage import Usage
from fleetgate.policy.model import Budget, Policy
from fleetgate.runtime.reservations_journal import SpendJournal
from fleetgate.runtime.reservations_rate import Overrun
from fleetgate.stores.spend import Charge, Reservation, SpendStore

__all__ = ["Settled", "SpendHold", "SpendOutcome", "SpendReservations", "applicable_budgets"]


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


@dataclass(frozen=True)
class Settled:
    """A hold replaced by real spend: the key's spend before and after (soft-limit alerts)."""

    hold: SpendHold
    before: Amount
    after: Amount


def applicable_budgets(policy: Policy, profiles: Sequence[str]) -> list[Budget]:
    """The top-level budgets and those of the agent's profiles, in that order."""
    return [*policy.budgets, *(b for p in policy.agents if p.name in profiles for b in p.budgets)]


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


class SpendReservations:
    """The ledger over the spend store, and the holds of the calls in flight."""

    def __init__(self, store: SpendStore, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.journal = SpendJournal(store, clock=clock)
        self.ledger = Ledger(self.journal.mirror)
        self._held: dict[str, list[SpendHold]] = {}

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
            try:
                if b.when is not None and act is not None and not b.when.evaluate(act):
                    continue
                key = budget_key(b, act, who)
            except CelError as exc:
                self._release(held)
                return SpendOutcome(failed=b, error=str(exc), now=now)
            if usd is None and (b.spec.hard_usd is not None or b.spec.soft_usd is not None):
                self._release(held)
                return SpendOutcome(failed=b, unpriced=True, now=now)
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
        for h in held:
            run = Amount(h.amount.usd if usd is None else usd, est_in + out)
            if run.tokens <= h.amount.tokens and run.usd <= h.amount.usd + 1e-12:
                continue  # within its reservation: admission already made room for it
            spec = h.budget.spec
            others = self.ledger.reserved.get((h.budget.id, h.key), Amount()) - h.amount
            if spec.over(self.ledger.spent(h.budget.id, h.key, spec, now) + others + run, hard=True):
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
        """Spend against each budget, per key (``GET /budgets``)."""
        if policy is None:
            return {"budgets": []}
        now = self.clock()
        out = []
        for b in [*policy.budgets, *(b for p in policy.agents for b in p.budgets)]:
            rows = self.journal.mirror.keys(b.id, counted_since(b.spec, now))
            out.append({"budget": b.id, "limit": b.spec.describe(),
                        "hard_usd": b.spec.hard_usd, "soft_usd": b.spec.soft_usd,
                        "hard_tokens": b.spec.hard_tokens, "soft_tokens": b.spec.soft_tokens,
                        "spend": [{"key": k, "usd": round(a.usd, 6), "tokens": a.tokens}
                                  for k, a in rows]})
        return {"budgets": out}
