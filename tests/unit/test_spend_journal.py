"""Write-ahead reservations and the spend store off the event loop: the SQLite store's
transactions, crash recovery, the mirror, and a store that fails (disk full) then recovers."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from fleetgate.errors import StateError
from fleetgate.limits.budget import Amount
from fleetgate.runtime.reservations_journal import SpendJournal, SpendMirror
from fleetgate.sqlite import WriterThread
from fleetgate.stores.spend import Charge, Reservation, SqliteSpendStore

T = 1_795_000_000.0


def rows(db: Path, table: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as c:
        return c.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3").fetchall()


def test_settle_replaces_the_reservation_in_one_transaction(tmp_path: Path) -> None:
    db = tmp_path / "budgets.sqlite"
    store = SqliteSpendStore(db)
    store.hold([Reservation("f1", "b", "a", 100, Amount(0.5, 500), T),
                Reservation("f1", "c", "fleet", 100, Amount(0.5, 500), T)])
    assert len(rows(db, "reservations")) == 2
    store.settle("f1", [Charge("b", "a", 100, Amount(0.1, 40))])
    assert rows(db, "reservations") == []
    assert rows(db, "spend") == [("b", "a", 100, 0.1, 40)]
    store.close()


def test_reservations_left_open_are_charged_their_amount_at_the_next_open(tmp_path: Path) -> None:
    db = tmp_path / "budgets.sqlite"
    store = SqliteSpendStore(db)
    store.add("b", "a", 100, Amount(0.2, 20))
    store.hold([Reservation("f1", "b", "a", 100, Amount(0.5, 500), T)])
    store.hold([Reservation("f2", "b", "z", 100, Amount(0.25, 250), T + 1)])
    store.close()  # as after kill -9: the rows are committed, nothing settled them
    journal = SpendJournal(SqliteSpendStore(db))
    try:
        assert [(r.flow, r.budget, r.key, r.amount) for r in journal.recovered] == [
            ("f1", "b", "a", Amount(0.5, 500)), ("f2", "b", "z", Amount(0.25, 250))]
        assert journal.mirror.spent("b", "a", 0) == Amount(0.7, 520)
        assert journal.mirror.spent("b", "z", 0) == Amount(0.25, 250)
    finally:
        journal.close()
    assert rows(db, "reservations") == []
    again = SpendJournal(SqliteSpendStore(db))  # charged once, not at every start
    assert again.recovered == []
    assert again.mirror.spent("b", "a", 0) == Amount(0.7, 520)
    again.close()


def test_the_mirror_sums_windows_since_and_ranks_keys() -> None:
    m = SpendMirror([Charge("b", "a", 100, Amount(1.0, 10)), Charge("b", "a", 200, Amount(2.0, 20)),
                     Charge("b", "z", 200, Amount(5.0, 1)), Charge("other", "a", 200, Amount(9, 9))])
    assert m.spent("b", "a", 150) == Amount(2.0, 20)
    assert m.spent("b", "a", 0) == Amount(3.0, 30)
    assert m.keys("b", 0) == [("z", Amount(5.0, 1)), ("a", Amount(3.0, 30))]


def test_a_store_that_cannot_write_fails_the_hold_and_reports_it(tmp_path: Path) -> None:
    db = tmp_path / "budgets.sqlite"
    journal = SpendJournal(SqliteSpendStore(db))
    errors: list[tuple[str, str]] = []
    journal.on_error = lambda op, msg: errors.append((op, msg))
    big = "k" * 5000
    # the journal's own connection is the one whose max_page_count is capped
    journal.store._db.execute("PRAGMA max_page_count = 3")
    fut = journal.hold([Reservation(f"f{i}", "b", big + str(i), 1, Amount(1, 1), T)
                        for i in range(50)])
    with pytest.raises(StateError, match="full"):
        fut.result(5)
    assert not journal.ok and journal.status()["ok"] is False
    assert "full" in journal.status()["error"] and errors and errors[0][0] == "reserve"
    assert rows(db, "reservations") == []  # all or nothing
    recovered: list[bool] = []
    journal.on_ok = lambda: recovered.append(True)
    journal.store._db.execute("PRAGMA max_page_count = 1000000")
    journal.hold([Reservation("f-ok", "b", "a", 1, Amount(1, 1), T)]).result(5)
    assert journal.ok and recovered == [True]
    journal.close()


def test_a_settle_that_fails_is_kept_and_written_when_the_store_works_again(tmp_path: Path) -> None:
    db = tmp_path / "budgets.sqlite"
    journal = SpendJournal(SqliteSpendStore(db))
    journal.hold([Reservation("f1", "b", "a", 1, Amount(1, 100), T)]).result(5)
    locker = sqlite3.connect(db, isolation_level=None)
    journal.store._db.execute("PRAGMA busy_timeout = 50")
    locker.execute("BEGIN EXCLUSIVE")
    journal.settle("f1", [Charge("b", "a", 1, Amount(0.5, 40))])
    assert wait(lambda: not journal.ok)
    assert journal.status()["unsaved_settles"] == 1 and "locked" in journal.status()["error"]
    locker.execute("COMMIT")
    locker.close()
    assert wait(lambda: journal.ok, 5)  # the idle retry wrote it, no new traffic needed
    assert rows(db, "reservations") == [] and rows(db, "spend") == [("b", "a", 1, 0.5, 40)]
    journal.close()


def test_the_writer_queue_is_bounded() -> None:
    gate = threading.Event()
    w = WriterThread("t", size=2)
    w.submit(gate.wait)  # occupies the thread
    assert wait(lambda: w.pending() == 0)
    w.submit(lambda: None)
    w.submit(lambda: None)
    with pytest.raises(StateError, match="2 writes are waiting"):
        w.submit(lambda: None)
    gate.set()
    w.close()


def wait(cond: object, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False
