"""The rate-limit scripts on a real Redis against the in-memory :class:`Bucket`: the same
sequence of takes, settlements and clock steps gives the same outcomes and levels; a request's
buckets are taken all or nothing; a take that can never pass says so; idle keys expire."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis
from redisd import RedisServer

from fleetgate.limits.bucket import Bucket, BucketSpec, LimitKind, Take
from fleetgate.stores.redis_rate import TTL_MARGIN, RedisRates, parse_take

A = BucketSpec(10, 3, 60.0)
B = BucketSpec(5, 5, 1.5)


@pytest.fixture
def sync(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def run[T](redis_server: RedisServer, coro_fn: object) -> T:
    """Run ``coro_fn(client)`` on a fresh loop with a fresh asyncio client."""
    async def main() -> T:
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            return await coro_fn(client)  # type: ignore[operator, no-any-return]
        finally:
            await client.aclose()
    return asyncio.run(main())


def test_the_script_agrees_with_bucket_over_a_random_sequence(
        redis_server: RedisServer, sync: redis.Redis) -> None:
    rng = random.Random(17)
    rates = RedisRates(ttl_margin=3600)  # injected times: no key may expire mid-sequence
    specs = {"{t}:a": A, "{t}:b": B}
    t0 = 1_765_000_000.25  # a wall-clock-sized time: the hash must keep every digit
    mem: dict[str, Bucket] = {}  # created full on first use, as Buckets.get does
    steps: list[tuple[str, str, int, float]] = []
    now = t0
    for _ in range(400):
        now += rng.choice([0.0, 0.1, 0.7, 1.5, 13.0, 59.9, 61.0, 200.0])
        if rng.random() < 0.05:
            now -= 5.0  # the clock steps back: no tokens are minted
        key = rng.choice(list(specs))
        if rng.random() < 0.7:
            steps.append(("take", key, rng.choice([0, 1, 1, 2, 3, 6, 11]), now))
        else:
            steps.append(("settle", key, rng.randint(-8, 8), now))

    async def replay(client: aioredis.Redis) -> list[object]:
        out: list[object] = []
        for op, key, n, at in steps:
            if op == "take":
                reply = await rates.take(client, [key], [specs[key]], [n], now=at)
                out.append(reply.takes[0])
            else:
                [level] = await rates.adjust(client, [key], [specs[key]], [n], now=at)
                out.append(level)
        return out

    got = run(redis_server, replay)
    expected: list[object] = []
    for op, key, n, at in steps:
        mem.setdefault(key, Bucket(specs[key], at))
        if op == "take":
            expected.append(mem[key].take(n, at))
        else:
            mem[key].settle(n, at)
            expected.append(mem[key].level(at))
    assert got == expected
    refused = [t for t in got if isinstance(t, Take) and not t.ok]
    assert refused and any(t.never for t in refused) and any(t.retry_after > 0 for t in refused)
    assert any(isinstance(x, float) and x < 0 for x in got)  # a settlement went below zero
    assert rates.levels(sync, list(specs), list(specs.values()), now=now) == [
        mem[k].level(now) for k in specs]


def test_several_buckets_are_taken_all_or_nothing(
        redis_server: RedisServer, sync: redis.Redis) -> None:
    rates = RedisRates()
    keys, specs = ["{t}:req", "{t}:tok"], [BucketSpec(5, 5, 60.0), BucketSpec(100, 100, 60.0)]

    async def go(client: aioredis.Redis) -> tuple[object, object, object]:
        first = await rates.take(client, keys, specs, [1, 80], now=10.0)
        second = await rates.take(client, keys, specs, [1, 80], now=11.0)
        third = await rates.take(client, keys, specs, [1, 20], now=12.0)
        return first, second, third

    first, second, third = run(redis_server, go)
    assert first.failed is None and [t.remaining for t in first.takes] == [4, 20]  # type: ignore[attr-defined]
    assert second.failed == 1 and not second.takes[1].ok  # type: ignore[attr-defined]
    assert second.takes[1].retry_after == pytest.approx(59.0)  # type: ignore[attr-defined]
    # the refusal took nothing from the first bucket: it still has 4 for the third request
    assert [t.remaining for t in third.takes] == [3, 0]  # type: ignore[attr-defined]
    assert rates.levels(sync, keys, specs, now=12.0) == [3.0, 0.0]


def test_a_take_beyond_the_maximum_can_never_pass_and_takes_nothing(
        redis_server: RedisServer, sync: redis.Redis) -> None:
    rates = RedisRates()
    keys, specs = ["{t}:x", "{t}:y"], [BucketSpec(5, 5, 60.0), BucketSpec(50, 50, 60.0)]
    reply = run(redis_server, lambda c: rates.take(c, keys, specs, [1, 51], now=5.0))
    assert reply.failed == 1 and reply.takes[1].never and not reply.takes[1].ok
    assert reply.takes[1].retry_after == 0.0
    assert rates.levels(sync, keys, specs, now=5.0) == [5.0, 50.0]  # nothing taken


def test_server_time_is_used_and_every_bucket_key_expires(
        redis_server: RedisServer, sync: redis.Redis) -> None:
    rates = RedisRates()
    spec = BucketSpec(10, 2, 30.0)
    reply = run(redis_server, lambda c: rates.take(c, ["{t}:k"], [spec], [7]))
    secs, micros = sync.time()
    assert abs(reply.now - (secs + micros / 1e6)) < 5  # Redis's clock, not an injected one
    ttl = sync.pttl("{t}:k") / 1000
    # 7 taken, 3 left: 4 fills of 30 s until full again, plus the margin
    assert 4 * 30 + TTL_MARGIN - 2 <= ttl <= 4 * 30 + TTL_MARGIN
    [level] = run(redis_server, lambda c: rates.adjust(c, ["{t}:k"], [spec], [-7]))
    assert level == 10.0
    assert 0 < sync.pttl("{t}:k") / 1000 <= TTL_MARGIN  # full: it may go once idle


def test_parse_take_reads_the_flat_reply() -> None:
    reply = parse_take([2, b"100.5", 1, 4, b"3.25", b"0", 0, 0, 0, b"3.25", b"63.25", 0])
    assert reply.failed == 1 and reply.now == 100.5
    assert reply.takes == (Take(True, 4, 3.25, 0.0), Take(False, 0, 3.25, 63.25))


def test_reservations_on_redis_end_a_stream_after_the_bucket_ran_out_and_settle_after_it(
        redis_server: RedisServer, sync: redis.Redis) -> None:
    """The chunk path never awaits: the take beyond the reservation is a task, and the chunk
    after Redis said the bucket ran out gets the overrun; the settlement waits for that take."""
    from fleetgate.metrics import GatewayMetrics
    from fleetgate.policy.model import RateLimit
    from fleetgate.runtime.reservations_rate import RateReservations
    from fleetgate.runtime.shared import SharedState
    from fleetgate.stores.redis_conn import RedisSettings

    shared = SharedState(GatewayMetrics())
    shared.use(RedisSettings(redis_server.url, prefix="t"))
    tok = RateLimit("tok", BucketSpec(100, 100, 3600.0, LimitKind.TOKENS))
    rates = RateReservations(lambda: 0.0, shared=shared)
    seen: list[tuple[str, str, float]] = []
    rates.on_level = lambda lim, key, level: seen.append((lim, key, level))

    async def go() -> tuple[object, ...]:
        out = await rates.reserve_shared("f", [tok], agent="a", llm_tokens=60, act=None,
                                         wait=1.0)
        assert out.failed is None and rates.counting("f")
        first = rates.overrun("f", 10, 70)  # 20 beyond: a take starts, the chunk goes on
        again = rates.overrun("f", 10, 75)  # one take in flight at a time
        await asyncio.sleep(0.2)
        taken = out.held[0].extra
        beyond = rates.overrun("f", 10, 200)  # 130 more than the 40 left: a take that refuses
        await asyncio.sleep(0.2)
        ended = rates.overrun("f", 10, 201)
        settled = rates.settle("f", 90)
        await asyncio.sleep(0.2)
        # a settlement right after a take started counts that take (it waits for it)
        await rates.reserve_shared("g", [tok], agent="a", llm_tokens=5, act=None, wait=1.0)
        assert rates.overrun("g", 0, 8) is None  # 3 beyond: a take in flight
        rates.settle("g", 8)
        await asyncio.sleep(0.2)
        await shared.async_client().aclose()
        return first, again, taken, beyond, ended, settled

    first, again, taken, beyond, ended, settled = asyncio.run(go())
    assert first is None and again is None and beyond is None
    assert taken == 20
    assert ended is not None and ended.rule == "tok" and "ran out" in ended.reason  # type: ignore[attr-defined]
    assert settled is not None and settled[0][1] is None  # type: ignore[index]
    assert seen == [("tok", "a", 10.0),  # 100 - 80 taken, then 10 more: used 90
                    ("tok", "a", 2.0)]  # 5 reserved + 3 taken mid-stream = 8 used
    assert rates.snapshot()["buckets"][0]["level"] == 2.0
    assert sync.pttl("{t}:rl:tok:a") > 0
    shared.use(None)
