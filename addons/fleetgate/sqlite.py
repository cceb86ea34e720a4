"""The embedded state engine's one way of opening SQLite (budgets, kill switch).

One file in the state directory (WAL, so readers never wait for the writer) or, with
``path=None``, memory (tests, ``fleetgate_state_dir=''``). Connections are shared across the
proxy's event loop and the admin API's threads, so each store guards its connection with a
lock; autocommit (``isolation_level=None``) makes every statement its own transaction.
"""

from __future__ import annotations

import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from fleetgate.errors import StateError

__all__ = ["SqliteStore", "WriterThread", "open_db"]


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


class WriterThread:
    """One thread that runs a store's writes in order, off the event loop.

    A store that is locked by another process or on a slow disk then delays only the callers
    that wait for its answer (with their own bound), never the proxy's event loop. The queue
    is bounded: :meth:`submit` raises :class:`fleetgate.errors.StateError` rather than queueing
    without end (the store has stopped keeping up: locked, slow disk).
    ``idle`` (if given) runs every ``idle_every`` seconds the queue stays empty, in the thread
    (retries of writes that failed).
    """

    def __init__(self, name: str, size: int = 1000, idle: Callable[[], object] | None = None,
                 idle_every: float = 1.0) -> None:
        self._queue: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue(size)
        self._idle = idle
        self._idle_every = idle_every
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def pending(self) -> int:
        return self._queue.qsize()

    def submit[T](self, job: Callable[[], T]) -> Future[T]:
        fut: Future[T] = Future()
        try:
            self._queue.put_nowait((job, fut))
        except queue.Full:
            raise StateError(f"{self._queue.maxsize} writes are waiting") from None
        return fut

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._idle_every)
            except queue.Empty:
                if self._idle is not None:
                    self._idle()
                continue
            if item is None:
                return
            job, fut = item
            if not fut.set_running_or_notify_cancel():
                continue  # its caller gave up before it started
            try:
                fut.set_result(job())
            except BaseException as exc:  # handed to the caller, who decides
                fut.set_exception(exc)

    def close(self, timeout: float = 5.0) -> None:
        """Finish what is queued (within ``timeout``), then stop."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
