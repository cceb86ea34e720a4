"""Token-bucket math with an injected clock: discrete fills, burst, reservation/settlement."""

from __future__ import annotations

import pytest

from fleetgate.limits.bucket import Bucket, Buckets, BucketSpec, LimitKind

SEED = BucketSpec(20, 20, 60.0, LimitKind.REQUESTS)  # seed: 20 requests per minute


def test_burst_then_refused_until_the_next_fill() -> None:
    b = Bucket(SEED, now=1000.0)
    assert all(b.take(1, 1000.0 + i * 0.01).ok for i in range(20))
    no = b.take(1, 1010.0)
    assert not no.ok and no.remaining == 0
    assert no.retry_after == pytest.approx(50.0) and no.reset_after == pytest.approx(50.0)
    assert not b.take(1, 1059.9).ok
    assert b.take(1, 1060.0).ok  # a whole fill arrives at once
    assert b.level(1060.0) == 19


def test_fills_never_exceed_the_maximum_and_clock_steps_back_mint_nothing() -> None:
    spec = BucketSpec(10, 4, 1.0, LimitKind.TOKENS)
    b = Bucket(spec, now=0.0)
    assert b.take(10, 0.0).ok
    assert b.level(2.5) == 8  # two fills of 4
    assert b.level(100.0) == 10
    b.take(10, 100.0)
    assert b.level(50.0) == 0  # clock went back: nothing refilled


def test_retry_after_counts_several_fills() -> None:
    b = Bucket(BucketSpec(100, 10, 5.0, LimitKind.TOKENS), now=0.0)
    assert b.take(100, 0.0).ok
    r = b.take(35, 1.0)
    assert not r.ok and r.retry_after == pytest.approx(4.0 + 3 * 5.0)


def test_more_than_the_maximum_can_never_pass() -> None:
    r = Bucket(SEED, 0.0).take(21, 0.0)
    assert not r.ok and r.never


def test_reserve_then_settle_refunds_or_debits() -> None:
    b = Bucket(BucketSpec(1000, 1000, 60.0, LimitKind.TOKENS), now=0.0)
    assert b.take(600, 0.0).ok  # reserved: estimate + max_tokens
    b.settle(-400, 1.0)  # used 200: refund 400
    assert b.level(1.0) == 800
    assert b.take(800, 1.0).ok
    b.settle(300, 2.0)  # used 300 more than reserved: debt
    assert b.level(2.0) == -300
    assert not b.take(1, 2.0).ok
    assert b.level(60.0) == 700
    b.settle(-5000, 61.0)  # a refund never lifts it above the maximum
    assert b.level(61.0) == 1000


def test_concurrent_reservations_never_exceed_the_bucket() -> None:
    b = Bucket(BucketSpec(10, 10, 60.0, LimitKind.REQUESTS), now=0.0)
    assert sum(b.take(1, 0.0).ok for _ in range(50)) == 10


def test_buckets_per_key_and_reload_keeps_the_level() -> None:
    bs = Buckets()
    a = bs.get("l", "agent-a", SEED, 0.0)
    assert bs.get("l", "agent-b", SEED, 0.0) is not a
    for _ in range(20):
        a.take(1, 0.0)
    bigger = BucketSpec(40, 40, 60.0, LimitKind.REQUESTS)
    again = bs.get("l", "agent-a", bigger, 1.0)
    assert again is a and again.level(1.0) == 0  # editing the rules refills nothing
    smaller = BucketSpec(5, 5, 60.0, LimitKind.REQUESTS)
    c = bs.get("l", "agent-b", smaller, 1.0)
    assert c.level(1.0) == 5
