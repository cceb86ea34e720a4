"""SharedState: the Redis connection the gateways of one fleet share, and whether it works.

Built once in ``pipeline()``; the :class:`fleetgate.addons.state_backend.StateBackend` addon
sets :attr:`settings` from ``fleetgate_state`` (``None``: the embedded SQLite default, the
services keep their own stores). Every Redis-backed part reports each operation's outcome
(:meth:`failed`, :meth:`worked`), so there is one answer to "is the shared state usable":
``/healthz/ready`` (``state.redis``, and ``ready: false`` while it fails: the other replicas
may still reach Redis, so this one stops taking agents), ``fleetgate_state_ok{store="redis"}``,
``fleetgate_state_errors_total{store="redis",op}`` and one ERROR line when it starts failing,
one WARNING when it works again. The addon pings Redis every second, so recovery is noticed
without waiting for traffic.

No part falls back to per-process state when Redis fails: each refuses what it cannot check
(see the README's "State and replicas").
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aioredis

from fleetgate.metrics import GatewayMetrics
from fleetgate.stores.redis_conn import RedisSettings

__all__ = ["SharedState"]

log = logging.getLogger("fleetgate.state")


class SharedState:
    def __init__(self, metrics: GatewayMetrics, clock: Callable[[], float] = time.time) -> None:
        self.metrics = metrics
        self.clock = clock
        self.settings: RedisSettings | None = None
        self.ok = True
        self.error: str | None = None
        self.failing_since: float | None = None
        self._lock = threading.Lock()
        self._sync: redis.Redis | None = None
        self._async: dict[int, aioredis.Redis] = {}  # per event loop (id)
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def enabled(self) -> bool:
        return self.settings is not None

    def use(self, settings: RedisSettings | None) -> None:
        """From now on the shared state is ``settings`` (``None``: none)."""
        with self._lock:
            old_sync, self._sync = self._sync, None
            self._async = {}  # connections of the old ones close with them (their loop)
            self.settings = settings
            self.ok, self.error, self.failing_since = True, None, None
        if old_sync is not None:
            old_sync.close()
        if settings is not None:
            self.metrics.state_ok.labels(store="redis").set(1)

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(ok)`` when the shared state starts failing or works again."""
        self._listeners.append(listener)

    # -- clients ----------------------------------------------------------------------

    def sync_client(self) -> redis.Redis:
        """The thread-safe client (writer threads, admin API threads)."""
        with self._lock:
            if self.settings is None:
                raise RuntimeError("fleetgate_state is not a Redis URL")
            if self._sync is None:
                self._sync = self.settings.sync_client()
            return self._sync

    def async_client(self) -> aioredis.Redis:
        """The asyncio client of the running event loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.settings is None:
                raise RuntimeError("fleetgate_state is not a Redis URL")
            client = self._async.get(id(loop))
            if client is None:
                client = self._async[id(loop)] = self.settings.async_client()
            return client

    def key(self, *parts: str) -> str:
        assert self.settings is not None
        return self.settings.key(*parts)

    # -- health -----------------------------------------------------------------------

    def failed(self, op: str, exc: BaseException | str) -> None:
        """An operation on the shared state failed (any thread)."""
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        self.metrics.state_errors.labels(store="redis", op=op).inc()
        with self._lock:
            was, self.ok, self.error = self.ok, False, f"{op}: {text}"
            if was:
                self.failing_since = self.clock()
        if was:
            self.metrics.state_ok.labels(store="redis").set(0)
            where = self.settings.redacted() if self.settings else "?"
            log.error("fleetgate: shared state (Redis at %s) is failing: %s: %s; budgeted and "
                      "rate-limited calls and new sessions are refused, kill decisions keep the "
                      "last known actions, and this replica reports unready until it works "
                      "again", where, op, text)
            self._tell(False)

    def worked(self) -> None:
        """An operation on the shared state succeeded."""
        if self.ok:
            return
        with self._lock:
            was, self.ok, self.error, self.failing_since = self.ok, True, None, None
        if not was:
            self.metrics.state_ok.labels(store="redis").set(1)
            log.warning("fleetgate: shared state (Redis) works again")
            self._tell(True)

    def _tell(self, ok: bool) -> None:
        for fn in list(self._listeners):
            try:
                fn(ok)
            except Exception:
                log.exception("fleetgate: shared-state listener failed")

    def status(self) -> dict[str, Any]:
        """``state.redis`` in ``/healthz/ready``."""
        s = self.settings
        if s is None:
            return {"ok": True, "engine": "embedded"}
        return {"ok": self.ok, "engine": "redis", "url": s.redacted(), "replica": s.replica,
                "error": self.error, "failing_since": self.failing_since}

    async def ping(self) -> bool:
        """One PING from the event loop; reports the outcome."""
        if self.settings is None:
            return True
        try:
            await self.async_client().ping()  # type: ignore[misc]  # redis: Awaitable | bool
        except (redis.RedisError, OSError) as exc:
            self.failed("ping", exc)
            return False
        self.worked()
        return True
