"""Vetting: is a server's tool safe to show the model, and to call?

Combines the poisoning scan (:mod:`.poison`) and the pins (:mod:`.pins`) under the server's
modes (``enforce`` hides and refuses, ``report`` shows and reports, ``off``). Remembers the
last definition each server listed per tool, so a call is refused for a tool that is hidden,
whether or not the calling agent ever listed it. Each finding is reported once per tool
definition (not on every listing), through ``on_finding``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleetgate.mcp.mode import McpMode
from fleetgate.mcp.pins import Pins, PinState, fingerprint
from fleetgate.mcp.poison import Finding, scan_patterns, shadowing

__all__ = ["Report", "Vetting"]

_SCAN_CACHE = 20_000  # fingerprints whose pattern findings are remembered


@dataclass(frozen=True)
class Report:
    """One finding or pin event about one tool, for the log, metrics and operators."""

    server: str
    tool: str
    rule: str  # poisoning rule id, or "pin.new" / "pin.changed"
    field: str
    detail: str
    mode: McpMode
    fingerprint: str


class Vetting:
    def __init__(self, pins: Pins, on_report: Callable[[Report], None] | None = None) -> None:
        self.pins = pins
        self.on_report = on_report
        self._lock = threading.Lock()
        self._scans: OrderedDict[str, list[Finding]] = OrderedDict()
        self._reported: set[tuple[str, str, str, str]] = set()
        # server -> tool -> (fingerprint, why hidden under enforce or None)
        self._last: dict[str, dict[str, tuple[str, list[Finding]]]] = {}
        self._last_version = 0  # bumped whenever a server's last listing changes

    @property
    def version(self) -> tuple[int, int]:
        """Changes whenever anything :meth:`vet` reads or :meth:`blocked` answers from
        changes (the pins, the pending list, what servers last listed): a listing vetted at
        one version is vetted the same at that version again, side effects included."""
        return self._last_version, self.pins.version

    def _patterns(self, fp: str, tool: dict[str, Any]) -> list[Finding]:
        with self._lock:
            hit = self._scans.get(fp)
            if hit is not None:
                self._scans.move_to_end(fp)
                return hit
        found = scan_patterns(tool)
        with self._lock:
            self._scans[fp] = found
            if len(self._scans) > _SCAN_CACHE:
                self._scans.popitem(last=False)
        return found

    def _others(self, server: str) -> set[str]:
        with self._lock:
            return {t for s, tools in self._last.items() if s != server for t in tools}

    def _report(self, report: Report) -> None:
        key = (report.server, report.tool, report.fingerprint, report.rule)
        with self._lock:
            if key in self._reported:
                return
            self._reported.add(key)
        if self.on_report is not None:
            self.on_report(report)

    def vet(self, server: str, tools: list[dict[str, Any]], last_page: bool,
            poisoning: McpMode, pins: McpMode) -> dict[str, str | None]:
        """Why each listed tool must be hidden from the model (``None``: show it)."""
        fps = [fingerprint(t) for t in tools]
        states = (self.pins.check(server, tools, last_page, fps) if pins is not McpMode.OFF else {})
        others = self._others(server) if poisoning is not McpMode.OFF else set()
        out: dict[str, str | None] = {}
        seen: dict[str, tuple[str, list[Finding]]] = {}
        for tool, fp in zip(tools, fps, strict=True):
            name = str(tool.get("name") or "")
            findings: list[Finding] = []
            if poisoning is not McpMode.OFF:
                findings = self._patterns(fp, tool) + shadowing(tool, others)
                for f in findings:
                    self._report(Report(server, name, f.rule, f.field, f.excerpt, poisoning, fp))
            seen[name] = (fp, findings)
            why: str | None = None
            if findings and poisoning is McpMode.ENFORCE:
                f = findings[0]
                why = f"tool poisoning: {f.rule} in {f.field} ({f.excerpt!r})"
            state = states.get(name, PinState.PINNED)
            if state is not PinState.PINNED:
                self._report(Report(server, name, f"pin.{state.value}", "definition",
                                    "awaiting operator approval", pins, fp))
                if why is None and pins is McpMode.ENFORCE:
                    why = ("tool definition changed since it was approved" if state is
                           PinState.CHANGED else "new tool awaiting operator approval")
            out[name] = why
        with self._lock:
            last = self._last.setdefault(server, {})
            if any(last.get(name) != now for name, now in seen.items()):
                last.update(seen)
                self._last_version += 1
        return out

    def blocked(self, server: str, tool: str, poisoning: McpMode, pins: McpMode) -> str | None:
        """Why a call to ``tool`` is refused, from what the server last listed."""
        with self._lock:
            last = self._last.get(server, {}).get(tool)
        if last is not None and poisoning is McpMode.ENFORCE and last[1]:
            f = last[1][0]
            return f"tool poisoning: {f.rule} in {f.field}"
        if pins is not McpMode.ENFORCE:
            return None
        if last is None:
            if server in self.pins.pins() and tool not in self.pins.pins()[server]:
                return "tool was never listed by its server through the gateway and is not approved"
            return None
        state = self.pins.state(server, tool, last[0])
        if state is PinState.CHANGED:
            return "tool definition changed since it was approved"
        if state is PinState.NEW:
            return "new tool awaiting operator approval"
        return None
