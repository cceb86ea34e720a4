"""Running totals per agent and per session: tokens, dollars, calls.

Kept in the gateway's memory so that operators can see who spends what (``/usage``) and so
that budgets (a later release) can read them. Bounded: the least recently active keys are
dropped past ``max_keys`` and counted in ``evicted``, so a flood of session ids cannot
exhaust memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleetgate.llm.usage import Usage

__all__ = ["Ledger", "Totals"]


@dataclass
class Totals:
    calls: int = 0
    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0
    reasoning: int = 0
    cost_usd: float = 0.0
    unpriced_calls: int = 0
    estimated_calls: int = 0

    def add(self, usage: Usage, cost: float | None) -> None:
        self.calls += 1
        self.input += usage.input
        self.output += usage.output
        self.cache_read += usage.cache_read
        self.cache_write += usage.cache_write
        self.reasoning += usage.reasoning
        if cost is None:
            self.unpriced_calls += 1
        else:
            self.cost_usd += cost
        if usage.estimated:
            self.estimated_calls += 1

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["cost_usd"] = round(self.cost_usd, 6)
        return d


class _Bounded:
    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self.items: OrderedDict[str, Totals] = OrderedDict()
        self.evicted = 0

    def get(self, key: str) -> Totals:
        t = self.items.get(key)
        if t is None:
            t = self.items[key] = Totals()
            while len(self.items) > self.max_keys:
                self.items.popitem(last=False)
                self.evicted += 1
        else:
            self.items.move_to_end(key)
        return t


class Ledger:
    """Thread-safe totals for the fleet, each agent and each session."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self._lock = threading.Lock()
        self.fleet = Totals()
        self.agents = _Bounded(max_keys)
        self.sessions = _Bounded(max_keys)
        # told of every call added (the fleet's shared totals, when several gateways run)
        self.listeners: list[Callable[[str | None, str | None, Usage, float | None], None]] = []

    def add(self, agent: str | None, session: str | None, usage: Usage,
            cost: float | None) -> None:
        with self._lock:
            self.fleet.add(usage, cost)
            if agent:
                self.agents.get(agent).add(usage, cost)
            if session:
                self.sessions.get(session).add(usage, cost)
        for listener in self.listeners:
            listener(agent, session, usage, cost)

    def agent(self, agent: str) -> Totals | None:
        with self._lock:
            return self.agents.items.get(agent)

    def snapshot(self, top: int = 1000) -> dict[str, Any]:
        with self._lock:
            def ranked(b: _Bounded) -> dict[str, Any]:
                items = sorted(b.items.items(), key=lambda kv: kv[1].cost_usd, reverse=True)
                return {k: v.as_dict() for k, v in items[:top]}

            return {"fleet": self.fleet.as_dict(), "agents": ranked(self.agents),
                    "sessions": ranked(self.sessions),
                    "evicted": {"agents": self.agents.evicted,
                                "sessions": self.sessions.evicted}}
