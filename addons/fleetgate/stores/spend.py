"""Where budget spend lives: a :class:`SpendStore` and its SQLite implementation.

:class:`fleetgate.limits.budget.Ledger` decides (windows, reservations, hard limits) without
I/O; it reads and adds spend through the store it is given. The embedded default keeps spend
in one SQLite file in the state directory, so it survives restarts and rules reloads (or in
memory, for tests and ``fleetgate_state_dir=''``). Rows are (budget id, key, window start) ->
(usd, tokens); a settle is one upsert in its own transaction; a check is one indexed ``SUM``
(the primary key starts with budget and key). A shared engine for several gateways goes
behind the same Protocol.

**Write-ahead reservations.** A call's reservation is a row of ``reservations`` (flow id,
budget, key, window, amount, created) committed before the call is forwarded; its settle
deletes the rows and adds the metered spend in one transaction. Rows still there when the
store is opened again belong to calls in flight when the process died: :meth:`recover`
charges each its reserved amount (the documented bound) and returns them for the log.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from fleetgate.limits.budget import Amount, SpendRecords
from fleetgate.sqlite import SqliteStore

__all__ = ["Charge", "Reservation", "SpendStore", "SqliteSpendStore"]


class Charge(NamedTuple):
    """Spend to add to one budget key's window."""

    budget: str
    key: str
    window_start: int
    amount: Amount


class Reservation(NamedTuple):
    """A call's durable reservation against one budget key (``created``: epoch seconds)."""

    flow: str
    budget: str
    key: str
    window_start: int
    amount: Amount
    created: float


class SpendStore(SpendRecords, Protocol):
    """Spend per (budget, key, window) that outlives the process: what the ledger needs
    (``spent``, ``add``) plus what the operator's report and housekeeping need."""

    def keys(self, budget: str, since: int, top: int = 1000) -> list[tuple[str, Amount]]:
        """The ``top`` keys of ``budget`` by spend since ``since`` (epoch seconds)."""
        ...

    def prune(self, before: int) -> None:
        """Forget windows that started before ``before``."""
        ...

    def load(self) -> list[Charge]:
        """Every spend row (the in-memory mirror is filled from it at open)."""
        ...

    def hold(self, rows: Sequence[Reservation]) -> None:
        """Write a call's reservations, all in one transaction."""
        ...

    def settle(self, flow: str, charges: Sequence[Charge]) -> None:
        """Replace ``flow``'s reservations by ``charges`` in one transaction (no charges:
        released)."""
        ...

    def recover(self) -> list[Reservation]:
        """Charge every reservation left open (a crash) its reserved amount, remove them,
        and return them."""
        ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (
    budget TEXT NOT NULL,
    key TEXT NOT NULL,
    window_start INTEGER NOT NULL,
    usd REAL NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (budget, key, window_start)
);
CREATE TABLE IF NOT EXISTS reservations (
    flow TEXT NOT NULL,
    budget TEXT NOT NULL,
    key TEXT NOT NULL,
    window_start INTEGER NOT NULL,
    usd REAL NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    PRIMARY KEY (flow, budget, key)
);
"""

_ADD = ("INSERT INTO spend (budget, key, window_start, usd, tokens) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (budget, key, window_start) DO UPDATE SET usd = usd + excluded.usd, "
        "tokens = tokens + excluded.tokens")


class SqliteSpendStore(SqliteStore):
    """Spend in SQLite (``budgets.sqlite`` in the state directory, or memory)."""

    SCHEMA = _SCHEMA

    def add(self, budget: str, key: str, window_start: int, amount: Amount) -> None:
        with self._lock:
            self._db.execute(_ADD, (budget, key, window_start, amount.usd, amount.tokens))

    def _transaction(self, statements: Sequence[tuple[str, tuple[object, ...]]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def load(self) -> list[Charge]:
        with self._lock:
            rows = self._db.execute(
                "SELECT budget, key, window_start, usd, tokens FROM spend").fetchall()
        return [Charge(str(b), str(k), int(w), Amount(float(u), int(t))) for b, k, w, u, t in rows]

    def hold(self, rows: Sequence[Reservation]) -> None:
        self._transaction([(
            "INSERT OR REPLACE INTO reservations (flow, budget, key, window_start, usd, tokens, "
            "created) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (r.flow, r.budget, r.key, r.window_start, r.amount.usd, r.amount.tokens, r.created))
            for r in rows])

    def settle(self, flow: str, charges: Sequence[Charge]) -> None:
        self._transaction([("DELETE FROM reservations WHERE flow = ?", (flow,)), *(
            (_ADD, (c.budget, c.key, c.window_start, c.amount.usd, c.amount.tokens))
            for c in charges)])

    def recover(self) -> list[Reservation]:
        with self._lock:
            rows = self._db.execute(
                "SELECT flow, budget, key, window_start, usd, tokens, created FROM reservations "
                "ORDER BY created").fetchall()
        open_ = [Reservation(str(f), str(b), str(k), int(w), Amount(float(u), int(t)), float(c))
                 for f, b, k, w, u, t, c in rows]
        if open_:
            self._transaction([*(
                (_ADD, (r.budget, r.key, r.window_start, r.amount.usd, r.amount.tokens))
                for r in open_), ("DELETE FROM reservations", ())])
        return open_

    def spent(self, budget: str, key: str, since: int) -> Amount:
        with self._lock:
            row = self._db.execute(
                "SELECT COALESCE(SUM(usd), 0), COALESCE(SUM(tokens), 0) FROM spend "
                "WHERE budget = ? AND key = ? AND window_start >= ?", (budget, key, since)).fetchone()
        return Amount(float(row[0]), int(row[1]))

    def keys(self, budget: str, since: int, top: int = 1000) -> list[tuple[str, Amount]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key, SUM(usd), SUM(tokens) FROM spend WHERE budget = ? AND window_start >= ? "
                "GROUP BY key ORDER BY SUM(usd) DESC, SUM(tokens) DESC LIMIT ?",
                (budget, since, top)).fetchall()
        return [(str(k), Amount(float(u), int(t))) for k, u, t in rows]

    def prune(self, before: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM spend WHERE window_start < ?", (before,))
