"""Pins: the tool definitions an operator (or first sight) approved, per server.

A rug pull is a server that changes a tool after it was approved — same name, new
description or schema. Each tool's definition (name, description, input schema) is reduced
to a fingerprint; :meth:`PinStore.check` says whether a listed tool matches its pin, is new,
or changed. New and changed tools stay hidden until :meth:`PinStore.approve`. Pins persist
as JSON written atomically, so they survive restarts and can be reviewed and shipped as an
operator-approved pin file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

__all__ = ["Pending", "PinState", "PinStore", "fingerprint"]


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


class PinStore:
    """Pins per server. ``trust_on_first_use``: a server never seen before has all the tools
    of its first listing pinned; otherwise every tool waits for approval."""

    def __init__(self, path: Path | None = None, trust_on_first_use: bool = True) -> None:
        self.path = path
        self.trust_on_first_use = trust_on_first_use
        self._lock = threading.Lock()
        self._pins: dict[str, dict[str, str]] = {}
        self._pending: dict[tuple[str, str], Pending] = {}
        self._learning: set[str] = set()
        if path is not None and path.exists():
            self._pins = self._read(path)

    @staticmethod
    def _read(path: Path) -> dict[str, dict[str, str]]:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not all(
                isinstance(v, dict) and all(isinstance(h, str) for h in v.values())
                for v in data.values()):
            raise ValueError(f"{path}: a pin file maps server -> {{tool: sha256}}")
        return {str(s): {str(t): h for t, h in tools.items()} for s, tools in data.items()}

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".pins-")
        with os.fdopen(fd, "w") as f:
            json.dump(self._pins, f, indent=2, sort_keys=True)
        os.replace(tmp, self.path)

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
                    self._pending.pop((server, name), None)
                else:
                    state = PinState.NEW if pinned is None else PinState.CHANGED
                    states[name] = state
                    self._pending[(server, name)] = Pending(server, name, state, fp)
            if last_page:
                self._learning.discard(server)
            if changed:
                self._save()
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
            self._save()
            return True

    def pins(self) -> dict[str, dict[str, str]]:
        with self._lock:
            return {s: dict(t) for s, t in self._pins.items()}
