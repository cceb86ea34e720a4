"""The decision log's sink: a bounded queue, one writer thread, files that rotate and reopen.

Why a thread: a write to a slow or full disk must never stall the event loop every agent's
flows run on. Lines are queued (bounded: :data:`QUEUE_MAX`) and written by one thread, in
order. A caller that needs a line on disk before it goes on (``fleetgate_audit_required``: no
call reaches the upstream unaudited) awaits :meth:`AuditSink.write`, which returns once the
writer thread's ``write(2)`` of that line succeeded on every target and raises
:class:`AuditUnavailable` naming the cause when it failed or did not finish within the wait.
"Durable" means handed to the kernel: the line survives the gateway being killed, not a
power loss (no ``fsync`` per line).

Why not ``logging.handlers.RotatingFileHandler``: a logging handler swallows a failed write
(``handleError`` prints it to stderr and returns), so the caller can never learn that its
line was lost, which is exactly what audit-required must know. :class:`FileTarget` does the
same two things with the stdlib: size-based rotation with ``backups`` numbered files
(``path.1`` newest), and ``WatchedFileHandler``'s reopen when the file was moved or deleted
(``logrotate`` without ``copytruncate``), plus a reopen on request (``SIGHUP``).

A target that failed is reopened on the next line and, when a failed write left a partial
line behind, truncated back to the last whole line; recovery needs no restart, only a line
that can be written again.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from fleetgate.errors import StateError

__all__ = ["QUEUE_MAX", "AuditSink", "AuditUnavailable", "FileTarget", "StreamTarget", "Target"]

log = logging.getLogger("fleetgate.decisions")

QUEUE_MAX = 10_000  # lines waiting for the writer; past it a line is refused, never blocked on
FLUSH_SECONDS = 0.05  # a line nobody waits for is written at most this late
BATCH_MAX = 256  # lines per write(2): rotation and a failure are judged per batch


class AuditUnavailable(StateError):
    """A decision line could not be written (the message names the cause)."""


class Target(Protocol):
    name: str

    def write(self, data: bytes) -> None: ...
    def reopen(self) -> None: ...
    def close(self) -> None: ...


class StreamTarget:
    """stdout (Kubernetes: the container runtime collects and rotates it)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream
        self.name = "-"

    def write(self, data: bytes) -> None:
        out = self.stream or sys.stdout
        out.write(data.decode())
        out.flush()

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass


