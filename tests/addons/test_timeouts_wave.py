"""Timeouts acts on a wave of expired deadlines in small steps, and never on a re-armed one.

A slowloris wave makes hundreds of client deadlines due in one scan; closing them all in one
pass stalls every agent behind it. These tests drive ``Timeouts`` with an injected clock and a
recording ``close_client``, so what is asserted is which connections are closed and that the
event loop runs other work between steps.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from mitmproxy.test import taddons

from fleetgate.addons import timeouts as timeouts_module
from fleetgate.addons.timeouts import WAVE_STEPS, Timeouts
from fleetgate.bounds import CLIENT_HEADERS, Deadlines
from fleetgate.metrics import GatewayMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Timeouts, Clock, list[str]]]:
    clock = Clock()
    closed: list[str] = []

    def close_client(client: Any, abort: bool = False) -> bool:
        closed.append(client.id)
        return True

    monkeypatch.setattr(timeouts_module, "close_client", close_client)
    addon = Timeouts(GatewayMetrics())
    addon.deadlines = Deadlines(clock)
    with taddons.context(addon) as tctx:
        tctx.options.update(fleetgate_client_header_timeout=1,
                            fleetgate_upstream_response_timeout=1,
                            fleetgate_upstream_idle_timeout=1)
        yield addon, clock, closed


def _idle_clients(addon: Timeouts, n: int) -> list[str]:
    ids = [f"c{i}" for i in range(n)]
    for cid in ids:
        addon.client_connected(SimpleNamespace(id=cid, peername=("127.0.0.1", 1)))  # type: ignore[arg-type]
    return ids


def test_only_what_is_still_due_is_closed(setup: tuple[Timeouts, Clock, list[str]]) -> None:
    addon, clock, closed = setup
    a, b, c = _idle_clients(addon, 3)
    clock.now += 2
    due = addon.deadlines.expired()
    assert {d.key for d in due} == {a, b, c}
    # after the scan took them: b's clock restarted (its CONNECT arrived), c started a request
    addon.deadlines.arm(b, CLIENT_HEADERS, 1, SimpleNamespace(id=b))
    addon.open_requests[c] = 1
    addon.expire(due)
    assert closed == [a]


def test_a_wave_is_closed_in_steps_with_the_loop_running_between(
        setup: tuple[Timeouts, Clock, list[str]]) -> None:
    addon, clock, closed = setup
    n = 1000
    ids = _idle_clients(addon, n)
    clock.now += 2
    step = -(-n // WAVE_STEPS)

    async def main() -> list[int]:
        marks: list[int] = []
        watch = asyncio.create_task(addon._watch())

        async def other_work() -> None:  # an agent's traffic, sampling progress as it runs
            while len(closed) < n:
                marks.append(len(closed))
                await asyncio.sleep(0.001)
            marks.append(len(closed))

        try:
            await asyncio.wait_for(other_work(), 10)
        finally:
            watch.cancel()
        return marks

    marks = asyncio.run(main())
    assert sorted(closed) == sorted(ids)  # every one, once
    assert len(set(marks)) > WAVE_STEPS // 4  # progress was seen at many points, not one
    jumps = [later - earlier for earlier, later in itertools.pairwise(marks)]
    assert max(jumps) <= 2 * step, max(jumps)  # never a long run of closes in one go
