"""The recent sessions' decision records, in memory: what ``GET /v1/trace/<session>`` answers.

Pure (no mitmproxy): :class:`RecentSessions` is a DecisionLog listener (``add(record, flow)``,
the flow ignored) and the admin API's view. It is bounded three ways, so a long-running
gateway or an agent looping a million calls cannot grow it:

* at most ``max_sessions`` sessions; the least recently active one (the one whose last record
  is oldest) is evicted first, whole;
* at most ``max_records_per_session`` records per session: the oldest are dropped and counted,
  and the tree says how many (:attr:`fleetgate.telemetry.tree.SessionNode.dropped`);
* at most ``max_records`` records in all: least recently active sessions are evicted until
  the store is under it again (each record is evicted once: O(1) amortised per add).

The defaults keep 20,000 records (a few tens of MB of dicts at most): enough for the families
an operator asks about while they run or just after, never a replacement for the decision log
files (``fleetgate trace --log``). Records come from the event loop's thread and are read by the
admin listener's threads, so one lock guards the store; every operation under it is O(1),
except :meth:`RecentSessions.family`, which copies one family out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from fleetgate.errors import NotFound
from fleetgate.telemetry.tree import build, to_json

__all__ = ["DEFAULT_MAX_RECORDS", "DEFAULT_MAX_RECORDS_PER_SESSION", "DEFAULT_MAX_SESSIONS",
           "RecentSessions"]

DEFAULT_MAX_SESSIONS = 1000
DEFAULT_MAX_RECORDS_PER_SESSION = 500
DEFAULT_MAX_RECORDS = 20_000
# an ancestor chain longer than this is a cycle or a bug: delegation depth is small
_MAX_DEPTH = 64


@dataclass
class _Session:
    records: deque[dict[str, Any]]
    parent: str | None = None
    dropped: int = 0


class RecentSessions:
    """The last records of the most recently active sessions, and their family links."""

    def __init__(self, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 max_records_per_session: int = DEFAULT_MAX_RECORDS_PER_SESSION,
                 max_records: int = DEFAULT_MAX_RECORDS) -> None:
        if min(max_sessions, max_records_per_session, max_records) < 1:
            raise ValueError("RecentSessions bounds must be >= 1")
        self.max_sessions = max_sessions
        self.max_records_per_session = max_records_per_session
        self.max_records = max(max_records, max_records_per_session)
        self._sessions: OrderedDict[str, _Session] = OrderedDict()  # oldest activity first
        # parent -> children seen, kept while a child lives even after its parent was evicted
        # (the child still names it); an entry goes when its last child does
        self._children: dict[str, set[str]] = {}
        self._records = 0
        self.evicted_sessions = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def records(self) -> int:
        return self._records

    def add(self, record: dict[str, Any], flow: Any = None) -> None:
        """DecisionLog listener: keep ``record`` if it belongs to a session (``flow`` unused)."""
        sid = record.get("session")
        if not isinstance(sid, str) or not sid or record.get("phase"):
            return  # no session: no family to show; a "request" pre-line: not final
        with self._lock:
            s = self._sessions.get(sid)
            if s is None:
                parent = record.get("parent_session")
                parent = parent if isinstance(parent, str) and parent != sid else None
                s = _Session(deque(maxlen=self.max_records_per_session), parent)
                self._sessions[sid] = s
                if parent:
                    self._children.setdefault(parent, set()).add(sid)
            else:
                self._sessions.move_to_end(sid)
            if len(s.records) == self.max_records_per_session:
                s.dropped += 1  # the deque drops its oldest on append
            else:
                self._records += 1
            s.records.append(record)
            while len(self._sessions) > self.max_sessions or self._records > self.max_records:
                self._evict_oldest()

    def _evict_oldest(self) -> None:
        sid, s = self._sessions.popitem(last=False)
        self._records -= len(s.records)
        self.evicted_sessions += 1
        if s.parent is not None:
            siblings = self._children.get(s.parent)
            if siblings is not None:
                siblings.discard(sid)
                if not siblings:
                    del self._children[s.parent]

    def family(self, session: str, ancestors: bool = False) -> list[dict[str, Any]]:
        """The records of ``session`` and its descendants (and, with ``ancestors``, of the
        sessions above it), oldest first per session; ``[]`` when it is not kept."""
        return self._family(session, ancestors)[0]

    def dropped(self, session: str) -> int:
        with self._lock:
            s = self._sessions.get(session)
            return s.dropped if s else 0

    def _family(self, session: str, ancestors: bool) -> tuple[list[dict[str, Any]],
                                                                 dict[str, int]]:
        with self._lock:
            if session not in self._sessions:
                return [], {}
            order: list[str] = []
            seen: set[str] = set()
            if ancestors:
                up: list[str] = []
                sid = self._sessions[session].parent
                while sid is not None and sid in self._sessions and sid not in seen \
                        and len(up) < _MAX_DEPTH:
                    up.append(sid)
                    seen.add(sid)
                    sid = self._sessions[sid].parent
                order += reversed(up)
            stack = [session]
            while stack:  # descendants, depth first; cycles cannot loop (seen)
                sid = stack.pop()
                if sid in seen:
                    continue
                seen.add(sid)
                if sid in self._sessions:
                    order.append(sid)
                stack.extend(sorted(self._children.get(sid, ()), reverse=True))
            out = [rec for sid in order for rec in self._sessions[sid].records]
            dropped = {sid: self._sessions[sid].dropped for sid in order
                       if self._sessions[sid].dropped}
            return out, dropped

    def trace_view(self, session: str, ancestors: str = "", records: str = "") -> dict[str, Any]:
        """``GET /v1/trace/<session>[?ancestors=1][&records=0]``: the family's tree and its
        records (the CLI renders the records, curl users read the tree)."""
        context = ancestors.lower() in ("1", "true", "yes")
        recs, dropped = self._family(session, context)
        trace = build(recs, session, context=context, dropped=dropped)
        if trace is None:
            raise NotFound(
                f"this gateway has no records of session {session!r}: it keeps the last "
                f"{self.max_sessions} active sessions since it started; read its decision "
                f"log instead: fleetgate trace {session} --log FILE")
        out: dict[str, Any] = {"session": session, "dropped": dropped, "tree": to_json(trace)}
        if records.lower() not in ("0", "false", "no"):
            out["records"] = recs
        return out
