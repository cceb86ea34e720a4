"""The kill switch's housekeeping: a periodic task, and the gauges it keeps current.

Once a second: lift what ran out (pauses and throttles with a time limit, automatic ones
mostly), write the sessions first seen since the last tick (requests only record them in
memory), refresh the sessions-by-state gauge (at once after an expiry, else every five
seconds), and every ten minutes forget sessions whose tokens expired a day ago. It runs on the
proxy's event loop, started from the kill-switch addon's ``running()``; a request never waits
for it. A verdict never depends on it: the board ignores an expired action on its own. Its
writes are queued to the store's writer thread (never waited for here); sessions whose write
failed are retried each tick, and a failing store with nothing queued is probed, so recovery
needs no restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fleetgate.errors import StateError
from fleetgate.kill.model import Verb
from fleetgate.metrics import GatewayMetrics

if TYPE_CHECKING:
    from fleetgate.runtime.kill import KillService

__all__ = ["STATE", "KillGauges", "KillHousekeeping", "after_this_turn", "in_loop"]

log = logging.getLogger(__name__)

STATE = {Verb.STOP: "stopped", Verb.PAUSE: "paused", Verb.THROTTLE: "throttled"}


class KillGauges:
    """``fleetgate_kill_actions_in_force`` and ``fleetgate_kill_sessions``."""

    def __init__(self, kill: KillService, metrics: GatewayMetrics) -> None:
        self.kill = kill
        self.metrics = metrics
        self.last_sessions = 0.0

    def in_force(self) -> None:
        actions = self.kill.core.board.actions.values()
        for verb in Verb:
            self.metrics.kill_in_force.labels(verb=verb.value).set(
                sum(1 for a in actions if a.verb is verb))

    def sessions(self, limit: int = 5_000) -> None:
        """Sessions by state. Judging every session costs O(sessions x ancestors) (actions are
        indexed by scope): past ``limit`` sessions only the unexpired total is exported (as
        ``known``), so the event loop is never held long for a gauge."""
        core = self.kill.core
        now = self.last_sessions = self.kill.clock()
        nodes = [n for n in core.graph.nodes.values()
                 if n.via != "placeholder" and (n.exp is None or n.exp > now)]
        counts = {"live": 0, "stopped": 0, "paused": 0, "throttled": 0}
        if len(nodes) > limit:
            self.metrics.kill_sessions.labels(state="known").set(len(nodes))
            return
        for n in nodes:
            v = core.board.verdict(n.subject(), now) if core.board.actions else None
            counts["live" if v is None else STATE[v.action.verb]] += 1
        for state, count in counts.items():
            self.metrics.kill_sessions.labels(state=state).set(count)


class KillHousekeeping:
    """The periodic task: :meth:`tick` every ``period`` seconds while the proxy runs."""

    def __init__(self, kill: KillService, period: float = 1.0, prune_every: float = 600.0,
                 gauges_every: float = 5.0) -> None:
        self.kill = kill
        self.period = period
        self.prune_every = prune_every
        self.gauges_every = gauges_every
        self._last_prune = kill.clock()
        self._task: asyncio.Task[None] | None = None

    def tick(self) -> None:
        kill = self.kill
        now = kill.clock()
        if kill.core.expire():
            log.info("fleetgate: automatic kill-switch action(s) lifted (time ran out)")
            kill.gauges.sessions()
        elif now - kill.gauges.last_sessions > self.gauges_every:
            kill.gauges.sessions()
        if now - self._last_prune > self.prune_every:  # sessions whose tokens expired a day ago
            self._last_prune = now
            kill.core.prune()
        try:
            kill.core.flush()
        except StateError as exc:  # the queue is full: the store is already known failing
            log.debug("fleetgate: kill-switch sessions not queued: %s", exc)
        kill.probe_store()

    def start(self) -> None:
        """Start the task on the running loop (once)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="fleetgate-kill-housekeeping")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            try:
                self.tick()
            except Exception:  # keep housekeeping alive: one bad tick must not end it
                log.exception("fleetgate: kill-switch housekeeping failed; retrying")


def in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def after_this_turn(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn`` once the event loop has done what is already queued (closing sockets);
    at once when there is no running loop (addon tests)."""
    try:
        asyncio.get_running_loop().call_soon(fn, *args)
    except RuntimeError:
        fn(*args)
