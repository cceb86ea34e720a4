"""The kill switch on Redis: the store (a real redis-server) and the replicas' bus logic.

Two kill services in one process stand for two replicas (each its own SharedState and replica
name, one Redis): what one applies, lifts or records reaches the other through pub/sub, and
the other neither writes it again nor publishes it back; reconcile repairs what pub/sub lost.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from redisd import RedisServer

from fleetgate.addons.kill_flows import kill_service
from fleetgate.kill.graph import Node
from fleetgate.kill.model import Action, Subject, Verb, parse_scope
from fleetgate.metrics import GatewayMetrics
from fleetgate.runtime.identity import IdentityRegistry
from fleetgate.runtime.kill import KillService
from fleetgate.runtime.shared import SharedState
from fleetgate.stores.redis_conn import RedisSettings
from fleetgate.stores.redis_kill import RedisKillStore


def _shared(url: str, replica: str) -> SharedState:
    shared = SharedState(GatewayMetrics())
    shared.use(RedisSettings(url, "t", replica=replica))
    return shared


def _store(server: RedisServer, reports: list[tuple[str, Any]] | None = None
           ) -> RedisKillStore:
    shared = _shared(server.url, "r1")
    return RedisKillStore(shared.sync_client(), shared.key, "r1",
                          report=(lambda op, exc: reports.append((op, exc)))
                          if reports is not None else None)


def _stop(scope: str, reason: str = "r", at: float = 0.0) -> Action:
    return Action(Verb.STOP, parse_scope(scope), reason, at=at or time.time())


def test_the_store_round_trips_actions_sessions_and_the_log(redis_server: RedisServer) -> None:
    store = _store(redis_server)
    a, b = _stop("agent:a"), _stop("session:s1+")
    store.save_action(a)
    store.save_action(b)
    assert {x.id: x for x in store.actions()} == {a.id: a, b.id: b}
    store.remove_action(a.id)
    assert [x.id for x in store.actions()] == [b.id]
    c = _stop("role:r")
    store.replace_actions([c])  # a union: another replica's stored action stays
    assert sorted(x.id for x in store.actions()) == sorted([b.id, c.id])

    parent = Node("s1", agent="p", created=1.0)
    child = Node("s2", agent="c", parent="s1", depth=1, created=2.0, exp=99.0, via="delegation")
    store.save_node(parent)
    store.save_node(child)
    assert {n.session: n for n in store.nodes()} == {"s1": parent, "s2": child}
    store.forget_nodes(["s1"])
    assert [n.session for n in store.nodes()] == ["s2"]

    store.append("action", {"verb": "stop"}, action="x1", at=100.0)
    store.append_many([("cut", {"flow": "f1"}, "x1"), ("cut", {"flow": "f2"}, "x2")], at=200.0)
    store.append("lift", {"by": "op"}, action="x1", at=300.0)
    rows = store.log()
    assert [(r["event"], r["action"], r["at"]) for r in rows] == [
        ("action", "x1", 100.0), ("cut", "x1", 200.0), ("cut", "x2", 200.0),
        ("lift", "x1", 300.0)]
    assert rows[1]["flow"] == "f1" and all(r["replica"] == "r1" for r in rows)
    seqs = [tuple(map(int, r["seq"].split("-"))) for r in rows]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4  # stream ids: ordered like seq
    assert [r["event"] for r in store.log(limit=2)] == ["cut", "lift"]  # the newest two
    assert [r["event"] for r in store.log(action="x1")] == ["action", "cut", "lift"]
    assert [r["at"] for r in store.log(since=200.0)] == [200.0, 200.0, 300.0]
    assert [r["event"] for r in store.log(limit=1, action="x2")] == ["cut"]


def test_the_log_pages_through_a_long_stream(redis_server: RedisServer) -> None:
    store = _store(redis_server)
    store.append_many([("cut", {"n": i}, "busy") for i in range(1200)], at=10.0)
    store.append("action", {"n": -1}, action="rare", at=11.0)
    store.append_many([("cut", {"n": i}, "busy") for i in range(700)], at=12.0)
    rare = store.log(limit=5, action="rare")
    assert [r["n"] for r in rare] == [-1]
    last = store.log(limit=1000)
    assert len(last) == 1000 and last[-1]["n"] == 699 and last[0]["at"] == 10.0


def test_failures_are_reported_and_raised_and_probe_sees_recovery(
        redis_server: RedisServer) -> None:
    reports: list[tuple[str, Any]] = []
    store = _store(redis_server, reports)
    store.probe()
    assert reports[-1] == ("kill-probe", None)
    redis_server.stop()
    with pytest.raises(redis.ConnectionError):
        store.save_action(_stop("agent:z"))
    assert reports[-1][0] == "kill-action" and reports[-1][1] is not None
    with pytest.raises(redis.ConnectionError):
        store.probe()
    redis_server.start()
    store.probe()
    assert reports[-1] == ("kill-probe", None)


# -- two replicas ------------------------------------------------------------------------

def _replica(url: str, name: str) -> KillService:
    metrics = GatewayMetrics()
    shared = _shared(url, name)
    kill = kill_service(metrics, IdentityRegistry(), shared)
    kill.open_shared(shared)
    return kill


async def _until(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.01)
    return cond()


def test_what_one_replica_does_reaches_the_other_once(redis_server: RedisServer) -> None:
    async def run() -> None:
        a, b = _replica(redis_server.url, "A"), _replica(redis_server.url, "B")
        loop = asyncio.get_running_loop()
        a.attach(loop)
        b.attach(loop)
        try:
            assert await _until(lambda: bool(a.bus and a.bus.connected and b.bus
                                              and b.bus.connected))
            victim = Subject("victim", session="s-v")
            a.observe(Subject("boss", session="s-boss"), None, None)
            a.observe(Subject("kid", session="s-kid"), "s-boss", None, via="delegation")
            assert await _until(lambda: b.node("s-kid") is not None)
            kid = b.node("s-kid")
            assert kid is not None and kid.parent == "s-boss" and kid.via == "delegation"
            assert b.core.graph.descendants("s-boss") == ["s-kid"]
            assert not b.core.unsaved("s-kid")  # adopted, not written again by B

            t0 = time.perf_counter()
            out = a.apply(_stop("agent:victim", "from A"))
            assert out["new"]
            assert await _until(lambda: b.verdict(victim) is not None)
            lag = time.perf_counter() - t0
            v = b.verdict(victim)
            assert v is not None and v.action.id == out["action"]["id"] and lag < 1.0, lag
            # a family stop on A reaches the child B learnt from A
            a.apply(_stop("session:s-boss+", "family"))
            assert await _until(lambda: b.verdict(Subject("kid", session="s-kid")) is not None)

            a.core.store.sync()
            b.core.store.sync()
            raw = redis.Redis.from_url(redis_server.url)
            assert raw.hlen("{t}:kill:actions") == 2  # stored once, by A
            log = a.log(limit=100)
            assert [r["event"] for r in log].count("action") == 2
            assert {r["replica"] for r in log if r["event"] == "action"} == {"A"}
            assert b.bus is not None and a.bus is not None
            await asyncio.sleep(0.2)
            assert a.bus.received == 0, a.bus.received  # B published back nothing it adopted

            # a lift on A: out of force on B
            gone = a.lift([Verb.STOP], parse_scope("agent:victim"), "op", "done")
            assert len(gone) == 1
            assert await _until(lambda: b.verdict(victim) is None)

            # pub/sub lost a message (B unsubscribed): B's reconcile catches up, both ways
            b.bus.stop()
            late = _stop("role:late", "while B was away")
            a.apply(late)
            a.lift([Verb.STOP], parse_scope("session:s-boss+"), "op", "done")
            a.core.store.sync()
            assert b.verdict(Subject("x", role="late")) is None
            assert b.verdict(Subject("kid", session="s-kid")) is not None
            assert await b.bus.reconcile(full=True)
            assert b.verdict(Subject("x", role="late")) is not None
            assert b.verdict(Subject("kid", session="s-kid")) is None
            assert [x.id for x in b.core.board.actions.values()] == [late.id]
        finally:
            await _shutdown(a, b)
    asyncio.run(run())


async def _shutdown(*replicas: KillService) -> None:
    """Close the services, let their tasks end, close the loop's Redis connections."""
    for k in replicas:
        k.close()
    await asyncio.sleep(0.05)
    for k in replicas:
        assert k.shared is not None
        await k.shared.async_client().aclose()


