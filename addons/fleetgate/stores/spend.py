"""Where budget spend lives: a :class:`SpendStore` and its SQLite implementation.

:class:`fleetgate.limits.budget.Ledger` decides (windows, reservations, hard limits) without
I/O; it reads and adds spend through the store it is given. The embedded default keeps spend
in one SQLite file in the state directory, so it survives restarts and rules reloads (or in
memory, for tests and ``fleetgate_state_dir=''``). Rows are (budget id, key, window start) ->
(usd, tokens); a settle is one upsert in its own transaction; a check is one indexed ``SUM``
(the primary key starts with budget and key). A shared engine for several gateways goes
behind the same Protocol.
"""

from __future__ import annotations

from typing import Protocol

from fleetgate.limits.budget import Amount, SpendRecords
from fleetgate.sqlite import SqliteStore

__all__ = ["SpendStore", "SqliteSpendStore"]


class SpendStore(SpendRecords, Protocol):
    """Spend per (budget, key, window) that outlives the process: what the ledger needs
    (``spent``, ``add``) plus what the operator's report and housekeeping need."""

    def keys(self, budget: str, since: int, top: int = 1000) -> list[tuple[str, Amount]]:
        """The ``top`` keys of ``budget`` by spend since ``since`` (epoch seconds)."""
        ...

    def prune(self, before: int) -> None:
        """Forget windows that started before ``before``."""
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
)
"""


class SqliteSpendStore(SqliteStore):
    """Spend in SQLite (``budgets.sqlite`` in the state directory, or memory)."""

    SCHEMA = _SCHEMA

    def add(self, budget: str, key: str, window_start: int, amount: Amount) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO spend (budget, key, window_start, usd, tokens) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (budget, key, window_start) DO UPDATE SET usd = usd + excluded.usd, "
                "tokens = tokens + excluded.tokens",
                (budget, key, window_start, amount.usd, amount.tokens))

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
