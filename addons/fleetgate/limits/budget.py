"""Budgets: how much an agent, role, session, user or the whole fleet may spend per period.

A budget has soft and/or hard limits in USD and/or tokens over a calendar period (``hour``,
``day``, ``month``, UTC) or a rolling window (``rolling: 24h``). Spend is read and added
through a :class:`SpendRecords` (``fleetgate.stores.spend`` persists it); in-flight requests
hold **reservations** (their estimated cost) in memory, so a check sees spend + everything
already promised, and N concurrent requests cannot together pass a hard limit (see
:meth:`Ledger.reserve`). Pure: times are passed in, no I/O here.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

__all__ = ["Amount", "BudgetSpec", "Ledger", "Period", "Refusal", "SpendRecords", "counted_since",
           "window"]

ROLLING_SLOTS = 60  # a rolling window is summed from this many sub-windows


class Period(StrEnum):
    HOUR = "hour"
    DAY = "day"
    MONTH = "month"
    ROLLING = "rolling"


@dataclass(frozen=True)
class Amount:
    """Spend: dollars and tokens."""

    usd: float = 0.0
    tokens: int = 0

    def __add__(self, other: Amount) -> Amount:
        return Amount(self.usd + other.usd, self.tokens + other.tokens)

    def __sub__(self, other: Amount) -> Amount:
        return Amount(self.usd - other.usd, self.tokens - other.tokens)


@dataclass(frozen=True)
class BudgetSpec:
    """One budget's numbers. A limit of ``None`` is not set."""

    period: Period
    rolling_seconds: float = 0.0
    hard_usd: float | None = None
    soft_usd: float | None = None
    hard_tokens: int | None = None
    soft_tokens: int | None = None

    def over(self, amount: Amount, hard: bool) -> str | None:
        """Which limit ``amount`` exceeds (``"usd"``/``"tokens"``), or ``None``."""
        usd, tokens = (self.hard_usd, self.hard_tokens) if hard else (self.soft_usd, self.soft_tokens)
        if usd is not None and amount.usd > usd + 1e-12:
            return "usd"
        if tokens is not None and amount.tokens > tokens:
            return "tokens"
        return None

    def describe(self) -> str:
        parts = []
        if self.hard_usd is not None:
            parts.append(f"${self.hard_usd:g}")
        if self.hard_tokens is not None:
            parts.append(f"{self.hard_tokens:,} tokens")
        per = (f"per rolling {self.rolling_seconds / 3600:g} h" if self.period is Period.ROLLING
               else f"per {self.period.value} (UTC)")
        return f"{' and '.join(parts) or 'no hard limit'} {per}"


def window(spec: BudgetSpec, now: float) -> tuple[int, int]:
    """(start, end) of the current calendar window, or of the current rolling sub-window
    (epoch seconds). Calendar windows are UTC: a day budget refills at 00:00 UTC."""
    if spec.period is Period.ROLLING:
        slot = max(1, int(spec.rolling_seconds // ROLLING_SLOTS))
        start = int(now // slot) * slot
        return start, start + slot
    t = time.gmtime(now)
    if spec.period is Period.HOUR:
        start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, 0, 0))
        return start, start + 3600
    if spec.period is Period.DAY:
        start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
        return start, start + 86400
    start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return start, calendar.timegm((year, month, 1, 0, 0, 0))


def counted_since(spec: BudgetSpec, now: float) -> int:
    """The earliest window start whose spend counts now."""
    start, end = window(spec, now)
    if spec.period is Period.ROLLING:
        # every sub-window that overlaps the last ``rolling_seconds`` counts whole: the sum
        # errs strict by at most one sub-window (1/60 of the window), never generous
        return int(now - spec.rolling_seconds) - (end - start) + 1
    return start


@dataclass(frozen=True)
class Refusal:
    """Why a reservation was refused: which limit, what is spent and promised, when it frees."""

    unit: str  # "usd" or "tokens"
    spent: Amount
    promised: Amount
    asked: Amount
    resets_at: float  # epoch seconds: end of the calendar window, or when the oldest spend ages out


class SpendRecords(Protocol):
    """What the ledger needs of a spend store: sums since a time, and adding to a window."""

    def spent(self, budget: str, key: str, since: int) -> Amount:
        """Spend of ``budget`` for ``key`` in windows starting at or after ``since``."""
        ...

    def add(self, budget: str, key: str, window_start: int, amount: Amount) -> None:
        """Add ``amount`` to the window of ``budget`` for ``key`` that starts at ``window_start``."""
        ...


class Ledger:
    """Reservations in memory over spend in a store. Single-threaded use (the event loop)
    makes check-and-reserve atomic: no check-then-spend race."""

    def __init__(self, store: SpendRecords) -> None:
        self.store = store
        self.reserved: dict[tuple[str, str], Amount] = {}

    def spent(self, budget: str, key: str, spec: BudgetSpec, now: float) -> Amount:
        return self.store.spent(budget, key, counted_since(spec, now))

    def reserve(self, budget: str, key: str, spec: BudgetSpec, amount: Amount,
                now: float) -> Refusal | None:
        spent = self.spent(budget, key, spec, now)
        promised = self.reserved.get((budget, key), Amount())
        unit = spec.over(spent + promised + amount, hard=True)
        if unit is not None:
            _, end = window(spec, now)
            resets = float(end) if spec.period is not Period.ROLLING else now + spec.rolling_seconds
            return Refusal(unit, spent, promised, amount, resets)
        self.reserved[(budget, key)] = promised + amount
        return None

    def release(self, budget: str, key: str, reserved: Amount) -> None:
        """Drop a reservation that was never spent (the call was refused or never sent)."""
        left = self.reserved.get((budget, key), Amount()) - reserved
        if left.usd <= 1e-12 and left.tokens <= 0:
            self.reserved.pop((budget, key), None)
        else:
            self.reserved[(budget, key)] = left

    def settle(self, budget: str, key: str, spec: BudgetSpec, reserved: Amount, actual: Amount,
               now: float) -> tuple[Amount, Amount]:
        """Replace a reservation by the real spend; (spend before, spend after) for soft-limit
        alerts."""
        self.release(budget, key, reserved)
        before = self.spent(budget, key, spec, now)
        start, _ = window(spec, now)
        self.store.add(budget, key, start, actual)
        return before, before + actual
