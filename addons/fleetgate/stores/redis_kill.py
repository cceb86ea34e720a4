"""The kill switch's store on Redis (``fleetgate_state=redis://…``): one store for every replica.

The same :class:`~fleetgate.kill.core.KillStore` as the SQLite one, so the kill service uses it
the same way: behind :class:`~fleetgate.stores.kill.QueuedKillStore` (one writer thread, the
SYNC client; a Redis that fails makes the writes fail, which is the existing failing-store
path: new sessions refused 503 ``killswitch.state``, actions kept in memory, rewritten once it
works). Keys (all under the one hash tag, see :meth:`RedisSettings.key`):

- ``kill:actions``: hash, action id -> action JSON (what is in force; read at every start and
  by every replica's reconcile);
- ``kill:sessions``: hash, session -> node JSON (the session graph with its delegation edges);
- ``kill:log``: a STREAM, append-only (XADD only; fields ``event``, ``action``, ``at``,
  ``body`` JSON and ``replica``: each replica writes its own cut rows). Trimmed approximately
  at ``log_max`` entries, the oldest first, so Redis memory stays bounded.

Every operation's outcome goes to ``report(op, error or None)`` (the shared state's health:
``/healthz/ready``, ``fleetgate_state_errors_total{store="redis"}``); errors are raised too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import redis

from fleetgate.kill.graph import Node
from fleetgate.kill.model import Action

__all__ = ["RedisKillStore"]

Report = Callable[[str, BaseException | None], None]
LOG_MAX = 1_000_000  # kill-log entries kept (approximately)
SCAN_PAGE = 500
SKEW = 300.0  # seconds: a replica's clock may be this far from Redis's (log ``since``)


class RedisKillStore:
    """:class:`KillStore` on Redis. ``key(*parts)`` builds keys (``SharedState.key``),
    ``replica`` names this process in the log."""

    def __init__(self, client: redis.Redis, key: Callable[..., str], replica: str,
                 report: Report | None = None, log_max: int = LOG_MAX) -> None:
        self.r = client
        self.replica = replica
        self.report = report
        self.log_max = log_max
        self.k_actions = key("kill", "actions")
        self.k_sessions = key("kill", "sessions")
        self.k_log = key("kill", "log")

    def _do(self, op: str, fn: Callable[[], Any]) -> Any:
        """Run one Redis operation; report its outcome (the sync client's calls are typed
        ``Awaitable | value``: this is where the value is taken)."""
        try:
            out = fn()
        except (redis.RedisError, OSError) as exc:
            if self.report is not None:
                self.report(f"kill-{op}", exc)
            raise
        if self.report is not None:
            self.report(f"kill-{op}", None)
        return out

    def probe(self) -> None:
        """PING: raises while Redis cannot answer (a failing store notices recovery)."""
        self._do("probe", self.r.ping)

    # -- actions in force ------------------------------------------------------------

    def save_action(self, action: Action) -> None:
        self._do("action", lambda: self.r.hset(self.k_actions, action.id,
                                               json.dumps(action.to_json())))

    def replace_actions(self, actions: list[Action]) -> None:
        """After writes were lost while Redis failed: write every action this replica has in
        force. Unlike SQLite's, nothing stored is removed: other replicas may have stored
        actions meanwhile that this one never saw, and deleting them would lift their stops
        (fail open). A lift whose write was lost is therefore not replayed: the stop comes
        back on the next reconcile and must be lifted again (fail closed)."""
        if not actions:
            return
        self._do("action", lambda: self.r.hset(self.k_actions, mapping={
            a.id: json.dumps(a.to_json()) for a in actions}))

    def remove_action(self, action_id: str) -> None:
        self._do("action", lambda: self.r.hdel(self.k_actions, action_id))

    def actions(self) -> list[Action]:
        rows: dict[bytes, bytes] = self._do("read", lambda: self.r.hgetall(self.k_actions))
        return [Action.from_json(json.loads(v)) for v in rows.values()]

    # -- session graph ---------------------------------------------------------------

    def save_node(self, node: Node) -> None:
        self._do("session", lambda: self.r.hset(self.k_sessions, node.session,
                                                json.dumps(node.to_json())))

    def forget_nodes(self, sessions: list[str]) -> None:
        if sessions:
            self._do("session", lambda: self.r.hdel(self.k_sessions, *sessions))

    def nodes(self) -> list[Node]:
        rows: dict[bytes, bytes] = self._do("read", lambda: self.r.hgetall(self.k_sessions))
        return [Node.from_json(json.loads(v)) for v in rows.values()]

    # -- the append-only log (a stream) ------------------------------------------------

    def _fields(self, event: str, body: dict[str, Any], action: str | None, at: float
                ) -> dict[str, str]:
        return {"event": event, "action": action or "", "at": repr(at),
                "body": json.dumps(body, default=str), "replica": self.replica}

    def append(self, event: str, body: dict[str, Any], action: str | None = None,
               at: float | None = None) -> str:
        fields = self._fields(event, body, action, at if at is not None else time.time())
        out = self._do("log", lambda: self.r.xadd(self.k_log, fields,  # type: ignore[arg-type]
                                                  maxlen=self.log_max, approximate=True))
        return out.decode() if isinstance(out, bytes) else str(out)

    def append_many(self, rows: list[tuple[str, dict[str, Any], str | None]],
                    at: float | None = None) -> None:
        """Several rows in one MULTI (a sweep's cuts)."""
        if not rows:
            return
        now = at if at is not None else time.time()

        def run() -> None:
            pipe = self.r.pipeline(transaction=True)
            for event, body, action in rows:
                pipe.xadd(self.k_log, self._fields(event, body, action, now),  # type: ignore[arg-type]
                          maxlen=self.log_max, approximate=True)
            pipe.execute()
        self._do("log", run)

    def log(self, limit: int = 100, action: str | None = None,
            since: float | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` rows (oldest first, as SQLite's), optionally for one action id
        or at/after ``since``; ``seq`` is the stream id (ordered like SQLite's seq)."""
        limit = max(1, min(limit, 10_000))
        out: list[dict[str, Any]] = []
        top = "+"
        # stream ids carry Redis's clock: stop reading well before ``since`` (clock skew)
        floor = f"{max(0, int((since - SKEW) * 1000))}-0" if since is not None else "-"
        while len(out) < limit:
            page: list[tuple[bytes, dict[bytes, bytes]]] = self._do(
                "read", partial(self.r.xrevrange, self.k_log, max=top, min=floor,
                                count=SCAN_PAGE))
            if not page:
                break
            for sid, raw in page:
                row = _row(sid, raw)
                if action and row["action"] != action:
                    continue
                if since is not None and row["at"] < since:
                    continue
                out.append(row)
                if len(out) >= limit:
                    break
            if len(page) < SCAN_PAGE:
                break
            top = "(" + _text(page[-1][0])
        out.reverse()
        return out

    def close(self) -> None:
        """The client belongs to the shared state (other stores use it): nothing to close."""


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _row(sid: bytes | str, raw: dict[bytes, bytes]) -> dict[str, Any]:
    f = {_text(k): _text(v) for k, v in raw.items()}
    return {"seq": _text(sid), "at": float(f.get("at") or 0.0), "event": f.get("event", ""),
            "action": f.get("action") or None, "replica": f.get("replica"),
            **json.loads(f.get("body") or "{}")}
