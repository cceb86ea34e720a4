"""StateBackend: which engine keeps the state several gateways share (``fleetgate_state``).

``''`` (the default) is the embedded engine: SQLite files in ``fleetgate_state_dir``, one
gateway process. A Redis URL puts limits, budgets, kill actions, the session graph and kill
log, MCP pins and sessions in Redis, so any number of gateways (replicas, workers) enforce
one fleet's rules together. This addon parses and checks the options (placed before the
addons that open stores, so their ``configure`` sees :attr:`SharedState.settings`), pings
Redis every second so a failure and a recovery are noticed without traffic, and reports the
connection in ``/healthz/ready`` (a required check: unready while Redis fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from mitmproxy import ctx, exceptions

from fleetgate.errors import ConfigError
from fleetgate.runtime.policy import PolicyService
from fleetgate.runtime.shared import SharedState
from fleetgate.stores.redis_conn import parse_state

log = logging.getLogger("fleetgate.state")

PING_EVERY = 1.0  # seconds


class StateBackend:
    def __init__(self, shared: SharedState, policies: PolicyService) -> None:
        self.shared = shared
        self._task: asyncio.Task[None] | None = None
        policies.add_status("redis", shared.status, required=True)

    def load(self, loader: Any) -> None:
        loader.add_option(
            "fleetgate_state", str, "",
            "Where shared state lives. '' (default): embedded, SQLite in fleetgate_state_dir, "
            "one gateway process. redis://host:6379/0, rediss://… (TLS, "
            "?ssl_ca_certs=/path for a private CA) or unix:///path.sock: Redis 7 or Valkey, "
            "shared by every gateway replica and worker (limits, budgets, kill actions, "
            "sessions, MCP pins).")
        loader.add_option(
            "fleetgate_state_password_file", str, "",
            "File holding the Redis password (a Kubernetes Secret); else the URL's.")
        loader.add_option(
            "fleetgate_state_prefix", str, "fleetgate",
            "Prefix (a Redis hash tag) of every key fleetgate writes: one fleet's gateways "
            "share a prefix; two fleets on one Redis use two.")

    def configure(self, updated: set[str]) -> None:
        if not {"fleetgate_state", "fleetgate_state_password_file",
                "fleetgate_state_prefix"} & updated:
            return
        o = ctx.options
        try:
            settings = parse_state(o.fleetgate_state, o.fleetgate_state_password_file,
                                   o.fleetgate_state_prefix)
        except ConfigError as exc:
            raise exceptions.OptionsError(str(exc)) from None
        self.shared.use(settings)
        if settings is not None:
            log.info("fleetgate: shared state in Redis at %s (prefix %s), replica %s",
                     settings.redacted(), settings.prefix, settings.replica)

    def running(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._pinger())

    async def _pinger(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # ping reports its own failures
                await self.shared.ping()
            await asyncio.sleep(PING_EVERY)

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
