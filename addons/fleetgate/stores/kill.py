"""The kill switch's store: the :class:`KillStore` interface and its SQLite implementation.

The embedded default is one SQLite file in the state directory (``killswitch.sqlite``).

Three tables. ``actions`` holds what is in force (operator and trigger actions; rules actions
come from the rules YAML and are not stored): it is read at startup, before the proxy accepts
a connection, so a restart keeps stopped agents stopped. ``sessions`` holds the session graph
(delegation edges must survive a restart too, or a restarted gateway would let the children
of a killed parent back in). ``log`` is append-only: this module has no statement that
updates or deletes a log row. Every action, lift and cut flow is one row, so an operator can
reconcile what was running and what was cut.

With ``path=None`` everything is in memory (tests, ``fleetgate_state_dir=''``). The interface
is declared beside the core that uses it (:class:`fleetgate.kill.core.KillStore`: the pure
package states what it needs, this layer provides it) and re-exported here.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fleetgate.kill.core import KillStore
from fleetgate.kill.graph import Node
from fleetgate.kill.model import Action
from fleetgate.sqlite import SqliteStore

__all__ = ["KillStore", "SqliteKillStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS actions (id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (session TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    action TEXT,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS log_action ON log (action);
"""


class SqliteKillStore(SqliteStore):
    """:class:`KillStore` on one SQLite connection (see :mod:`fleetgate.sqlite`)."""

    SCHEMA = _SCHEMA

    # -- actions in force ------------------------------------------------------------

    def save_action(self, action: Action) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO actions (id, body) VALUES (?, ?)",
                             (action.id, json.dumps(action.to_json())))

    def remove_action(self, action_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM actions WHERE id = ?", (action_id,))

    def actions(self) -> list[Action]:
        with self._lock:
            rows = self._db.execute("SELECT body FROM actions").fetchall()
        return [Action.from_json(json.loads(r[0])) for r in rows]

    # -- session graph ---------------------------------------------------------------

    def save_node(self, node: Node) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO sessions (session, body) VALUES (?, ?)",
                             (node.session, json.dumps(node.to_json())))

    def forget_nodes(self, sessions: list[str]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM sessions WHERE session = ?",
                                 [(s,) for s in sessions])

    def nodes(self) -> list[Node]:
        with self._lock:
            rows = self._db.execute("SELECT body FROM sessions").fetchall()
        return [Node.from_json(json.loads(r[0])) for r in rows]

    # -- the append-only log ---------------------------------------------------------

    def append(self, event: str, body: dict[str, Any], action: str | None = None,
               at: float | None = None) -> int:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO log (at, event, action, body) VALUES (?, ?, ?, ?)",
                (at if at is not None else time.time(), event, action,
                 json.dumps(body, default=str)))
            return int(cur.lastrowid or 0)

    def append_many(self, rows: list[tuple[str, dict[str, Any], str | None]],
                    at: float | None = None) -> None:
        """Several ``(event, body, action)`` rows in one transaction (a sweep's cuts)."""
        now = at if at is not None else time.time()
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO log (at, event, action, body) VALUES (?, ?, ?, ?)",
                    [(now, e, a, json.dumps(b, default=str)) for e, b, a in rows])
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def log(self, limit: int = 100, action: str | None = None,
            since: float | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` log rows (oldest first), optionally for one action id or
        after ``since`` (epoch seconds)."""
        q = "SELECT seq, at, event, action, body FROM log WHERE 1=1"
        args: list[Any] = []
        if action:
            q += " AND action = ?"
            args.append(action)
        if since is not None:
            q += " AND at >= ?"
            args.append(since)
        q += " ORDER BY seq DESC LIMIT ?"
        args.append(max(1, min(limit, 10_000)))
        with self._lock:
            rows = self._db.execute(q, args).fetchall()
        return [{"seq": s, "at": a, "event": e, "action": act, **json.loads(b)}
                for s, a, e, act, b in reversed(rows)]
