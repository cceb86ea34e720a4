"""ReservationBook: rate limits and budgets, the reservations of every call in flight.

Built once in ``pipeline()`` and handed to the three addons that used to share a mutable set
and a list of callbacks: the rate limiter and the budget guard reserve (``request``) and
settle (``response``/``error``) through it; the LLM meter asks it, while an answer streams,
whether the flow is counted (:meth:`watched`) and whether its output has run past what a
budget or a token bucket allows (:meth:`overrun`, budgets first). The arithmetic is pure
(:mod:`fleetgate.limits`); spend is kept by an injected
:class:`fleetgate.stores.spend.SpendStore`; clocks are injected (monotonic for buckets, wall
clock for budget windows).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fleetgate.llm.pricing import PricingTable
from fleetgate.runtime.reservations_rate import Overrun, RateReservations
from fleetgate.runtime.reservations_spend import SpendReservations
from fleetgate.runtime.shared import SharedState
from fleetgate.stores.spend import SpendStore

__all__ = ["Overrun", "ReservationBook"]


class ReservationBook:
    def __init__(self, spend: SpendStore, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 shared: SharedState | None = None) -> None:
        self.shared = shared  # the fleet's Redis when fleetgate_state names one
        self.rates = RateReservations(clock, shared=shared)
        self.spend = SpendReservations(spend, wall_clock)

    def watched(self, flow_id: str) -> bool:
        """Whether a reservation depends on the flow's output: it is counted as it streams."""
        return self.spend.holding(flow_id) or self.rates.counting(flow_id)

    def overrun(self, flow_id: str, est_in: int, out: int, pricing: PricingTable | None,
                model: str) -> Overrun | None:
        """The flow has streamed ``out`` output tokens (``est_in`` input): the budget or
        token limit it ran past, taking any output beyond its token reservations as it
        goes; ``None`` while it may go on."""
        return (self.spend.overrun(flow_id, est_in, out, pricing, model)
                or self.rates.overrun(flow_id, est_in, out))

    def close(self) -> None:
        self.spend.journal.close()
