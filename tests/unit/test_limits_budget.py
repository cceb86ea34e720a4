"""Budget math with an injected clock: windows, reservations, settlement, persistence."""

from __future__ import annotations

import calendar
from pathlib import Path

import pytest

from fleetgate.limits.budget import Amount, BudgetSpec, Ledger, Period, counted_since, window
from fleetgate.stores.spend import SqliteSpendStore

T = calendar.timegm((2026, 11, 23, 13, 45, 10))  # Mon 2026-11-23 13:45:10 UTC
DAY = BudgetSpec(Period.DAY, hard_usd=1.0, soft_usd=0.5)


@pytest.mark.parametrize(("period", "start", "end"), [
    (Period.HOUR, (2026, 11, 23, 13, 0, 0), (2026, 11, 23, 14, 0, 0)),
    (Period.DAY, (2026, 11, 23, 0, 0, 0), (2026, 11, 24, 0, 0, 0)),
    (Period.MONTH, (2026, 11, 1, 0, 0, 0), (2026, 12, 1, 0, 0, 0)),
])
def test_calendar_windows_are_utc(period: Period, start: tuple[int, ...], end: tuple[int, ...]) -> None:
    assert window(BudgetSpec(period, hard_usd=1), T) == (calendar.timegm(start), calendar.timegm(end))


def test_december_rolls_into_next_year() -> None:
    dec = calendar.timegm((2026, 12, 31, 23, 59, 0))
    assert window(BudgetSpec(Period.MONTH, hard_usd=1), dec)[1] == calendar.timegm((2027, 1, 1, 0, 0, 0))


def test_hard_limit_counts_spend_and_reservations() -> None:
    ledger = Ledger(SqliteSpendStore(None))
    assert ledger.reserve("b", "a", DAY, Amount(0.4, 100), T) is None
    assert ledger.reserve("b", "a", DAY, Amount(0.4, 100), T) is None
    refused = ledger.reserve("b", "a", DAY, Amount(0.4, 100), T)
    assert refused is not None and refused.unit == "usd"
    assert refused.promised.usd == pytest.approx(0.8)
    assert refused.resets_at == calendar.timegm((2026, 11, 24, 0, 0, 0))
    assert ledger.reserve("b", "other-agent", DAY, Amount(0.4, 100), T) is None  # per key
    # settle the first two to what they really cost: room again
    ledger.settle("b", "a", DAY, Amount(0.4, 100), Amount(0.1, 30), T)
    ledger.settle("b", "a", DAY, Amount(0.4, 100), Amount(0.1, 30), T)
    assert ledger.spent("b", "a", DAY, T) == Amount(pytest.approx(0.2), 60)  # type: ignore[arg-type]
    assert ledger.reserve("b", "a", DAY, Amount(0.4, 100), T) is None


def test_fifty_concurrent_reservations_never_pass_the_hard_limit() -> None:
    ledger = Ledger(SqliteSpendStore(None))
    spec = BudgetSpec(Period.DAY, hard_tokens=1000)
    ok = [ledger.reserve("b", "a", spec, Amount(0, 100), T) is None for _ in range(50)]
    assert sum(ok) == 10


def test_release_drops_a_reservation_without_spending() -> None:
    ledger = Ledger(SqliteSpendStore(None))
    spec = BudgetSpec(Period.DAY, hard_tokens=100)
    assert ledger.reserve("b", "a", spec, Amount(0, 100), T) is None
    ledger.release("b", "a", Amount(0, 100))
    assert ledger.spent("b", "a", spec, T).tokens == 0
    assert ledger.reserve("b", "a", spec, Amount(0, 100), T) is None


def test_period_roll_over_refills() -> None:
    ledger = Ledger(SqliteSpendStore(None))
    spec = BudgetSpec(Period.HOUR, hard_tokens=100)
    ledger.settle("b", "a", spec, Amount(), Amount(0, 100), T)
    assert ledger.reserve("b", "a", spec, Amount(0, 1), T) is not None
    assert ledger.reserve("b", "a", spec, Amount(0, 1), T + 15 * 60) is None  # 14:00 UTC


def test_rolling_window_forgets_old_spend_gradually() -> None:
    ledger = Ledger(SqliteSpendStore(None))
    spec = BudgetSpec(Period.ROLLING, rolling_seconds=3600, hard_tokens=100)
    ledger.settle("b", "a", spec, Amount(), Amount(0, 60), T)
    ledger.settle("b", "a", spec, Amount(), Amount(0, 40), T + 1800)
    assert ledger.reserve("b", "a", spec, Amount(0, 1), T + 1800) is not None
    assert ledger.reserve("b", "a", spec, Amount(0, 50), T + 3700) is None  # the 60 aged out
    assert counted_since(spec, T) <= T - 3600  # strict: a whole overlapping sub-window counts


def test_soft_and_hard_are_separate() -> None:
    spec = BudgetSpec(Period.DAY, hard_usd=1.0, soft_usd=0.5)
    assert spec.over(Amount(0.6, 0), hard=False) == "usd"
    assert spec.over(Amount(0.6, 0), hard=True) is None


def test_spend_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "budgets.sqlite"
    first = Ledger(SqliteSpendStore(path))
    first.settle("b", "a", DAY, Amount(), Amount(0.9, 500), T)
    first.store.close()
    again = Ledger(SqliteSpendStore(path))
    assert again.spent("b", "a", DAY, T).usd == pytest.approx(0.9)
    assert again.reserve("b", "a", DAY, Amount(0.2, 1), T) is not None
    assert again.store.keys("b", counted_since(DAY, T))[0][0] == "a"
