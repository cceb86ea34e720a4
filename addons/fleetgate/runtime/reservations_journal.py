"""The spend store off the event loop: an in-memory mirror for checks, one writer thread for
writes, and the store's health.

Why: SQLite waits up to its busy timeout (5 s) for a lock another process holds, and a full
disk fails every write. Done on the event loop, the first stalls every agent, the second made
a hard budget silently unlimited. Here checks read :class:`SpendMirror` (spend totals per
window, loaded at open and kept in step with every settle), so they never touch the disk; a
call's reservation is written ahead through :class:`fleetgate.sqlite.WriterThread` and the
budget addon waits for it with a bound; settles are queued, and one that fails is kept and
retried (before the next write, and every second while idle) so no spend is lost while the
store is down. :meth:`SpendJournal.status` is what ``/healthz/ready`` shows under
``state.budgets``; a write that works again makes it ``ok`` without a restart.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any

from fleetgate.errors import StateError
from fleetgate.limits.budget import Amount
from fleetgate.sqlite import WriterThread
from fleetgate.stores.spend import Charge, Reservation, SpendStore

__all__ = ["SpendJournal", "SpendMirror"]

log = logging.getLogger("fleetgate.budgets")


class SpendMirror:
    """Spend per (budget, key, window) in memory: what the ledger reads (``spent``) and adds
    to (``add``, memory only; the journal writes it)."""

    def __init__(self, rows: Iterable[Charge] = ()) -> None:
        self._spend: dict[tuple[str, str], dict[int, Amount]] = {}
        for r in rows:
            self.add(r.budget, r.key, r.window_start, r.amount)

    def spent(self, budget: str, key: str, since: int) -> Amount:
        total = Amount()
        for start, amount in self._spend.get((budget, key), {}).items():
            if start >= since:
                total = total + amount
        return total

    def add(self, budget: str, key: str, window_start: int, amount: Amount) -> None:
        windows = self._spend.setdefault((budget, key), {})
        windows[window_start] = windows.get(window_start, Amount()) + amount

    def keys(self, budget: str, since: int, top: int = 1000) -> list[tuple[str, Amount]]:
        rows = [(k, self.spent(b, k, since)) for (b, k) in list(self._spend) if b == budget]
        rows = [(k, a) for k, a in rows if a.usd or a.tokens]
        rows.sort(key=lambda r: (-r[1].usd, -r[1].tokens))
        return rows[:top]


class SpendJournal:
    """A spend store behind a mirror and a writer thread.

    Opening it recovers reservations a crash left open (:attr:`recovered`, charged their
    reserved amount) and loads the mirror, on the caller's thread: this happens at startup or
    when ``fleetgate_state_dir`` changes, never on a request. ``on_error(op, message)`` and
    ``on_ok()`` run in the writer thread when the store's health changes (metrics, log)."""

    def __init__(self, store: SpendStore, queue_size: int = 1000,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self.recovered: list[Reservation] = store.recover()
        self.mirror = SpendMirror(store.load())
        self.on_error: Callable[[str, str], None] = lambda op, message: None
        self.on_ok: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._backlog: list[tuple[str, str, Sequence[Charge]]] = []  # (op, flow, charges)
        self.error: str | None = None
        self.error_op: str | None = None
        self.failing_since: float | None = None
        self.writer = WriterThread("fleetgate-spend", queue_size, idle=self._retry)

    # -- health -----------------------------------------------------------------------

    @property
    def ok(self) -> bool:
        return self.error is None

    def status(self) -> dict[str, Any]:
        """``state.budgets`` in ``/healthz/ready``."""
        with self._lock:
            backlog = len(self._backlog)
        out: dict[str, Any] = {"ok": self.ok, "store": "spend", "pending": self.writer.pending(),
                               "unsaved_settles": backlog}
        if self.error is not None:
            out.update(error=self.error, op=self.error_op, since=self.failing_since)
        return out

    def _failed(self, op: str, exc: BaseException) -> None:
        self.failed(op, f"{type(exc).__name__}: {exc}")

    def failed(self, op: str, message: str) -> None:
        """Record a failure (also one the caller saw: its wait for the writer ran out); the
        next write that works clears it."""
        if self.error is None:
            self.failing_since = self.clock()
        self.error, self.error_op = message, op
        self.on_error(op, message)

    def _worked(self) -> None:
        """A write that adds data worked: the store records again (once nothing is owed)."""
        if self.error is not None and not self._backlog:
            self.error = self.error_op = self.failing_since = None
            self.on_ok()

    # -- writes (in the writer thread) ------------------------------------------------

    def _retry(self) -> bool:
        """Write the settles that failed, oldest first; False when one still fails."""
        wrote = False
        while True:
            with self._lock:
                if not self._backlog:
                    break
                op, flow, charges = self._backlog[0]
            try:
                self.store.settle(flow, charges)
            except sqlite3.Error as exc:
                self._failed(op, exc)
                return False
            with self._lock:
                self._backlog.pop(0)
            wrote = wrote or bool(charges)
        if wrote:
            self._worked()
        return True

    def _hold_job(self, rows: Sequence[Reservation]) -> None:
        self._retry()
        try:
            self.store.hold(rows)
        except sqlite3.Error as exc:
            self._failed("reserve", exc)
            raise StateError(str(exc)) from None
        self._worked()

    def _settle_job(self, op: str, flow: str, charges: Sequence[Charge]) -> None:
        if not self._retry():
            with self._lock:
                self._backlog.append((op, flow, charges))
            return
        try:
            self.store.settle(flow, charges)
        except sqlite3.Error as exc:
            with self._lock:
                self._backlog.append((op, flow, charges))
            self._failed(op, exc)
            return
        if charges:  # a delete alone can work on a full disk: not proof the store records
            self._worked()

    # -- the event loop's side ---------------------------------------------------------

    def hold(self, rows: Sequence[Reservation]) -> Future[None]:
        """Queue a call's reservations; the future fails with
        :class:`fleetgate.errors.StateError` (raised at once when the queue is full) when they
        cannot be written."""
        try:
            return self.writer.submit(lambda: self._hold_job(rows))
        except StateError as exc:
            self._failed("reserve", exc)
            raise

    def settle(self, flow: str, charges: Sequence[Charge], op: str = "settle") -> None:
        """Queue the replacement of ``flow``'s reservations by ``charges`` (none: release).
        Never fails: what cannot be queued or written is kept and retried."""
        try:
            self.writer.submit(lambda: self._settle_job(op, flow, charges))
        except StateError as exc:
            with self._lock:
                self._backlog.append((op, flow, charges))
            self._failed(op, exc)

    def close(self) -> None:
        """Write what is queued (and retry what failed once more), then close the store."""
        with contextlib.suppress(StateError):
            self.writer.submit(self._retry)
        self.writer.close()
        with self._lock:
            lost = list(self._backlog)
        for op, flow, _ in lost:
            log.error("fleetgate: budget spend of flow %s (%s) was not saved before exit; its "
                      "reservation stays open and is charged at the next start", flow, op)
        self.store.close()
