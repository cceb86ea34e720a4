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

:class:`QueuedKillStore` is what the kill service actually uses: the same interface, but
every write goes through a bounded queue to one writer thread, so a store that is locked by
another process or on a slow disk never holds the proxy's event loop (SQLite's busy timeout
is waited out in that thread). A write returns a :class:`concurrent.futures.Future` its
caller may await off the loop; the wrapper knows whether the store currently works (the last
write failed or not) and says so to ``on_state``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from fleetgate.errors import StateError
from fleetgate.kill.core import KillStore
from fleetgate.kill.graph import Node
from fleetgate.kill.model import Action
from fleetgate.sqlite import SqliteStore, WriterThread

__all__ = ["KillStore", "QueuedKillStore", "SqliteKillStore", "StateListener"]

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

    def probe(self) -> None:
        """Take the write lock and give it back: raises while another process holds it (or
        the file cannot be written), so a failing store notices when it works again."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("ROLLBACK")

    # -- actions in force ------------------------------------------------------------

    def save_action(self, action: Action) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO actions (id, body) VALUES (?, ?)",
                             (action.id, json.dumps(action.to_json())))

    def replace_actions(self, actions: list[Action]) -> None:
        """Make the stored actions exactly ``actions``, in one transaction (after writes
        were lost while the store failed: a stop kept, a lift not forgotten)."""
        with self._lock, self._db:
            self._db.execute("DELETE FROM actions")
            self._db.executemany("INSERT INTO actions (id, body) VALUES (?, ?)",
                                 [(a.id, json.dumps(a.to_json())) for a in actions])

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


StateListener = Callable[[str, BaseException | None, bool], None]
"""``(op, error or None, changed)``: after each write; ``changed`` when the store went from
working to failing or back. Called in the writer thread."""


class QueuedKillStore:
    """A :class:`KillStore` whose writes run in order on one writer thread.

    The queue is bounded (``size``): when it is full a write raises :class:`StateError` at
    once instead of queueing without end (the store stopped keeping up). Reads
    (:meth:`actions`, :meth:`nodes`, :meth:`log`: startup and the admin API's threads) first
    wait, boundedly, for the writes already queued, so they see them.
    """

    def __init__(self, inner: KillStore, size: int = 1000,
                 on_state: StateListener | None = None, clock: Callable[[], float] = time.time
                 ) -> None:
        self.inner = inner
        self.on_state = on_state
        self.clock = clock
        self.ok = True
        self.error: str | None = None
        self.failing_since: float | None = None
        self._size = size
        self._writer = WriterThread("fleetgate-kill-writer", size)

    # -- the writer --------------------------------------------------------------------

    def _submit(self, op: str, job: Callable[[], Any]) -> Future[Any]:
        def run() -> Any:
            try:
                result = job()
            except BaseException as exc:  # the caller (and on_state) decide what it means
                self._report(op, exc)
                raise
            if op != "sync":
                self._report(op, None)
            return result
        try:
            return self._writer.submit(run)
        except StateError:
            exc = StateError(f"{self._size} kill-switch store writes are waiting "
                             "(the store is locked or slow)")
            self._report(op, exc)
            raise exc from None

    def _report(self, op: str, exc: BaseException | None) -> None:
        was = self.ok
        if exc is None:
            self.ok, self.error, self.failing_since = True, None, None
        else:
            self.ok, self.error = False, f"{type(exc).__name__}: {exc}"
            if was:
                self.failing_since = self.clock()
        if self.on_state is not None:
            self.on_state(op, exc, was != self.ok)

    def pending(self) -> int:
        return self._writer.pending()

    def sync(self, timeout: float = 10.0) -> None:
        """Wait (at most ``timeout``) until the writes queued so far have run."""
        with contextlib.suppress(StateError, FutureTimeout):
            self._submit("sync", lambda: None).result(timeout)

    def status(self) -> dict[str, Any]:
        return {"ok": self.ok, "error": self.error, "failing_since": self.failing_since,
                "pending_writes": self.pending()}

    # -- KillStore: writes (queued) ----------------------------------------------------

    def save_action(self, action: Action) -> Future[Any]:
        return self._submit("action", lambda: self.inner.save_action(action))

    def remove_action(self, action_id: str) -> Future[Any]:
        return self._submit("action", lambda: self.inner.remove_action(action_id))

    def replace_actions(self, actions: list[Action]) -> Future[Any]:
        return self._submit("action", lambda: self.inner.replace_actions(actions))

    def save_node(self, node: Node) -> Future[Any]:
        return self._submit("session", lambda: self.inner.save_node(node))

    def forget_nodes(self, sessions: list[str]) -> Future[Any]:
        return self._submit("session", lambda: self.inner.forget_nodes(sessions))

    def append(self, event: str, body: dict[str, Any], action: str | None = None,
               at: float | None = None) -> Future[Any]:
        at = at if at is not None else self.clock()
        return self._submit("log", lambda: self.inner.append(event, body, action, at))

    def append_many(self, rows: list[tuple[str, dict[str, Any], str | None]],
                    at: float | None = None) -> Future[Any]:
        at = at if at is not None else self.clock()
        return self._submit("log", lambda: self.inner.append_many(rows, at))

    def probe(self) -> Future[Any] | None:
        """While failing and idle, try the store once (a cheap write lock round trip), so
        recovery is noticed without waiting for real work."""
        probe = getattr(self.inner, "probe", None)
        if self.ok or probe is None or self.pending():
            return None
        with contextlib.suppress(StateError):
            return self._submit("probe", probe)
        return None

    # -- KillStore: reads --------------------------------------------------------------

    def actions(self) -> list[Action]:
        self.sync()
        return self.inner.actions()

    def nodes(self) -> list[Node]:
        self.sync()
        return self.inner.nodes()

    def log(self, limit: int = 100, action: str | None = None,
            since: float | None = None) -> list[dict[str, Any]]:
        self.sync()
        return self.inner.log(limit, action, since)

    def close(self, timeout: float = 10.0) -> None:
        """Finish the queued writes (at most ``timeout``), then close the store."""
        self._writer.close(timeout)
        self.inner.close()
