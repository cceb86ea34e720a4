"""The hop depth of an inter-agent message, counted by the gateway (never the sender's word).

Seed 004 drops a message at depth 5, but its depth is a field the sender writes: an agent in
a loop (or one that was told to) writes ``depth: 0`` and loops for ever. The gateway sees
every message, so it counts:

    depth(message from S in context c) = 1 + max(
        the deepest message that reached S in context c,
        the deepest message to S still in flight (S is handling it while it sends onward))

A message's depth is recorded for its target when it is forwarded; an in-flight entry ends
when its answer (or stream) ends or fails. The first term follows a conversation that keeps
its ``contextId`` across hops; the second catches an agent that opens a new context (or
none) for every hop, because it is still handling the message that made it send. A sender
can only make it stricter: the effective depth is the larger of this count and the depth it
claims (see :mod:`fleetgate.a2a.messages`).

Memory is bounded: entries expire after ``ttl`` seconds and at most ``max_entries`` of each
kind are kept (the oldest go first). The clock is injected.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["DepthTracker"]


class DepthTracker:
    def __init__(self, clock: Callable[[], float] = time.monotonic, ttl: float = 3600.0,
                 max_entries: int = 100_000) -> None:
        if ttl <= 0 or max_entries < 1:
            raise ValueError("ttl must be > 0 and max_entries >= 1")
        self.clock = clock
        self.ttl = ttl
        self.max_entries = max_entries
        # (context, agent) -> (deepest depth that reached agent in context, expiry)
        self._reached: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()
        # flow key -> (target agent, depth, expiry)
        self._inflight: OrderedDict[str, tuple[str, int, float]] = OrderedDict()
        # target agent -> {flow key: depth}, the in-flight entries by target
        self._to: dict[str, dict[str, int]] = {}

    def count(self, sender: str, context: str) -> int:
        """The depth of a message ``sender`` sends now in ``context`` (``""``: none)."""
        self._expire()
        reached = self._reached.get((context, sender)) if context else None
        busy = self._to.get(sender)
        return 1 + max(reached[0] if reached else 0, max(busy.values()) if busy else 0)

    def forwarded(self, key: str, target: str, context: str, depth: int) -> None:
        """A message of ``depth`` to ``target`` was forwarded; ``key`` names its exchange."""
        self._expire()
        expires = self.clock() + self.ttl
        if context:
            old = self._reached.pop((context, target), None)
            self._reached[(context, target)] = (max(depth, old[0] if old else 0), expires)
            while len(self._reached) > self.max_entries:
                self._reached.popitem(last=False)
        self.ended(key)
        self._inflight[key] = (target, depth, expires)
        self._to.setdefault(target, {})[key] = depth
        while len(self._inflight) > self.max_entries:
            self.ended(next(iter(self._inflight)))

    def ended(self, key: str) -> None:
        """The exchange ``key`` answered, failed or was cut: its target is no longer busy with it."""
        entry = self._inflight.pop(key, None)
        if entry is None:
            return
        busy = self._to.get(entry[0])
        if busy is not None:
            busy.pop(key, None)
            if not busy:
                del self._to[entry[0]]

    def in_flight(self) -> int:
        return len(self._inflight)

    def contexts(self) -> int:
        return len(self._reached)

    def _expire(self) -> None:
        now = self.clock()
        while self._reached:
            pair, (_, expires) = next(iter(self._reached.items()))
            if expires > now:
                break
            del self._reached[pair]
        while self._inflight:
            key, (_, _, until) = next(iter(self._inflight.items()))
            if until > now:
                break
            self.ended(key)
