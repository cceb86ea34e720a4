"""The embedded state engine's one way of opening SQLite (budgets, kill switch).

One file in the state directory (WAL, so readers never wait for the writer) or, with
``path=None``, memory (tests, ``fleetgate_state_dir=''``). Connections are shared across the
proxy's event loop and the admin API's threads, so each store guards its connection with a
lock; autocommit (``isolation_level=None``) makes every statement its own transaction.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

__all__ = ["SqliteStore", "open_db"]


def open_db(path: Path | None, schema: str) -> sqlite3.Connection:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path) if path else ":memory:", check_same_thread=False,
                         isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL" if path else "PRAGMA journal_mode=MEMORY")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(schema)
    return db


class SqliteStore:
    """Base of the state stores: one connection, one lock, ``SCHEMA`` applied at open."""

    SCHEMA = ""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._db = open_db(path, self.SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()
