"""MCP sessions the gateway has seen: who owns each, and answers owed on event streams.

Two facts outlive a single HTTP exchange:

* **Ownership.** A session id (``Mcp-Session-Id`` of streamable HTTP, ``session_id`` of the
  older HTTP+SSE transport) is bound to the agent that opened it. Another agent presenting
  it is refused: a sub-agent cannot ride its parent's session past its own rules.
* **Answers owed.** In the older transport the answer to a POST arrives on the session's GET
  event stream; the request methods (which list a result answers) and the placeholders of
  denied calls are parked here until that answer passes.

Bounded: at most ``limit`` sessions (oldest forgotten first) and ``per_session`` parked
answers each, so a misbehaving client cannot grow the gateway's memory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Session", "Sessions"]


@dataclass
class Session:
    owner: str
    legacy: bool = False  # the older HTTP+SSE transport: answers come on the GET stream
    methods: OrderedDict[str, str] = field(default_factory=OrderedDict)
    substitutions: dict[str, dict[str, Any]] = field(default_factory=dict)


class Sessions:
    def __init__(self, limit: int = 100_000, per_session: int = 10_000) -> None:
        self.limit = limit
        self.per_session = per_session
        self._sessions: OrderedDict[tuple[str, str], Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, server: str, sid: str) -> Session | None:
        return self._sessions.get((server, sid))

    def claim(self, server: str, sid: str, agent: str, legacy: bool = False) -> str | None:
        """Bind ``sid`` to ``agent``; the reason to refuse if another agent owns it."""
        key = (server, sid)
        s = self._sessions.get(key)
        if s is None:
            self._sessions[key] = Session(agent, legacy)
            if len(self._sessions) > self.limit:
                self._sessions.popitem(last=False)
            return None
        self._sessions.move_to_end(key)
        if s.owner != agent:
            return f"MCP session {sid!r} belongs to another agent"
        s.legacy = s.legacy or legacy
        return None

    def forget(self, server: str, sid: str) -> None:
        self._sessions.pop((server, sid), None)

    def expect(self, server: str, sid: str, methods: dict[str, str],
               substitutions: dict[str, dict[str, Any]]) -> None:
        """Park what the answers to these request ids will need."""
        s = self._sessions.get((server, sid))
        if s is None:
            return
        s.methods.update(methods)
        s.substitutions.update(substitutions)
        while len(s.methods) > self.per_session:
            old, _ = s.methods.popitem(last=False)
            s.substitutions.pop(old, None)

    def owed(self, server: str, sid: str) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        """The live maps of methods and substitutions for a session (empty if unknown)."""
        s = self._sessions.get((server, sid))
        if s is None:
            return {}, {}
        return s.methods, s.substitutions
