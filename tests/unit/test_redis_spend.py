"""The budget scripts on a real Redis: a call's budgets are reserved all or nothing against
spend plus every other call's reservation; a settle replaces the reservation by the metered
spend once (a second settle, or a settle after a sweep, adds nothing); an expired reservation
is charged exactly once even with two sweepers racing; old windows are pruned."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis
from redisd import RedisServer

from fleetgate.limits.budget import Amount, BudgetSpec, Period, counted_since, window
from fleetgate.stores.redis_conn import RedisSettings
from fleetgate.stores.redis_spend import HoldRequest, RedisSpendStore, SettleCharge

DAY = BudgetSpec(Period.DAY, hard_tokens=1000)
USD = BudgetSpec(Period.DAY, hard_usd=1.0)
NOW = float(int(time.time()))


@pytest.fixture
def sync(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def store() -> RedisSpendStore:
    return RedisSpendStore(RedisSettings("redis://x", "t").key)


def run[T](redis_server: RedisServer, coro_fn: object) -> T:
    async def main() -> T:
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            return await coro_fn(client)  # type: ignore[operator, no-any-return]
        finally:
            await client.aclose()
    return asyncio.run(main())


def hold(budget: str, spec: BudgetSpec, amount: Amount, key: str = "fleet",
         now: float = NOW) -> HoldRequest:
    return HoldRequest(budget, key, counted_since(spec, now), window(spec, now)[0], amount,
                       spec.hard_usd, spec.hard_tokens, int(now) + 86400)


def charge(budget: str, spec: BudgetSpec, amount: Amount, key: str = "fleet",
           now: float = NOW) -> SettleCharge:
    return SettleCharge(budget, key, counted_since(spec, now), window(spec, now)[0], amount,
                        int(now) + 86400)


def test_reserve_refuse_settle_and_a_second_settle_adds_nothing(
        redis_server: RedisServer, sync: redis.Redis, store: RedisSpendStore) -> None:
    async def go(c: aioredis.Redis) -> None:
        snaps, refused = await store.reserve(c, "f1", "r1", NOW, NOW + 60,
                                             [hold("tok", DAY, Amount(0, 600))])
        assert refused is None and snaps == [Amount(0, 0)]
        # 600 reserved + 600 asked > 1000: refused with the numbers, nothing reserved
        snaps, refused = await store.reserve(c, "f2", "r2", NOW, NOW + 60,
                                             [hold("tok", DAY, Amount(0, 600))])
        assert refused is not None and refused.unit == "tokens" and refused.at == 0
        assert refused.promised == Amount(0, 600) and refused.spent == Amount(0, 0)
        assert sync.exists(store.record_key("f2")) == 0
        # room for 400 more: its snapshot is the other call's reservation
        snaps, refused = await store.reserve(c, "f3", "r2", NOW, NOW + 60,
                                             [hold("tok", DAY, Amount(0, 400))])
        assert refused is None and snaps == [Amount(0, 600)]
        before = await store.settle(c, "f1", [charge("tok", DAY, Amount(0.5, 120))])
        assert before == [Amount(0, 0)]
        assert store.spent(sync, "tok", "fleet", 0) == Amount(0.5, 120)
        assert store.reserved(sync, "tok", "fleet") == Amount(0, 400)
        # the same settle again (a retry) adds nothing
        assert await store.settle(c, "f1", [charge("tok", DAY, Amount(0.5, 120))]) is None
        assert store.spent(sync, "tok", "fleet", 0) == Amount(0.5, 120)
        # a release gives the reservation back and charges nothing
        assert await store.settle(c, "f3", []) == []
        assert store.reserved(sync, "tok", "fleet") == Amount(0, 0)
        assert store.spent(sync, "tok", "fleet", 0) == Amount(0.5, 120)
        assert store.report(sync, "tok", 0) == [("fleet", Amount(0.5, 120))]
    run(redis_server, go)


def test_a_call_reserves_all_its_budgets_or_none(
        redis_server: RedisServer, sync: redis.Redis, store: RedisSpendStore) -> None:
    async def go(c: aioredis.Redis) -> None:
        _, refused = await store.reserve(c, "a", "r", NOW, NOW + 60,
                                         [hold("usd", USD, Amount(0.9, 1), key="agent-1")])
        assert refused is None
        # fits the token budget, not the USD one: the token budget keeps nothing either
        _, refused = await store.reserve(c, "b", "r", NOW, NOW + 60, [
            hold("tok", DAY, Amount(0.2, 10)), hold("usd", USD, Amount(0.2, 10), key="agent-1")])
        assert refused is not None and refused.at == 1 and refused.unit == "usd"
        assert refused.promised.usd == pytest.approx(0.9)
        assert store.reserved(sync, "tok", "fleet") == Amount(0, 0)
        # two budgets over the same key in one call see each other's share
        _, refused = await store.reserve(c, "c", "r", NOW, NOW + 60, [
            hold("tok", DAY, Amount(0, 600)), hold("tok", DAY, Amount(0, 600))])
        assert refused is not None and refused.promised == Amount(0, 600)
    run(redis_server, go)


def test_an_expired_reservation_is_charged_once_by_racing_sweepers(
        redis_server: RedisServer, sync: redis.Redis, store: RedisSpendStore) -> None:
    async def setup(c: aioredis.Redis) -> None:
        for i in range(20):
            _, refused = await store.reserve(c, f"lost-{i}", "dead:1", NOW, NOW + 30,
                                             [hold("usd", USD, Amount(0.01, 5))])
            assert refused is None
        _, refused = await store.reserve(c, "alive", "live:2", NOW, NOW + 30,
                                         [hold("usd", USD, Amount(0.01, 5))])
        assert refused is None
        await store.renew(c, ["alive", "never-reserved"], NOW + 120)
        assert await store.sweep(c, NOW + 29) == []  # not due yet
    run(redis_server, setup)
    assert sync.zscore(store.expiry_key, "never-reserved") is None
    swept: list[list[object]] = [[], []]
    start = threading.Barrier(2)

    def sweeper(i: int) -> None:
        async def go(c: aioredis.Redis) -> None:
            start.wait()
            for _ in range(10):
                swept[i].extend(await store.sweep(c, NOW + 31, limit=3))
        run(redis_server, go)

    threads = [threading.Thread(target=sweeper, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    flows = sorted(s.flow for s in swept[0] + swept[1])  # type: ignore[attr-defined]
    assert flows == sorted(f"lost-{i}" for i in range(20))  # each exactly once
    assert all(s.replica == "dead:1" for s in swept[0] + swept[1])  # type: ignore[attr-defined]
    spent = store.spent(sync, "usd", "fleet", 0)
    assert spent.usd == pytest.approx(0.2) and spent.tokens == 100
    assert store.reserved(sync, "usd", "fleet").tokens == 5  # the live call's, renewed

    async def late(c: aioredis.Redis) -> None:
        # the dead gateway's settle arriving after the sweep adds nothing
        assert await store.settle(c, "lost-0", [charge("usd", USD, Amount(0.5, 1))]) is None
        assert await store.settle(c, "alive", [charge("usd", USD, Amount(0.005, 3))]) == [
            Amount(pytest.approx(0.2), 100)]  # type: ignore[arg-type]
    run(redis_server, late)
    spent = store.spent(sync, "usd", "fleet", 0)
    assert spent.usd == pytest.approx(0.205) and spent.tokens == 103
    assert store.reserved(sync, "usd", "fleet") == Amount(0, 0)
    assert sync.zcard(store.expiry_key) == 0


def test_windows_that_no_longer_count_are_pruned(
        redis_server: RedisServer, sync: redis.Redis, store: RedisSpendStore) -> None:
    rolling = BudgetSpec(Period.ROLLING, rolling_seconds=600, hard_tokens=100)

    async def go(c: aioredis.Redis) -> None:
        for step in range(0, 1200, 60):  # one call per minute for 20 minutes
            now = NOW + step
            flow = f"f{step}"
            _, refused = await store.reserve(c, flow, "r", now, now + 60,
                                             [hold("roll", rolling, Amount(0, 5), now=now)])
            assert refused is None
            await store.settle(c, flow, [charge("roll", rolling, Amount(0, 5), now=now)])
    run(redis_server, go)
    fields = {f.decode() for f in sync.hkeys(store.spend_key("roll", "fleet"))}  # type: ignore[union-attr]
    since = counted_since(rolling, NOW + 1140)
    starts = {int(f.split(":")[0]) for f in fields}
    # only the windows of the last 10 minutes (and this call's) remain
    assert starts and min(starts) >= counted_since(rolling, NOW + 1080)
    assert len(starts) <= 12
    assert store.spent(sync, "roll", "fleet", since).tokens == 5 * len(
        [s for s in range(0, 1200, 60) if window(rolling, NOW + s)[0] >= since])
    assert sync.ttl(store.spend_key("roll", "fleet")) > 0  # idle keys go away
