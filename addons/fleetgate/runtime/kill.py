"""KillService: the kill switch's runtime state, shared by the kill-switch addons.

It owns the decisions (:class:`fleetgate.kill.core.KillCore`: board, session graph, store),
the trigger engine, the live-flow registry and, through the identity registry, the tunnels
bound to identities. Every way of acting (operator command, admin API, trigger firing, a
rules edit) ends in :meth:`KillService.apply` or :meth:`KillService.lift`; a new action that
stops anyone sweeps the live flows and bound tunnels at once and cuts every one it reaches.

What cutting a flow means belongs to the proxy, not to this layer: :class:`FlowEffects`
(:mod:`.kill_sweep`; built from mitmproxy by the addons' ``kill_flows.kill_service``) is
handed in. Housekeeping (expiry, pruning, gauges, writing new sessions) is
:class:`fleetgate.runtime.kill_tasks.KillHousekeeping`'s job, a periodic task; the request
path never does it.

All state changes happen on the proxy's event loop; the admin API's threads go through
:meth:`KillService.call`. No store call runs on the loop: the store is a
:class:`~fleetgate.stores.kill.QueuedKillStore` (one writer thread behind a bounded queue).
An action is in force in memory at once; its write is awaited by the admin API's thread (the
answer says when it was not saved). A new session is recorded before its first request goes
on (:meth:`KillService.record`, awaited with a bound): a session the store cannot record is
refused, while sessions already recorded never wait for the store. The store's state is in
``/healthz/ready`` (:meth:`KillService.store_status`), ``fleetgate_state_errors_total`` and an
ERROR log when it starts failing; recovery is automatic (housekeeping retries).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

from fleetgate.errors import StateError
from fleetgate.kill.board import Verdict
from fleetgate.kill.core import Applied, KillCore, KillStore
from fleetgate.kill.delegation import DelegationPolicy, child_claims
from fleetgate.kill.graph import Node
from fleetgate.kill.model import Action, Scope, Subject, Verb
from fleetgate.kill.triggers import Event, Firing, Metric, TriggerEngine
from fleetgate.limits.bucket import BucketSpec, Take
from fleetgate.metrics import GatewayMetrics
from fleetgate.policy.model import Policy
from fleetgate.runtime.identity import IdentityRegistry
from fleetgate.runtime.kill_bus import KillBus
from fleetgate.runtime.kill_sweep import (
    FlowEffects,
    cut_stopped,
    source_of,
    sweep_revoked,
    sweep_stopped,
)
from fleetgate.runtime.kill_tasks import STATE, KillGauges, after_this_turn, in_loop
from fleetgate.runtime.liveflows import LiveFlows
from fleetgate.runtime.shared import SharedState
from fleetgate.stores.kill import QueuedKillStore, SqliteKillStore
from fleetgate.stores.redis_kill import RedisKillStore
from fleetgate.stores.redis_rate import RedisRates

__all__ = ["FlowEffects", "KillService", "source_of"]

log = logging.getLogger(__name__)


class KillService:
    def __init__(self, metrics: GatewayMetrics, identities: IdentityRegistry,
                 effects: FlowEffects, clock: Callable[[], float] = time.time,
                 open_store: Callable[[Path | None], KillStore] = SqliteKillStore,
                 shared: SharedState | None = None) -> None:
        self.metrics = metrics
        self.shared = shared  # Redis, when fleetgate_state names one (open_shared)
        self.bus: KillBus | None = None  # the other replicas (Redis pub/sub)
        self._rates = RedisRates()  # the fleet's throttle buckets (Redis)
        self.identities = identities
        self.effects = effects
        self.clock = clock
        self._open_store = open_store
        self.state_wait = 2.0  # seconds a new session's first request waits for its write
        self._writing: dict[str, concurrent.futures.Future[Any]] = {}  # session writes queued
        self.actions_unsaved = False  # an action write failed: reconcile when the store works
        self._resaving = False
        self.core = self._new_core(None)
        metrics.state_ok.labels(store="killswitch").set(1)
        self.gauges = KillGauges(self, metrics)
        self.engine = TriggerEngine([])
        self.live: LiveFlows[Any] = LiveFlows()
        self.pause_max_wait = 30.0
        self.max_depth = 5  # inter-agent message depth (0: unchecked)
        self.depth_header = "X-Message-Depth"
        self.triggers = False  # any trigger in the rules (KillWatch observes nothing otherwise)
        self.fingerprint_requests = False  # an identical_requests trigger needs body hashes
        self._rules_actions: tuple[Action, ...] = ()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self.core.listeners.append(self._on_change)

    # -- lifecycle ------------------------------------------------------------------------

    def _new_core(self, path: Path | None,
                  factory: Callable[[], KillStore] | None = None) -> KillCore:
        inner = factory() if factory is not None else self._open_store(path)
        store = QueuedKillStore(inner, on_state=self._store_state, clock=self.clock)
        core = KillCore(store, self.clock)
        core.on_saving = self._saving
        core.outbox = self._publish
        return core

    def open_state(self, directory: str, factory: Callable[[], KillStore] | None = None,
                   where: str | None = None) -> int:
        """Switch to the state in ``directory`` ('' keeps it in memory), or to the store
        ``factory`` opens (``where`` names it in the log); the number of actions in force it
        holds. Raises when it cannot be opened (the old state stays). Without a factory the
        replicas' bus, if any, is stopped (the state is this process's own again)."""
        core = self._new_core(Path(directory) / "killswitch.sqlite" if directory else None,
                              factory)
        try:
            n = core.load()
        except BaseException:
            core.store.close()
            raise
        old, self.core = self.core, core
        self._writing.clear()
        core.listeners.append(self._on_change)
        core.set_rules_actions(self._rules_actions)  # a policy may have loaded first
        old.store.close()
        if n:
            log.warning("fleetgate: %d kill-switch action(s) in force from %s", n,
                        where or directory)
        self.gauges.in_force()
        if factory is None:
            self._use_bus(None)
        return n

    def open_shared(self, shared: SharedState) -> int:
        """Keep the kill state in Redis (``fleetgate_state``), shared with every replica, and
        tell them what changes here (:class:`KillBus`). Raises when Redis cannot be read:
        a gateway must not serve before it knows the stops in force."""
        settings = shared.settings
        assert settings is not None

        def report(op: str, exc: BaseException | None) -> None:
            if exc is None:
                shared.worked()
            else:
                shared.failed(op, exc)
        n = self.open_state("", factory=lambda: RedisKillStore(
            shared.sync_client(), shared.key, settings.replica, report=report),
            where=f"Redis at {settings.redacted()}")
        self.shared = shared
        self._use_bus(KillBus(self, shared))
        return n

    def _use_bus(self, bus: KillBus | None) -> None:
        if self.bus is not None:
            self.bus.stop()
        self.bus = bus
        if bus is not None and self._loop is not None:
            bus.start(self._loop)

    def _publish(self, op: str, payload: dict[str, Any]) -> None:
        """The core's outbox: a change made here, for the other replicas."""
        if self.bus is not None:
            self.bus.publish(op, payload)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The proxy's event loop is running: paused requests can now wait on it."""
        self._loop = loop
        self._changed = asyncio.Event()
        if self.bus is not None:
            self.bus.start(loop)

    def close(self) -> None:
        if self.bus is not None:
            self.bus.stop()
        try:
            self.core.flush()
        except Exception as exc:  # shutting down: say what is lost, close all the same
            log.error("fleetgate: kill-switch sessions not saved at shutdown: %s", exc)
        self.core.store.close()

    # -- the store ------------------------------------------------------------------------

    def _store_state(self, op: str, exc: BaseException | None, changed: bool) -> None:
        """The writer thread's report after each write: metric, gauge, one ERROR log when
        the store starts failing and one when it works again."""
        if exc is not None:
            self.metrics.state_errors.labels(store="killswitch", op=op).inc()
        if not changed:
            return
        self.metrics.state_ok.labels(store="killswitch").set(0 if exc else 1)
        if exc is not None:
            log.error("fleetgate: the kill-switch store cannot be written (%s: %s): new "
                      "sessions are refused until it works again; actions stay in force but "
                      "may not survive a restart", type(exc).__name__, exc)
        else:
            log.warning("fleetgate: the kill-switch store works again; new sessions are "
                        "accepted")

    def store_status(self) -> dict[str, Any]:
        """For ``/healthz/ready`` (``state.killswitch``)."""
        store = self.core.store
        out: dict[str, Any] = store.status() if isinstance(store, QueuedKillStore) \
            else {"ok": True}
        if self.bus is not None:  # the replicas' event channel (Redis pub/sub)
            out["bus"] = self.bus.status()
        return out

    def store_failing(self) -> str | None:
        store = self.core.store
        if isinstance(store, QueuedKillStore) and not store.ok:
            return store.error or "failing"
        return None

    def probe_store(self) -> None:
        """Housekeeping: a failing store with nothing queued is tried again; once it works,
        the actions in force are written whole (a stop, a lift or an expiry whose write was
        lost while it failed would otherwise be wrong after a restart)."""
        store = self.core.store
        if not isinstance(store, QueuedKillStore):
            return
        if self.store_failing() is not None:
            self.actions_unsaved = True
            store.probe()
        if self.actions_unsaved and not self._resaving:
            # queued behind the probe: written as soon as the store takes writes again, the
            # actions as they are now (a later lift's removal is queued after it)
            self._resaving = True
            try:
                fut = store.replace_actions(self.core.stored_actions())
            except StateError:  # the queue is full: the next tick tries again
                self._resaving = False
                return
            fut.add_done_callback(self._resaved)

    def _resaved(self, fut: concurrent.futures.Future[Any]) -> None:
        """Writer thread: a reconcile finished (plain attribute writes only)."""
        self._resaving = False
        if not fut.cancelled() and fut.exception() is None:
            self.actions_unsaved = False
            log.warning("fleetgate: kill-switch actions in force written to the store again")

    def _saving(self, node: Node, handle: object) -> None:
        """The core handed a session to the store: track it until written."""
        if not isinstance(handle, concurrent.futures.Future):
            return
        self._writing[node.session] = handle
        core = self.core
        handle.add_done_callback(lambda f: self._soon(self._saved, core, node, f))

    def _saved(self, core: KillCore, node: Node, fut: concurrent.futures.Future[Any]) -> None:
        if self._writing.get(node.session) is fut:
            del self._writing[node.session]
        if (fut.cancelled() or fut.exception() is not None) and core is self.core:
            core.requeue(node)  # written again by the next flush (housekeeping, a request)

    def _soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` on the event loop (called from the writer thread); here without one."""
        loop = self._loop
        if loop is None or in_loop(loop):
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)

    def recorded(self, session: str) -> bool:
        return not self.core.unsaved(session) and session not in self._writing

    async def record(self, session: str) -> str | None:
        """Make sure ``session`` is in the store before its request goes on: ``None`` when it
        is (at once for a session already recorded), else why it cannot be. Waits at most
        ``state_wait`` seconds, off the event loop."""
        if self.recorded(session):
            return None
        failing = self.store_failing()
        if failing is not None:
            return f"the store is failing ({failing})"
        if session not in self._writing:
            try:
                self.core.flush()
            except StateError as exc:
                return str(exc)
        fut = self._writing.get(session)
        if fut is None:
            if self.recorded(session):
                return None  # written already (a fast store)
            return f"the store is failing ({self.store_failing() or 'the write failed'})"
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), self.state_wait)
        except TimeoutError:
            return f"not written within {self.state_wait:g}s (the store is locked or slow)"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def _on_change(self) -> None:
        """Wake every paused request so it re-reads its verdict (on the event loop)."""
        self.gauges.in_force()
        loop = self._loop
        if loop is None:
            return
        if in_loop(loop):
            self._wake()
        else:
            loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        if ev is not None:
            ev.set()

    def change_signal(self) -> asyncio.Event | None:
        """Set at the next change of the board; ``None`` before the event loop runs."""
        return self._changed

    def call[T](self, fn: Callable[[], T], then: Callable[[], object] | None = None) -> T:
        """Run ``fn`` on the event loop (from an admin API thread), or here when on it.

        One plain callback, not a coroutine: it runs at the loop's next turn and hands its
        result to this thread from inside that same callback. Through a task the answer
        waited two more turns, and after a stop those turns are the ones that tear down
        the hundred connections it cut (their end-of-flow hooks): the operator's answer
        waited for bookkeeping on flows already cut (bench (d): ~100 ms under load).
        ``then`` runs in the same callback once the result is handed over (what ``fn`` left
        to do that the answer does not need)."""
        loop = self._loop
        if loop is None or in_loop(loop):
            try:
                return fn()
            finally:
                if then is not None:
                    then()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not done.set_running_or_notify_cancel():
                return  # the admin thread gave up (timeout)
            try:
                done.set_result(fn())
            except BaseException as exc:  # the admin API turns it into its answer
                done.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
            finally:
                if then is not None:
                    then()
        loop.call_soon_threadsafe(run)
        try:
            return done.result(timeout=30)
        except TimeoutError:
            done.cancel()  # not run yet: never applied after its caller was told it failed
            raise

    # -- what the gate asks -------------------------------------------------------------

    def observe(self, subject: Subject, parent: str | None, exp: float | None,
                via: str = "token") -> Node | None:
        """Record a session (and its parent edge); GraphError when the edge is refused."""
        return self.core.observe(subject, parent, exp, via)

    def verdict(self, subject: Subject) -> Verdict | None:
        return self.core.verdict(subject)

    def take(self, verdict: Verdict) -> Take:
        """One request from a throttled scope's bucket (this process's)."""
        return self.core.board.take(verdict, self.clock())

    async def take_shared(self, verdict: Verdict) -> Take:
        """One request from a throttled scope's bucket: with Redis, the fleet's one bucket
        per action (every replica takes from it, so the ceiling holds for the fleet, not per
        replica); embedded, this process's. Raises :class:`StateError` when Redis cannot
        answer: the request is refused, never let through on a per-replica guess."""
        shared = self.shared
        if shared is None or not shared.enabled:
            return self.take(verdict)
        action = verdict.action
        assert action.throttle is not None
        spec = BucketSpec(action.throttle.requests, action.throttle.requests,
                          action.throttle.per)
        try:
            reply = await self._rates.take(shared.async_client(),
                                           [shared.key("kill", "throttle", action.id)], [spec], [1])
        except (redis.RedisError, OSError) as exc:
            shared.failed("kill.throttle", exc)
            raise StateError(f"the throttle on {action.scope.label} cannot be checked in the "
                             f"shared state ({type(exc).__name__}: {exc})") from None
        shared.worked()
        return reply.takes[-1]

    def fire(self, event: Event) -> list[Firing]:
        """Feed the trigger engine; the firings to apply."""
        return self.engine.observe(event, self.clock())

    # -- acting ---------------------------------------------------------------------------

    def apply(self, action: Action, issued: float | None = None,
              spare: object | None = None) -> dict[str, Any]:
        """Put an action in force and cut what it stops (except ``spare``, the client
        connection of the request being judged: it gets a 503 instead). On the event loop;
        its writes are queued (a failure is logged; :meth:`act` waits for them)."""
        return self._apply(action, issued, spare)[0]

    def act(self, action: Action, issued: float | None = None) -> dict[str, Any]:
        """:meth:`apply` from an admin API thread: in force at once (on the event loop),
        then its write awaited here, off the loop, at most ``state_wait`` seconds; the
        answer's ``error`` says when it was not saved."""
        later: list[Callable[[], object]] = []  # the cut flows' accounting, after the answer

        def settle() -> None:
            for fn in later:
                fn()
        out, writes = self.call(lambda: self._apply(action, issued, defer=later), settle)
        if writes and "error" not in out:
            done, waiting = concurrent.futures.wait(writes, timeout=self.state_wait)
            failed = [f.exception() for f in done if f.exception() is not None]
            what = f"{action.verb.value} on {action.scope.label} is in force but"
            if failed:
                out["error"] = (f"{what} was not saved ({failed[0]}); it will not survive a "
                                "restart")
            elif waiting:
                out["error"] = (f"{what} was not saved within {self.state_wait:g}s (the store "
                                "is locked or slow); it will not survive a restart unless the "
                                "queued write completes")
        return out

    def _apply(self, action: Action, issued: float | None = None, spare: object | None = None,
               defer: list[Callable[[], object]] | None = None
               ) -> tuple[dict[str, Any], list[concurrent.futures.Future[Any]]]:
        issued = issued if issued is not None else time.perf_counter()
        persist_error = None
        try:
            applied = self.core.apply(action)
        except Exception as exc:  # in force, but not saved: say so loudly
            log.error("fleetgate: %s", exc)
            persist_error = str(exc)
            applied = Applied(action, True, self.core.board.reach(action))
        writes = [w for w in applied.writes if isinstance(w, concurrent.futures.Future)]
        if writes:
            label = f"{action.verb.value} on {action.scope.label}"
            for w in writes:
                w.add_done_callback(lambda f: self._unsaved_action(label, f))
            failing = self.store_failing()
            if failing is not None and persist_error is None:
                persist_error = (f"{label} is in force, but the kill-switch store is failing "
                                 f"({failing}); it may not survive a restart")
        if applied.new:
            self.metrics.kill_actions.labels(verb=action.verb.value, scope=action.scope.kind.value,
                                             source=source_of(action), event="apply").inc()
            log.warning("fleetgate: %s %s by %s (%s): %s; reaches %d session(s) and %d "
                        "descendant(s)", action.verb.value, action.scope.label, action.by,
                        action.source, action.reason, len(applied.reach.sessions),
                        len(applied.reach.descendants))
        swept = cut_stopped(self, issued, spare, defer) if action.verb is Verb.STOP else None
        after_this_turn(self.gauges.sessions)  # after the cut: bookkeeping never delays it
        # command received -> last connection dropped (the reports taken after it are not
        # part of the cut); with nothing to cut, the time to put the action in force
        done = swept.last_cut if swept is not None and swept.last_cut is not None \
            else time.perf_counter()
        out: dict[str, Any] = {
            "action": applied.action.to_json(), "new": applied.new,
            "sessions": list(applied.reach.sessions),
            "descendants": list(applied.reach.descendants),
            "cut": swept.cut if swept is not None else [],
            "cut_ms": round((done - issued) * 1000, 3)}
        if persist_error:
            out["error"] = persist_error
        return out, writes

    def adopt(self, action: Action, reconcile: bool = False) -> bool:
        """Another replica applied ``action`` (it is stored already): in force here too, and
        what it stops is cut here at once (this replica's own flows and tunnels; the cut
        rows name this replica in the shared log). True when it was new here."""
        issued = time.perf_counter()
        if not self.core.adopt(action):
            return False
        log.warning("fleetgate: %s %s by %s (%s) on another replica%s: %s", action.verb.value,
                    action.scope.label, action.by, action.source,
                    " (reconcile)" if reconcile else "", action.reason)
        cut = self.sweep(issued) if action.verb is Verb.STOP else []
        if cut:
            log.warning("fleetgate: cut %d in-flight flow(s) for a stop from another replica",
                        len(cut))
        after_this_turn(self.gauges.sessions)
        return True

    def discard(self, action_id: str, key: tuple[str, str, str | None, bool] | None,
                reconcile: bool = False) -> Action | None:
        """Another replica lifted an action (``key``: the scope it lifted) or it expired
        there, or it is no longer stored (``reconcile``): out of force here too."""
        gone = self.core.discard(action_id, key)
        if gone is not None:
            log.warning("fleetgate: %s on %s lifted on another replica%s", gone.verb.value,
                        gone.scope.label, " (reconcile)" if reconcile else "")
            after_this_turn(self.gauges.sessions)
        return gone

    def _unsaved_action(self, label: str, fut: concurrent.futures.Future[Any]) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:
            self.actions_unsaved = True  # housekeeping writes them whole once the store works
            log.error("fleetgate: %s is in force but was not saved (%s); it will not survive "
                      "a restart", label, exc)

    def lift(self, verbs: Sequence[Verb], scope: Scope, by: str, reason: str) -> list[Action]:
        gone = self.core.lift(scope, verbs, by, reason)
        for a in gone:
            self.metrics.kill_actions.labels(verb=a.verb.value, scope=a.scope.kind.value,
                                             source=source_of(a), event="lift").inc()
            log.warning("fleetgate: %s on %s lifted by %s: %s", a.verb.value, a.scope.label, by,
                        reason or "no reason given")
        if gone:
            self.gauges.sessions()
        return gone

    def sweep(self, issued: float | None = None, spare: object | None = None
              ) -> list[dict[str, Any]]:
        """Cut every live flow and bound tunnel whose identity is now stopped (except the
        client connection ``spare``); what was cut (see :func:`.kill_sweep.sweep_stopped`)."""
        return sweep_stopped(self, issued, spare)

    # -- the rules ------------------------------------------------------------------------

    def on_policy(self, old: Policy | None, new: Policy) -> None:
        """Rules listener: the rules' killswitch actions and triggers, and the old
        ``revoked`` list, applied to work already running."""
        self._rules_actions = new.kill_actions
        applied, lifted = self.core.set_rules_actions(new.kill_actions)
        for r in applied:
            self.metrics.kill_actions.labels(verb=r.action.verb.value,
                                             scope=r.action.scope.kind.value, source="rules",
                                             event="apply").inc()
        self.engine.replace(new.kill_triggers)
        self.triggers = bool(new.kill_triggers)
        self.fingerprint_requests = any(t.metric is Metric.IDENTICAL_REQUESTS
                                        for t in new.kill_triggers)
        if lifted:
            log.warning("fleetgate: %d kill-switch action(s) removed from the rules lifted",
                        len(lifted))
        cut = self.sweep(time.perf_counter()) if applied else []
        if old is None or old.revoked != new.revoked:
            cut += sweep_revoked(self, new)
        if cut:
            log.warning("fleetgate: rules edit cut %d in-flight flow(s)", len(cut))

    # -- delegation and views -------------------------------------------------------------

    def child_claims(self, claims: dict[str, Any], request: dict[str, Any],
                     policy: DelegationPolicy) -> dict[str, Any]:
        """A child token's claims under ``policy`` (DelegationError when refused)."""
        return child_claims(claims, request, policy, self.core.graph, self.clock())

    def record_delegation(self, parent: Subject, child: dict[str, Any]) -> int:
        """Log an issued child token (its edge saved first: it outlives a restart before the
        token is returned); the parent's number of children (for the triggers). The writes
        are queued; a store known to be failing refuses the delegation (StateError): a child
        session the kill switch cannot record must not be issued."""
        failing = self.store_failing()
        if failing is not None:
            raise StateError(f"the kill-switch store is failing ({failing}): the child "
                             "session cannot be recorded")
        self.core.flush()
        self.core.store.append("delegate", {
            "parent_agent": parent.agent, "parent_session": parent.session,
            "child_agent": child["sub"], "child_session": child["session_id"],
            "role": child["agent_role"], "depth": child["delegation_depth"],
            "exp": child["exp"], "jti": child["jti"]}, at=self.clock())
        return self.core.graph.fanout(parent.session) if parent.session else 0

    def node(self, session: str | None) -> Node | None:
        return self.core.graph.get(session)

    def status(self) -> dict[str, Any]:
        return {**self.core.status(), "live_flows": len(self.live),
                "bound_tunnels": len(self.identities),
                "triggers": self.engine.snapshot(self.clock())}

    def sessions(self, root: str | None = None) -> list[dict[str, Any]]:
        """The session tree (from ``root``), each node marked with what applies to it."""
        def mark(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
            for n in nodes:
                v = self.core.verdict(Subject.from_identity(n))
                n["state"] = "live" if v is None else STATE[v.action.verb]
                n["action"] = v.action.id if v else None
                mark(n["children"])
            return nodes
        return mark(self.core.graph.tree(root))

    def log(self, limit: int = 100, action: str | None = None,
            since: float | None = None) -> list[dict[str, Any]]:
        return self.core.store.log(limit, action, since)
