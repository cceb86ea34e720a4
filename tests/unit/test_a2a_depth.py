"""The hop depth the gateway counts: loops are caught whatever the messages claim."""

from __future__ import annotations

import pytest

from fleetgate.a2a.depth import DepthTracker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def hop(t: DepthTracker, key: str, sender: str, target: str, context: str) -> int:
    depth = t.count(sender, context)
    t.forwarded(key, target, context, depth)
    return depth


def test_a_loop_in_one_context_deepens_every_hop() -> None:
    t = DepthTracker(Clock())
    agents = ["a", "b", "c"]
    depths = [hop(t, f"k{i}", agents[i % 3], agents[(i + 1) % 3], "ctx") for i in range(7)]
    assert depths == [1, 2, 3, 4, 5, 6, 7]


def test_a_new_context_per_hop_is_caught_by_what_the_sender_is_handling() -> None:
    t = DepthTracker(Clock())
    agents = ["a", "b", "c"]
    depths = [hop(t, f"k{i}", agents[i % 3], agents[(i + 1) % 3], f"ctx-{i}")
              for i in range(6)]
    assert depths == [1, 2, 3, 4, 5, 6]
    no_context = DepthTracker(Clock())
    assert [hop(no_context, f"k{i}", agents[i % 3], agents[(i + 1) % 3], "")
            for i in range(4)] == [1, 2, 3, 4]


def test_answered_messages_no_longer_deepen_unrelated_work() -> None:
    t = DepthTracker(Clock())
    assert hop(t, "k1", "user", "a", "c1") == 1
    assert hop(t, "k2", "a", "b", "c2") == 2
    t.ended("k2")
    t.ended("k1")
    assert t.in_flight() == 0
    # a starts a fresh conversation: nothing reached it there, nothing in flight to it
    assert t.count("a", "c3") == 1
    # in c1 it was reached at depth 1: its next hop there is 2
    assert t.count("a", "c1") == 2


def test_repeated_questions_from_the_originator_stay_at_depth_one() -> None:
    t = DepthTracker(Clock())
    for i in range(10):
        assert hop(t, f"k{i}", "user", "a", "c1") == 1
        t.ended(f"k{i}")


def test_entries_expire_and_memory_is_bounded() -> None:
    clock = Clock()
    t = DepthTracker(clock, ttl=60, max_entries=3)
    hop(t, "k1", "a", "b", "c1")
    assert t.count("b", "c1") == 2
    clock.now = 61
    assert t.count("b", "c1") == 1 and t.in_flight() == 0 and t.contexts() == 0
    for i in range(10):
        hop(t, f"n{i}", "x", f"y{i}", f"c{i}")
    assert t.in_flight() <= 3 and t.contexts() <= 3


def test_ending_an_unknown_exchange_is_harmless() -> None:
    t = DepthTracker(Clock())
    t.ended("nope")
    with pytest.raises(ValueError):
        DepthTracker(Clock(), ttl=0)
