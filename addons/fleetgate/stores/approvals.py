"""Where held actions wait for people: the approval queue (SQLite embedded, Redis shared).

Durable by design: an approval outlives the request that asked for it, the gateway process
and (with Redis) the replica. Every operation is synchronous and atomic; the proxy's event
loop calls them through a thread (:mod:`fleetgate.runtime.approvals`), the admin API from its
own threads.

One record per action *digest* is open at a time (pending, approved or denied): a retry of a
pending action joins its approval instead of asking again, a retry of a denied one is told it
was denied, and a retry of an approved one consumes it, after which the digest is free: the
next identical action asks again. "Exactly once" is :meth:`transition` being atomic: two
retries racing for one approval, on one gateway or on two, see one ``consume`` succeed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from fleetgate.approvals.model import Approval, Status
from fleetgate.errors import NotFound
from fleetgate.sqlite import SqliteStore

__all__ = ["ApprovalStore", "SqliteApprovalStore"]

Transition = Callable[[Approval], Approval]
OPEN = (Status.PENDING.value, Status.APPROVED.value, Status.DENIED.value)


class ApprovalStore(Protocol):
    def create_or_get(self, approval: Approval) -> tuple[Approval, bool]:
        """Store ``approval`` unless a record for its digest is open (pending, approved,
        denied); returns (the record, whether it is the new one)."""
        ...

    def get(self, approval_id: str) -> Approval | None: ...

    def find(self, digest: str) -> Approval | None:
        """The open record (pending, approved, denied) for this digest, if any."""
        ...

    def transition(self, approval_id: str, change: Transition) -> Approval:
        """Apply ``change`` atomically; raises what ``change`` raises, or NotFound."""
        ...

    def entries(self, status: str | None = None, limit: int = 200) -> list[Approval]: ...

    def due(self, now: float) -> list[Approval]:
        """Pending records whose window has passed."""
        ...

    def close(self) -> None: ...


class SqliteApprovalStore(SqliteStore):
    """The embedded queue: ``approvals.sqlite3`` in the state directory (memory with
    ``path=None``)."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS approvals (
        id TEXT PRIMARY KEY,
        digest TEXT NOT NULL,
        status TEXT NOT NULL,
        created REAL NOT NULL,
        deadline REAL NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS approvals_digest ON approvals (digest, status);
    CREATE INDEX IF NOT EXISTS approvals_status ON approvals (status, deadline);
    """

    def __init__(self, path: Path | None) -> None:
        super().__init__(path)

    def create_or_get(self, approval: Approval) -> tuple[Approval, bool]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                found = self._find(approval.digest)
                if found is not None:
                    self._db.execute("COMMIT")
                    return found, False
                self._put(approval, insert=True)
                self._db.execute("COMMIT")
                return approval, True
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def get(self, approval_id: str) -> Approval | None:
        with self._lock:
            row = self._db.execute("SELECT record FROM approvals WHERE id = ?",
                                   (approval_id,)).fetchone()
        return Approval.from_dict(json.loads(row[0])) if row else None

    def find(self, digest: str) -> Approval | None:
        with self._lock:
            return self._find(digest)

    def _find(self, digest: str) -> Approval | None:
        row = self._db.execute(
            "SELECT record FROM approvals WHERE digest = ? AND status IN (?, ?, ?) "
            "ORDER BY created DESC LIMIT 1", (digest, *OPEN)).fetchone()
        return Approval.from_dict(json.loads(row[0])) if row else None

    def _put(self, a: Approval, insert: bool = False) -> None:
        record = json.dumps(a.as_dict(), separators=(",", ":"))
        if insert:
            self._db.execute("INSERT INTO approvals (id, digest, status, created, deadline, "
                             "record) VALUES (?, ?, ?, ?, ?, ?)",
                             (a.id, a.digest, a.status.value, a.created, a.deadline, record))
        else:
            self._db.execute("UPDATE approvals SET status = ?, deadline = ?, record = ? "
                             "WHERE id = ?", (a.status.value, a.deadline, record, a.id))

    def transition(self, approval_id: str, change: Transition) -> Approval:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT record FROM approvals WHERE id = ?",
                                       (approval_id,)).fetchone()
                if row is None:
                    raise NotFound(f"no approval {approval_id!r} (list them: fleetgate "
                                   "approvals list)")
                new = change(Approval.from_dict(json.loads(row[0])))
                self._put(new)
                self._db.execute("COMMIT")
                return new
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def entries(self, status: str | None = None, limit: int = 200) -> list[Approval]:
        with self._lock:
            if status:
                rows = self._db.execute("SELECT record FROM approvals WHERE status = ? "
                                        "ORDER BY created DESC LIMIT ?", (status, limit))
            else:
                rows = self._db.execute("SELECT record FROM approvals ORDER BY created DESC "
                                        "LIMIT ?", (limit,))
            return [Approval.from_dict(json.loads(r[0])) for r in rows.fetchall()]

    def due(self, now: float) -> list[Approval]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM approvals WHERE status = ? AND "
                                    "deadline <= ?", (Status.PENDING.value, now)).fetchall()
        return [Approval.from_dict(json.loads(r[0])) for r in rows]
