"""Where approved MCP tool pins are kept: a :class:`PinStore` and its JSON-file implementation.

:class:`fleetgate.mcp.pins.Pins` decides (first sight, rug pulls, approvals) without I/O; a
store loads the approved map once and saves it whole after every change. The file is written
atomically (temporary file + rename), so a crash never leaves half a pin file, and it is
plain JSON (``server -> {tool: sha256}``) an operator can review and ship.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from fleetgate.mcp.pins import PinMap, Pins

__all__ = ["FilePinStore", "PinStore", "open_pins"]


class PinStore(Protocol):
    """Approved pins that outlive the process."""

    def load(self) -> PinMap:
        """The approved pins; ``{}`` when none were saved. Raises ``ValueError`` (malformed)
        or ``OSError`` (unreadable)."""
        ...

    def save(self, pins: Mapping[str, Mapping[str, str]]) -> None:
        """Replace what is stored by ``pins`` (the whole map)."""
        ...


class FilePinStore:
    """Pins in one JSON file (``fleetgate_mcp_pins``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> PinMap:
        if not self.path.exists():
            return {}
        data = json.loads(self.path.read_text())
        if not isinstance(data, dict) or not all(
                isinstance(v, dict) and all(isinstance(h, str) for h in v.values())
                for v in data.values()):
            raise ValueError(f"{self.path}: a pin file maps server -> {{tool: sha256}}")
        return {str(s): {str(t): h for t, h in tools.items()} for s, tools in data.items()}

    def save(self, pins: Mapping[str, Mapping[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".pins-")
        with os.fdopen(fd, "w") as f:
            json.dump(pins, f, indent=2, sort_keys=True)
        os.replace(tmp, self.path)


def open_pins(store: PinStore | None, trust_on_first_use: bool = True) -> Pins:
    """Pins loaded from ``store`` and saved back to it on every change; in memory only when
    ``store`` is ``None``."""
    if store is None:
        return Pins(trust_on_first_use=trust_on_first_use)
    return Pins(store.load(), trust_on_first_use, store.save)
