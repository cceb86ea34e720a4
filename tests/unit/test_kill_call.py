"""The admin API's hop onto the proxy's event loop (``KillService.call``).

A stop is answered as soon as it is in force: the admin thread gets the result from inside
the loop callback that applied it, never after what that callback queued behind it (after a
cascade stop, the teardown of the hundred connections it cut).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fleetgate.kill.model import Action, Subject, Verb, parse_scope
from fleetgate.metrics import GatewayMetrics
from fleetgate.runtime.identity import IdentityRegistry
from fleetgate.runtime.kill import FlowEffects, KillService


@pytest.fixture
def running() -> Iterator[tuple[KillService, asyncio.AbstractEventLoop]]:
    effects = FlowEffects(cut=lambda *a: False, close=lambda *a: False,
                          report=lambda f: {}, client=lambda f: None)
    kill = KillService(GatewayMetrics(), IdentityRegistry(), effects)
    loop = asyncio.new_event_loop()
    kill.attach(loop)  # outside the loop: attach only records it (Event() binds lazily)
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        yield kill, loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        loop.close()
        kill.close()


def test_answers_before_the_work_its_call_queued(
        running: tuple[KillService, asyncio.AbstractEventLoop]) -> None:
    kill, loop = running
    ran_on: list[bool] = []

    def apply_and_queue_teardown() -> str:
        ran_on.append(asyncio.get_running_loop() is loop)
        # what a sweep leaves behind: slow end-of-flow work on the following turns
        loop.call_soon(time.sleep, 0.5)
        loop.call_soon(lambda: loop.call_soon(time.sleep, 0.5))
        return "in force"

    t0 = time.perf_counter()
    assert kill.call(apply_and_queue_teardown) == "in force"
    took = time.perf_counter() - t0
    assert ran_on == [True]
    assert took < 0.4, f"the answer waited {took:.3f}s for work queued after the action"


def test_an_error_on_the_loop_reaches_the_admin_thread(
        running: tuple[KillService, asyncio.AbstractEventLoop]) -> None:
    kill, _ = running

    def boom() -> Any:
        raise ValueError("no such scope")
    with pytest.raises(ValueError, match="no such scope"):
        kill.call(boom)
    assert kill.call(lambda: 42) == 42  # the loop goes on


def test_a_stop_drops_every_connection_before_taking_any_report() -> None:
    """A cut stream's report may be slow (it settles LLM usage, perhaps loading a tokenizer
    table): no connection waits for another flow's report, and ``cut_ms`` ends at the last
    connection dropped, not after the reports."""
    events: list[str] = []

    def cut(flow: str, rule: str, reason: str, abort: bool) -> bool:
        events.append(f"cut {flow}")
        return True

    def report(flow: str) -> dict[str, Any]:
        time.sleep(0.05)
        events.append(f"report {flow}")
        return {"flow": flow, "method": "POST", "host": "api.openai.com", "path": "/v1",
                "agent": "a-1", "phase": "streaming the response"}
    effects = FlowEffects(cut=cut, close=lambda *a: False, report=report,
                          client=lambda f: None)
    kill = KillService(GatewayMetrics(), IdentityRegistry(), effects)
    try:
        for i in range(5):
            kill.live.add(f"f{i}", f"f{i}", Subject("a-1", session=f"s-{i}"))
        kill.live.add("other", "other", Subject("a-2", session="s-9"))
        out = kill.apply(Action(Verb.STOP, parse_scope("agent:a-1"), "runaway"))
        assert events == [f"cut f{i}" for i in range(5)] + [f"report f{i}" for i in range(5)]
        assert [c["flow"] for c in out["cut"]] == [f"f{i}" for i in range(5)]
        assert out["cut_ms"] < 50, out["cut_ms"]  # the reports took 250 ms after the cut
        assert "other" in kill.live and len(kill.live) == 1
    finally:
        kill.close()


def test_the_admin_answer_comes_before_the_cut_flows_accounting(tmp_path: Any) -> None:
    """Through the admin API (``act``) the answer carries each cut flow's facts and is handed
    over before the accounting (``settle``, slow); the kill log's rows carry both."""
    settled: list[str] = []

    def settle(flow: str) -> dict[str, Any]:
        time.sleep(0.1)
        settled.append(flow)
        return {"llm": {"tokens": 7}}
    effects = FlowEffects(cut=lambda *a: True, close=lambda *a: False,
                          report=lambda f: {}, client=lambda f: None,
                          facts=lambda f: {"flow": f, "method": "POST", "host": "h",
                                           "path": "/v1", "agent": "a-1", "phase": "x"},
                          settle=settle)
    kill = KillService(GatewayMetrics(), IdentityRegistry(), effects)
    kill.open_state(str(tmp_path))
    loop = asyncio.new_event_loop()
    kill.attach(loop)
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        for i in range(3):
            kill.live.add(f"f{i}", f"f{i}", Subject("a-1", session=f"s-{i}"))
        t0 = time.perf_counter()
        out = kill.act(Action(Verb.STOP, parse_scope("agent:a-1"), "runaway"))
        took = time.perf_counter() - t0
        assert "error" not in out, out
        assert [c["flow"] for c in out["cut"]] == ["f0", "f1", "f2"]
        assert "llm" not in out["cut"][0]
        assert took < 0.25, f"the answer waited {took:.3f}s for the accounting"
        deadline = time.monotonic() + 5
        while len([r for r in kill.log() if r["event"] == "cut"]) < 3 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        rows = [r for r in kill.log() if r["event"] == "cut"]
        assert settled == ["f0", "f1", "f2"] and len(rows) == 3, rows
        assert all(r["llm"] == {"tokens": 7} and r["path"] == "/v1" for r in rows), rows
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        loop.close()
        kill.close()
