"""Pins: the tool definitions an operator (or first sight) approved, per server.

A rug pull is a server that changes a tool after it was approved — same name, new
description or schema. Each tool's definition (name, description, input schema) is reduced
to a fingerprint; :meth:`Pins.check` says whether a listed tool matches its pin, is new, or
changed. New and changed tools stay hidden until :meth:`Pins.approve`.

No I/O: the approved pins come in at construction and every change goes out through
``on_change`` (the pin store's ``save``, :mod:`fleetgate.stores.pins`), so they survive
restarts and can be reviewed and shipped as an operator-approved pin file.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = ["Pending", "PinMap", "PinState", "Pins", "fingerprint"]

PinMap = dict[str, dict[str, str]]  # server -> tool -> sha256 of its approved definition


def fingerprint(tool: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of what the model is told about the tool."""
    canon = json.dumps({"name": tool.get("name"), "description": tool.get("description"),
                        "inputSchema": tool.get("inputSchema")},
                       sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()


class PinState(StrEnum):
    PINNED = "pinned"      # matches its approved definition
    NEW = "new"            # a tool the server did not offer when it was pinned
    CHANGED = "changed"    # differs from its approved definition (rug pull?)


@dataclass(frozen=True)
class Pending:
    server: str
    tool: str
    state: PinState
    fingerprint: str


class Pins:
    """Pins per server, and the definitions waiting for an operator. ``trust_on_first_use``:
    a server never seen before has all the tools of its first listing pinned; otherwise
    every tool waits for approval. ``on_change`` gets the whole map after every change (under
    the lock, so saves land in the order the changes were made)."""

    def __init__(self, approved: Mapping[str, Mapping[str, str]] | None = None,
                 trust_on_first_use: bool = True,
                 on_change: Callable[[PinMap], None] | None = None,
                 on_pending: Callable[[Pending], None] | None = None) -> None:
        self.trust_on_first_use = trust_on_first_use
        self._on_change = on_change
        self._on_pending = on_pending  # a definition starts waiting (shared state: others see it)
        self._lock = threading.Lock()
        self._pins: PinMap = {s: dict(t) for s, t in (approved or {}).items()}
        self._pending: dict[tuple[str, str], Pending] = {}
        self._learning: set[str] = set()
        # bumped on every change to the pins, the pending list or the servers still learning:
        # a listing judged at one version is judged the same at that version again
        self.version = 0

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self._pins)

    def check(self, server: str, tools: list[dict[str, Any]], last_page: bool = True,
              fingerprints: list[str] | None = None) -> dict[str, PinState]:
        """State of each listed tool (by name); records new/changed ones as pending.

        Trust on first use covers a server's whole first listing, every page of it: the
        server stays "learning" until a page without ``nextCursor`` (``last_page``)."""
        with self._lock:
            known = self._pins.get(server)
            if known is None and self.trust_on_first_use:
                known = self._pins[server] = {}
                self._learning.add(server)
                self.version += 1
            learning = server in self._learning
            if known is None:
                known = {}
            states: dict[str, PinState] = {}
            changed = False
            fps = fingerprints if fingerprints is not None else [fingerprint(t) for t in tools]
            for t, fp in zip(tools, fps, strict=True):
                name = str(t.get("name"))
                pinned = known.get(name)
                if pinned is None and learning:
                    known[name] = pinned = fp
                    changed = True
                if pinned == fp:
                    states[name] = PinState.PINNED
                    if self._pending.pop((server, name), None) is not None:
                        self.version += 1
                else:
                    state = PinState.NEW if pinned is None else PinState.CHANGED
                    states[name] = state
                    p = Pending(server, name, state, fp)
                    if self._pending.get((server, name)) != p:
                        self._pending[(server, name)] = p
                        self.version += 1
                        if self._on_pending is not None:
                            self._on_pending(p)
            if last_page and server in self._learning:
                self._learning.discard(server)
                self.version += 1
            if changed:
                self.version += 1
                self._changed()
            return states

    def state(self, server: str, tool: str, fp: str) -> PinState | None:
        """Whether ``tool`` with definition ``fp`` is approved; ``None`` when the server has
        never been listed (nothing to compare with)."""
        with self._lock:
            known = self._pins.get(server)
            if known is None:
                return None
            pinned = known.get(tool)
            if pinned == fp:
                return PinState.PINNED
            return PinState.NEW if pinned is None else PinState.CHANGED

    def pending(self) -> list[Pending]:
        with self._lock:
            return sorted(self._pending.values(), key=lambda p: (p.server, p.tool))

    def approve(self, server: str, tool: str) -> bool:
        """Pin the pending definition of ``tool``; False if nothing is pending for it."""
        with self._lock:
            p = self._pending.pop((server, tool), None)
            if p is None:
                return False
            self._pins.setdefault(server, {})[tool] = p.fingerprint
            self.version += 1
            self._changed()
            return True

    def pin(self, server: str, tool: str, fp: str) -> None:
        """Approve definition ``fp`` of ``tool`` (an approval of a definition another gateway
        saw: the shared pending list)."""
        with self._lock:
            self._pins.setdefault(server, {})[tool] = fp
            p = self._pending.get((server, tool))
            if p is not None and p.fingerprint == fp:
                del self._pending[(server, tool)]
            self.version += 1
            self._changed()

    def adopt(self, shared: Mapping[str, Mapping[str, str]]) -> None:
        """Take the pins other gateways saved (the shared store's view wins for every tool it
        names; a pending definition it approved stops waiting). ``on_change`` is not called:
        this is what the store already holds."""
        with self._lock:
            for server, tools in shared.items():
                known = self._pins.setdefault(server, {})
                for tool, fp in tools.items():
                    if known.get(tool) != fp:
                        known[tool] = fp
                        self.version += 1
                    p = self._pending.get((server, tool))
                    if p is not None and p.fingerprint == fp:
                        del self._pending[(server, tool)]
                        self.version += 1

    def pins(self) -> PinMap:
        with self._lock:
            return {s: dict(t) for s, t in self._pins.items()}
