"""The pure timing and head-size bounds (fleetgate.bounds), with an injected clock."""

from __future__ import annotations

import pytest

from fleetgate.bounds import (
    CLIENT_HEADERS,
    UPSTREAM_FIRST_BYTE,
    UPSTREAM_IDLE,
    Deadlines,
    head_bytes,
    header_excess,
    tick_seconds,
)
from fleetgate.upstream_failure import classify, timed_out


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_deadline_expires_only_after_its_bound(clock: Clock) -> None:
    d: Deadlines[str] = Deadlines(clock)
    d.arm("c1", CLIENT_HEADERS, 30, "client-1")
    clock.now += 29.9
    assert d.expired() == []
    clock.now += 0.1
    [late] = d.expired()
    assert (late.key, late.kind, late.seconds, late.subject) == ("c1", CLIENT_HEADERS, 30,
                                                                 "client-1")
    assert "c1" not in d and d.expired() == []  # popped: acted on once


def test_disarmed_deadline_never_expires(clock: Clock) -> None:
    d: Deadlines[str] = Deadlines(clock)
    d.arm("f", UPSTREAM_FIRST_BYTE, 5, "flow")
    assert d.disarm("f")
    clock.now += 100
    assert d.expired() == [] and len(d) == 0
    assert not d.disarm("f")


def test_disarm_for_another_kind_leaves_the_clock_running(clock: Clock) -> None:
    d: Deadlines[str] = Deadlines(clock)
    d.arm("f", UPSTREAM_IDLE, 5, "flow")
    assert not d.disarm("f", UPSTREAM_FIRST_BYTE)  # responseheaders of a later phase
    clock.now += 5
    assert [e.kind for e in d.expired()] == [UPSTREAM_IDLE]


def test_touch_postpones_an_idle_deadline_by_a_full_bound(clock: Clock) -> None:
    d: Deadlines[str] = Deadlines(clock)
    d.arm("f", UPSTREAM_IDLE, 10, "flow")
    for _ in range(5):  # a chunk every 9 s: never idle for 10
        clock.now += 9
        d.touch("f", UPSTREAM_IDLE)
        assert d.expired() == []
    clock.now += 10
    assert [e.key for e in d.expired()] == ["f"]


def test_touch_does_not_extend_another_kind_or_rearm(clock: Clock) -> None:
    d: Deadlines[str] = Deadlines(clock)
    d.arm("f", UPSTREAM_FIRST_BYTE, 10, "flow")
    clock.now += 9
    d.touch("f", UPSTREAM_IDLE)  # a chunk callback must not hide a missing first byte
    clock.now += 1
    assert [e.kind for e in d.expired()] == [UPSTREAM_FIRST_BYTE]
    d.touch("f", UPSTREAM_IDLE)  # after the flow ended: no resurrection
    assert "f" not in d


def test_rearm_restarts_the_clock_with_the_new_kind(clock: Clock) -> None:
    d: Deadlines[str] = Deadlines(clock)
    d.arm("c", CLIENT_HEADERS, 30, "client")
    clock.now += 25
    d.arm("c", CLIENT_HEADERS, 30, "client")  # previous request finished: a full bound again
    clock.now += 25
    assert d.expired() == []
    d.arm("f", UPSTREAM_FIRST_BYTE, 2, "flow")
    d.arm("f", UPSTREAM_IDLE, 60, "flow")
    assert d.kind("f") == UPSTREAM_IDLE
    clock.now += 4
    assert d.expired() == [] and len(d) == 2


def test_expired_returns_oldest_first_and_leaves_the_rest(clock: Clock) -> None:
    d: Deadlines[int] = Deadlines(clock)
    for i, seconds in enumerate([5, 1, 3, 100]):
        d.arm(i, UPSTREAM_FIRST_BYTE, seconds, i)
    clock.now += 10
    assert [e.key for e in d.expired()] == [1, 2, 0]
    assert 3 in d and len(d) == 1


def test_many_open_entries_scan_once_per_tick(clock: Clock) -> None:
    d: Deadlines[int] = Deadlines(clock)
    for i in range(10_000):
        d.arm(i, CLIENT_HEADERS, 30 + (i % 2), i)
    clock.now += 30
    assert len(d.expired()) == 5_000 and len(d) == 5_000


@pytest.mark.parametrize(("bounds", "tick"), [
    ([30, 300, 300], 1.0),  # defaults: a one-second scan
    ([1, 2, 2], 0.1),
    ([0.1], 0.05),  # never a busy loop
    ([], 1.0),
])
def test_tick_is_a_tenth_of_the_shortest_bound_clamped(bounds: list[float], tick: float) -> None:
    assert tick_seconds(bounds) == pytest.approx(tick)


def test_head_bytes_counts_lines_as_http1_frames_them() -> None:
    # "GET / HTTP/1.1\r\n" "Host: a\r\n" "\r\n"
    assert head_bytes(len(b"GET / HTTP/1.1"), [(b"Host", b"a")]) == 16 + 9 + 2


@pytest.mark.parametrize(("count", "size", "why"), [
    (256, 65536, None),
    (257, 100, "257 header fields"),
    (10_000, 10**6, "10000 header fields"),  # count is reported first
    (3, 65537, "65537 bytes"),
    (1, 1_000_000, "1000000 bytes"),  # one huge header line
])
def test_header_excess(count: int, size: int, why: str | None) -> None:
    reason = header_excess(count, size, 256, 65536)
    assert (reason is None) if why is None else (why in (reason or ""))


def test_timed_out_is_a_retryable_504_whatever_the_close_produced() -> None:
    f = timed_out("api.example.com:443", 300)
    assert (f.status, f.rule, f.retry) == (504, "upstream.timeout", True)
    assert "300s" in f.reason and "api.example.com:443" in f.reason
    # what mitmproxy says once the gateway closed the upstream would otherwise not be a timeout
    assert classify("server closed connection", "api.example.com:443").rule != "upstream.timeout"
