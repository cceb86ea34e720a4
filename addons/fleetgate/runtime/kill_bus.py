"""KillBus: a stop issued on one gateway replica reaches every replica (Redis pub/sub).

Every change this replica makes to its kill board or session graph (a new action from any
source: admin API, CLI, trigger, the rules; a lift; an expiry; a new session) is published on
``{prefix}:kill:events`` the moment it is made, from the event loop, before the store write
(which runs on the store's writer thread): the other replicas must not wait for a disk or a
queue to start cutting. One sender task publishes in order (an apply is never overtaken by its
own lift). Publishing is fire-and-forget: a lost message is repaired by the reconcile below.

A subscriber task applies what the OTHER replicas publish: an action goes into the local board
(not written again, not published again) and this replica sweeps its own in-flight flows of
that scope (its cut rows go to the shared log under its name); a lift or expiry removes it; a
new session is linked into the local graph, so a family stop reaches children that only
another replica has seen.

Pub/sub is at-most-once, so the subscriber also reconciles: when its subscription
(re)connects and every ``every`` seconds it reads the stored actions (and the sessions, when
their number changed) and makes this replica's stored-kind actions exactly the stored ones. A
replica restarted, partitioned or whose subscription dropped catches up this way. While Redis
cannot be reached the subscriber retries with backoff (each failure reported to the shared
state: ``/healthz/ready`` says unready) and the board keeps the last known actions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import redis

from fleetgate.kill.graph import Node
from fleetgate.kill.model import Action
from fleetgate.runtime.shared import SharedState
from fleetgate.stores.kill import QueuedKillStore

if TYPE_CHECKING:
    from fleetgate.runtime.kill import KillService

__all__ = ["KillBus"]

log = logging.getLogger(__name__)

RECONCILE_EVERY = 5.0  # seconds
QUEUE_MAX = 10_000  # messages waiting to be published (Redis slow or down)
BACKOFF = (0.1, 5.0)  # first and longest wait before subscribing again
ERRORS = (redis.RedisError, OSError)


class KillBus:
    def __init__(self, kill: KillService, shared: SharedState,
                 every: float = RECONCILE_EVERY) -> None:
        assert shared.settings is not None
        self.kill = kill
        self.shared = shared
        self.every = every
        self.replica = shared.settings.replica
        self.channel = shared.key("kill", "events")
        self.k_actions = shared.key("kill", "actions")
        self.k_sessions = shared.key("kill", "sessions")
        self.connected = False
        self.received = 0
        self.reconciles = 0
        self._sessions_seen = -1  # HLEN at the last full read of the sessions
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[str] | None = None
        self._resync: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the sender, subscriber and reconcile tasks on ``loop`` (once)."""
        if self._tasks:
            return
        self._loop = loop
        self._queue = asyncio.Queue(QUEUE_MAX)
        self._resync = asyncio.Event()
        self._tasks = [loop.create_task(self._send(), name="fleetgate-kill-bus-send"),
                       loop.create_task(self._listen(), name="fleetgate-kill-bus-listen"),
                       loop.create_task(self._reconciler(), name="fleetgate-kill-bus-reconcile")]

    def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        self._tasks = []
        self._queue = None

    # -- publishing ---------------------------------------------------------------------

    def publish(self, op: str, payload: dict[str, Any]) -> None:
        """Queue ``{replica, op, ...payload}`` for the channel (the core's outbox; on the
        event loop). Before the loop runs (startup, the first rules load) nothing is sent:
        every replica applies its own rules and reads the store at start."""
        queue, loop = self._queue, self._loop
        if queue is None or loop is None:
            return
        msg = json.dumps({"replica": self.replica, "op": op, **payload}, default=str)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._put(queue, msg)
        else:
            loop.call_soon_threadsafe(self._put, queue, msg)

    def _put(self, queue: asyncio.Queue[str], msg: str) -> None:
        try:
            queue.put_nowait(msg)
        except asyncio.QueueFull:  # Redis too slow to take them: the reconcile repairs
            self.shared.failed("kill-publish", f"{QUEUE_MAX} kill events waiting to be sent")

    async def _send(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            msg = await queue.get()
            try:
                await self.shared.async_client().publish(self.channel, msg)
            except ERRORS as exc:  # the others catch up by reconciling
                self.shared.failed("kill-publish", exc)
            else:
                self.shared.worked()

    # -- receiving ----------------------------------------------------------------------

    async def _listen(self) -> None:
        delay = BACKOFF[0]
        while True:
            pubsub = None
            try:
                pubsub = self.shared.async_client().pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self.channel)
                self.connected = True
                self.shared.worked()
                delay = BACKOFF[0]
                if self._resync is not None:
                    self._resync.set()  # catch up with what was missed while unsubscribed
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        self.receive(msg["data"])
            except asyncio.CancelledError:
                raise
            except ERRORS as exc:
                self.shared.failed("kill-subscribe", exc)
            except Exception:  # a bug must not end propagation: log it, subscribe again
                log.exception("fleetgate: kill-switch event subscriber failed; retrying")
            finally:
                self.connected = False
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF[1])

    def receive(self, data: bytes | str) -> bool:
        """Apply one message from another replica; False for this replica's own (or junk)."""
        try:
            m = json.loads(data)
            if not isinstance(m, dict) or m.get("replica") == self.replica:
                return False
            op = m.get("op")
            if op == "apply":
                self.kill.adopt(Action.from_json(m["action"]))
            elif op == "drop":
                key = Action.from_json(m["action"]).key if m.get("event") == "lift" else None
                self.kill.discard(str(m["id"]), key)
            elif op == "node":
                self.kill.core.adopt_node(Node.from_json(m["node"]))
            else:
                return False
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("fleetgate: ignored a malformed kill-switch event: %s", exc)
            return False
        self.received += 1
        return True

    # -- reconcile ----------------------------------------------------------------------

    async def _reconciler(self) -> None:
        resync = self._resync
        assert resync is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(resync.wait(), self.every)
            full = resync.is_set()
            resync.clear()
            try:
                done = await self.reconcile(full)
            except asyncio.CancelledError:
                raise
            except ERRORS as exc:
                self.shared.failed("kill-reconcile", exc)
                done = False
            except Exception:
                log.exception("fleetgate: kill-switch reconcile failed; retrying")
                done = False
            if full and not done:
                await asyncio.sleep(0.2)
                resync.set()  # a reconnect's catch-up must happen: try again soon

    async def reconcile(self, full: bool = False) -> bool:
        """Make this replica's board hold exactly the stored actions (rules actions aside:
        the rules file is their home) and its graph every stored session. False when skipped
        because something changed while reading (or local writes are not all stored yet):
        the next round does it."""
        kill = self.kill
        core = kill.core
        store = core.store
        if kill.store_failing() is not None or kill.actions_unsaved:
            return False  # this replica's own actions are not all in Redis: never drop them
        version = core.board.version
        if isinstance(store, QueuedKillStore):
            # every write queued before ``version`` reaches Redis before the read below
            started = time.monotonic()
            await asyncio.to_thread(store.sync, 2.0)
            if time.monotonic() - started >= 2.0 or not store.ok:
                return False
        client = self.shared.async_client()
        raw_actions = await client.hgetall(self.k_actions)  # type: ignore[misc]
        n_sessions = int(await client.hlen(self.k_sessions))  # type: ignore[misc]
        raw_nodes: dict[Any, Any] | None = None
        if full or n_sessions != self._sessions_seen:
            raw_nodes = await client.hgetall(self.k_sessions)  # type: ignore[misc]
        self.shared.worked()
        if kill.core is not core or core.board.version != version:
            return False
        if raw_nodes is not None:
            self._sessions_seen = n_sessions
            nodes = sorted((Node.from_json(json.loads(v)) for v in raw_nodes.values()),
                           key=lambda n: n.depth)
            for node in nodes:
                core.adopt_node(node)
        stored = {a.id: a for a in (Action.from_json(json.loads(v))
                                    for v in raw_actions.values())}
        for a in list(core.board.actions.values()):
            if a.source != "rules" and a.id not in stored:
                kill.discard(a.id, None, reconcile=True)
        for a in stored.values():
            here = core.board.actions.get(a.key)
            if here is None or here.id not in stored:  # a stored copy in force is enough
                kill.adopt(a, reconcile=True)
        self.reconciles += 1
        return True

    def status(self) -> dict[str, Any]:
        return {"connected": self.connected, "received": self.received,
                "reconciles": self.reconciles,
                "queued": self._queue.qsize() if self._queue is not None else 0}