def test_a_restarted_replica_reads_the_stops_before_serving(redis_server: RedisServer) -> None:
    a = _replica(redis_server.url, "A")
    a.apply(_stop("agent:victim", "stored"))
    a.observe(Subject("kid", session="s-kid"), "s-boss", None)
    a.core.flush()
    a.close()
    b = _replica(redis_server.url, "B")  # open_shared loads before any loop runs
    try:
        assert b.verdict(Subject("victim")) is not None
        assert b.node("s-kid") is not None and b.node("s-kid").parent == "s-boss"  # type: ignore[union-attr]
    finally:
        b.close()


def test_a_replica_cannot_open_the_state_while_redis_is_down(redis_server: RedisServer) -> None:
    redis_server.stop()
    with pytest.raises(redis.ConnectionError):
        _replica(redis_server.url, "A")


def test_receive_ignores_its_own_and_junk(redis_server: RedisServer) -> None:
    a = _replica(redis_server.url, "A")
    try:
        assert a.bus is not None
        own = json.dumps({"replica": "A", "op": "apply", "action": _stop("agent:x").to_json()})
        assert a.bus.receive(own) is False and not a.core.board.actions
        assert a.bus.receive(b"not json") is False
        assert a.bus.receive('{"replica": "B", "op": "apply"}') is False
        other = own.replace('"A"', '"B"')
        assert a.bus.receive(other) is True and a.verdict(Subject("x")) is not None
        a.core.store.sync()
        assert a.core.store.actions() == []  # adopted, not stored again
    finally:
        a.close()