class FileTarget:
    """One append-only file: size-based rotation with retention, reopen when moved."""

    def __init__(self, path: str, max_bytes: int = 0, backups: int = 0) -> None:
        self.name = self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None
        self._size = 0  # bytes of whole lines in the open file
        self._regular = True
        self._dirty = False  # a failed write may have left a partial line after _size
        self._reopen = False

    def open(self) -> None:
        """Open (create) the file for appending; raises ``OSError``."""
        self.close()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        st = os.fstat(fd)
        self._fd, self._ident = fd, (st.st_dev, st.st_ino)
        self._regular = stat.S_ISREG(st.st_mode)
        self._size = st.st_size if self._regular else 0
        self._dirty = self._reopen = False

    def reopen(self) -> None:
        """Reopen before the next line (``SIGHUP``; set from any thread)."""
        self._reopen = True

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)

    def write(self, data: bytes) -> None:
        """Append ``data`` whole, rotating first if it would pass ``max_bytes``."""
        if self._fd is None or self._reopen or self._moved():
            self.open()
        if self._dirty:
            self._truncate()
        if (self.max_bytes and self._regular and self._size
                and self._size + len(data) > self.max_bytes):
            self._rotate()
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError:
            self._dirty = True
            raise
        self._size += len(data)

    def _moved(self) -> bool:
        """``WatchedFileHandler``: the path names another file now, or none."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self._ident

    def _truncate(self) -> None:
        """Drop what a failed write left after the last whole line (a regular file only)."""
        assert self._fd is not None
        if self._regular and os.fstat(self._fd).st_size > self._size:
            os.ftruncate(self._fd, self._size)
        self._dirty = False

    def _rotate(self) -> None:
        """``path`` -> ``path.1`` -> ... -> ``path.<backups>``; the oldest is deleted."""
        self.close()
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                src = f"{self.path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        else:
            os.remove(self.path)
        self.open()




class AuditSink:
    """Lines to every target in order, from one writer thread; health for probes.

    ``on_error(cause)`` and ``on_recover()`` are called from the writer thread on a change of
    state (healthy -> failing and back), ``on_write_error()`` on every failed line: the owner
    counts and logs (Prometheus counters and ``logging`` are thread-safe).
    """

    def __init__(self, targets: list[Target], *, queue_max: int = QUEUE_MAX,
                 on_write_error: Callable[[], None] = lambda: None,
                 on_state: Callable[[bool, str | None], None] = lambda ok, cause: None,
                 clock: Callable[[], float] = time.time) -> None:
        self.targets = targets
        self.on_write_error = on_write_error
        self.on_state = on_state
        self.clock = clock
        self.ok = True
        self.cause: str | None = None
        self.failed_at: float | None = None
        self.errors = 0
        self.written = 0
        self.queue_max = queue_max
        # Lines in submission order (deque appends and pops are thread-safe). A line nobody
        # waits for does not wake the writer: it is written with the next urgent one or
        # within FLUSH_SECONDS, so under load a batch is one wake-up of the writer thread,
        # not one per line (a wake-up per line cost the event loop ~0.3 ms per request in
        # GIL hand-offs). A line someone awaits (audit required) wakes it at once.
        self._lines: collections.deque[tuple[bytes, concurrent.futures.Future[None]]] = (
            collections.deque())
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="fleetgate-decision-log",
                                        daemon=True)
        self._thread.start()

    # -- callers (event loop) ------------------------------------------------------------

    def submit(self, line: str, urgent: bool = False) -> concurrent.futures.Future[None]:
        """Queue a line; never blocks. The future fails when the line was not written.
        ``urgent``: someone waits for it, so the writer is woken now."""
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        if len(self._lines) >= self.queue_max:
            self._failed(f"{self.queue_max} lines wait for the writer (disk too slow)")
            fut.set_exception(AuditUnavailable(str(self.cause)))
            return fut
        self._lines.append((line.encode() + b"\n", fut))
        if urgent:
            self._wake.set()
        return fut

    async def write(self, line: str, timeout: float) -> None:
        """Return once ``line`` is written; :class:`AuditUnavailable` when it was not, or not
        within ``timeout`` seconds (the line may still be written later)."""
        fut = self.submit(line, urgent=True)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), timeout)
        except TimeoutError:
            raise AuditUnavailable(
                f"the decision log did not take the line within {timeout:g} s "
                f"({len(self._lines)} lines queued)") from None

    def reopen(self) -> None:
        """Reopen every file before its next line (external rotation, ``SIGHUP``)."""
        for t in self.targets:
            t.reopen()

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "targets": [t.name for t in self.targets],
                               "queued": len(self._lines), "written": self.written,
                               "write_errors": self.errors}
        if not self.ok:
            out.update(error=self.cause, since=self.failed_at)
        return out

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to ``timeout``), then close the files."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        for t in self.targets:
            t.close()

    # -- writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(FLUSH_SECONDS)
            self._wake.clear()
            while self._lines:  # everything queued so far, in order, as one batch
                batch: list[tuple[bytes, concurrent.futures.Future[None]]] = []
                while self._lines and len(batch) < BATCH_MAX:
                    batch.append(self._lines.popleft())
                self._write(batch)
            if self._stop:
                return

    def _write(self, batch: list[tuple[bytes, concurrent.futures.Future[None]]]) -> None:
        data = b"".join(d for d, _ in batch)
        failure: str | None = None
        for t in self.targets:
            try:
                t.write(data)
            except Exception as exc:  # never let one batch end the writer
                failure = f"{t.name}: {exc}"
        if failure is None:
            self.written += len(batch)
            if not self.ok:
                self.ok, self.cause = True, None
                self.on_state(True, None)
            for _, fut in batch:
                fut.set_result(None)
            return
        for data_line, fut in batch:
            self._failed(failure)
            log.error("fleetgate: decision log line not written (%s): %s", failure,
                      data_line.decode(errors="replace").rstrip("\n"))
            fut.set_exception(AuditUnavailable(failure))

    def _failed(self, cause: str) -> None:
        self.errors += 1
        self.on_write_error()
        was_ok, self.cause = self.ok, cause
        if was_ok:
            self.ok, self.failed_at = False, self.clock()
            self.on_state(False, cause)
