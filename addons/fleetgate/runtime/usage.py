"""The usage totals of ``GET /usage`` for the whole fleet when gateways share Redis.

Why: each gateway's :class:`fleetgate.llm.ledger.Ledger` counts only the calls it served; with
several replicas an operator asking any one of them must see the fleet. Every metered call is
added (from a task, never blocking the event loop) to Redis hashes: ``usage:fleet``,
``usage:agent:<agent>`` and ``usage:session:<session>`` (sessions expire a week after their
last call), ranked by cost in ``usage:rank:agents`` / ``usage:rank:sessions`` (bounded).
``/usage`` then reads Redis (an admin thread, the sync client); embedded, it is the ledger's own
snapshot. Usage is reporting, not enforcement: a write Redis does not take is reported
(``fleetgate_state_errors_total{store="redis",op="usage"}``) and that call is missing from the
fleet's totals; ``/usage`` answers 503 while Redis cannot be read.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis

from fleetgate.errors import StateError
from fleetgate.llm.ledger import Ledger, Totals
from fleetgate.llm.usage import Usage
from fleetgate.runtime.shared import SharedState

__all__ = ["SharedUsage"]

log = logging.getLogger("fleetgate.usage")

SESSION_TTL = 7 * 86400  # seconds a session's totals outlive its last call
MAX_RANKED = 100_000  # agents / sessions kept in a ranking (as the ledger's max_keys)
_INT_FIELDS = ("calls", "input", "output", "cache_read", "cache_write", "reasoning",
               "unpriced_calls", "estimated_calls")


class SharedUsage:
    def __init__(self, ledger: Ledger, shared: SharedState) -> None:
        self.ledger = ledger
        self.shared = shared
        self._tasks: set[asyncio.Task[None]] = set()
        ledger.listeners.append(self._added)

    def _added(self, agent: str | None, session: str | None, usage: Usage,
               cost: float | None) -> None:
        if not self.shared.enabled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not on the event loop (unit tests of the ledger): nothing to share
        task = loop.create_task(self._write(agent, session, usage, cost))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, agent: str | None, session: str | None, usage: Usage,
                     cost: float | None) -> None:
        k = self.shared.key
        incr = {"calls": 1, "input": usage.input, "output": usage.output,
                "cache_read": usage.cache_read, "cache_write": usage.cache_write,
                "reasoning": usage.reasoning, "unpriced_calls": int(cost is None),
                "estimated_calls": int(usage.estimated)}
        try:
            pipe = self.shared.async_client().pipeline(transaction=True)
            targets = [k("usage", "fleet")]
            if agent:
                targets.append(k("usage", "agent", agent))
                pipe.zincrby(k("usage", "rank", "agents"), cost or 0.0, agent)
            if session:
                targets.append(k("usage", "session", session))
                pipe.zincrby(k("usage", "rank", "sessions"), cost or 0.0, session)
            for t in targets:
                for f, v in incr.items():
                    if v:
                        pipe.hincrby(t, f, v)
                if cost:
                    pipe.hincrbyfloat(t, "cost_usd", cost)
            if session:
                pipe.expire(k("usage", "session", session), SESSION_TTL)
            await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self.shared.failed("usage", exc)
            return
        self.shared.worked()

    def snapshot(self, top: int = 1000) -> dict[str, Any]:
        """``GET /usage``: the fleet's totals from Redis, or this process's ledger."""
        if not self.shared.enabled:
            return self.ledger.snapshot(top)
        k = self.shared.key
        try:
            c = self.shared.sync_client()
            agents = [_text(a) for a in c.zrevrange(k("usage", "rank", "agents"), 0, top - 1)]  # type: ignore[union-attr]
            sessions = [_text(s) for s in c.zrevrange(k("usage", "rank", "sessions"), 0, top - 1)]  # type: ignore[union-attr]
            pipe = c.pipeline(transaction=False)
            pipe.hgetall(k("usage", "fleet"))
            for a in agents:
                pipe.hgetall(k("usage", "agent", a))
            for s in sessions:
                pipe.hgetall(k("usage", "session", s))
            pipe.zremrangebyrank(k("usage", "rank", "agents"), 0, -MAX_RANKED - 1)
            pipe.zremrangebyrank(k("usage", "rank", "sessions"), 0, -MAX_RANKED - 1)
            raw = pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self.shared.failed("usage", exc)
            raise StateError(f"cannot read the fleet's usage from Redis ({exc})") from None
        self.shared.worked()
        fleet, rest = raw[0], raw[1:1 + len(agents) + len(sessions)]
        return {"fleet": _totals(fleet).as_dict(),
                "agents": {a: _totals(h).as_dict() for a, h in zip(agents, rest, strict=False) if h},
                "sessions": {s: _totals(h).as_dict()
                             for s, h in zip(sessions, rest[len(agents):], strict=False) if h},
                "evicted": {"agents": 0, "sessions": 0}, "scope": "fleet"}


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _totals(raw: dict[Any, Any]) -> Totals:
    t = Totals()
    fields = {_text(f): _text(v) for f, v in raw.items()}
    for f in _INT_FIELDS:
        setattr(t, f, int(fields.get(f, 0)))
    t.cost_usd = float(fields.get("cost_usd", 0.0))
    return t
