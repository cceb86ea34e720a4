"""Where every rules parser reports what is wrong: one :class:`Reporter` per load.

A problem is located for a human by file, line and key path (``agents[0].egress.hosts[1]``).
The parsers know only the key path; the reporter knows which file is being read and maps
the path to its YAML line (:class:`LineMap`). Every domain parser has the same shape::

    parse_x(node, where: str, report: Reporter, ...) -> X | None

``node`` is the plain YAML value, ``where`` its key path. A parser reports every problem it
finds and leaves out (returns ``None`` for) whatever has one: the loader refuses the whole
policy when :attr:`Reporter.problems` is not empty, so a half-valid entry never runs.

The small helpers here (:func:`check_keys`, :func:`as_list`, :func:`str_list`, :class:`Ids`)
are the checks every section repeats, written once so they say the same thing everywhere.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

__all__ = ["IdSpaces", "Ids", "LineMap", "Problem", "Reporter", "as_list", "check_keys",
           "did_you_mean", "str_list"]

# Keys from the seed dialect that belong elsewhere: refused with a pointer to their place,
# so an operator never believes a limit is enforced when it is not.
_MISPLACED = {
    "localRateLimit": "localRateLimit goes under 'policies:' (policies: {localRateLimit: [...]})",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the rules, located for a human."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        loc = f"{self.file}:{self.line}" if self.line else self.file
        where = f" at {self.path}" if self.path else ""
        return f"{loc}{where}: {self.message}"


class LineMap:
    """Maps a key path such as ``agents[0].egress.hosts[1]`` to its YAML line."""

    def __init__(self, node: yaml.Node | None = None) -> None:
        self.lines: dict[str, int] = {}
        self.duplicates: list[tuple[str, int]] = []  # (key path, line) of repeated keys
        if node is not None:
            self.walk(node, "")

    def walk(self, node: yaml.Node, path: str, line: int | None = None) -> None:
        self.lines[path] = line or node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                k = str(key.value)
                child = f"{path}.{k}" if path else k
                if k in seen:
                    self.duplicates.append((child, key.start_mark.line + 1))
                seen.add(k)
                self.walk(value, child, key.start_mark.line + 1)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.walk(item, f"{path}[{i}]")

    def at(self, path: str) -> int | None:
        """The line of ``path``, or of its nearest ancestor the map knows."""
        while path:
            if path in self.lines:
                return self.lines[path]
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return self.lines.get("")


class Reporter:
    """Collects the problems of one load, located in the document being read.

    ``file`` and ``lines`` say which document that is (:meth:`document` moves on to the
    next one); a reporter without a line map locates problems by file and key path only.
    """

    def __init__(self, file: str = "", lines: LineMap | None = None) -> None:
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.file = file
        self.lines = lines if lines is not None else LineMap()

    def document(self, file: str, lines: LineMap | None = None) -> None:
        """Locate what follows in ``file`` (with ``lines``, its current YAML document)."""
        self.file = file
        self.lines = lines if lines is not None else LineMap()

    def error(self, path: str, message: str) -> None:
        """``path`` (a key path in the current document) is wrong: the load fails."""
        self.problems.append(Problem(self.file, self.lines.at(path), path, message))

    def warn(self, path: str, message: str) -> None:
        """Worth an operator's attention, not a reason to refuse the rules."""
        self.warnings.append(Problem(self.file, self.lines.at(path), path, message))

    def error_at(self, file: str, line: int | None, path: str, message: str) -> None:
        """A problem located outside the current document (an unreadable file, a YAML
        syntax error, a check across every file)."""
        self.problems.append(Problem(file, line, path, message))

    def source(self, path: str) -> str:
        """``name.yaml:line`` of ``path``: what a compiled rule shows as its origin."""
        line = self.lines.at(path)
        name = os.path.basename(self.file)
        return f"{name}:{line}" if line else name


class Ids:
    """Ids that must be unique across every file of one load, with where each was first
    declared (``name.yaml:line``)."""

    def __init__(self) -> None:
        self.first: dict[str, str] = {}

    def claim(self, name: str, source: str) -> str | None:
        """Record ``name`` at ``source``; if it was already taken, where (and record nothing)."""
        taken = self.first.get(name)
        if taken is None:
            self.first[name] = source
        return taken

    def __contains__(self, name: object) -> bool:
        return name in self.first


class IdSpaces:
    """The id spaces of one load: profile names, rule ids (HTTP and MCP rules share one
    decision log), limit ids (rate limits and budgets, likewise) and trigger ids."""

    def __init__(self) -> None:
        self.agents = Ids()
        self.rules = Ids()
        self.limits = Ids()
        self.triggers = Ids()
        self.approvals = Ids()
        self.credentials: set[str] = set()
        self.mcp_servers: set[str] = set()


def check_keys(node: dict[str, Any], where: str, allowed: set[str] | frozenset[str],
               report: Reporter) -> bool:
    """Unknown keys are errors, never ignored: a misspelt ``deny`` must not silently become
    no rule at all. The message suggests the closest allowed key (``did you mean 'allow'?``).
    Returns whether every key was known. ``allowed`` comes from
    :func:`fleetgate.policy.schema.keys`: the one place the keys of the format are declared."""
    ok = True
    for key in node:
        path = f"{where}.{key}" if where else str(key)
        if key in _MISPLACED and key not in allowed:
            report.error(path, _MISPLACED[key])
            ok = False
        elif key not in allowed:
            report.error(path, f"unknown key {key!r}; expected one of {sorted(allowed)}"
                         + did_you_mean(str(key), allowed))
            ok = False
    return ok


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'allow'?"`` for the choice closest to ``word`` (case first), or ``""``."""
    choices = list(choices)
    folded = [c for c in choices if c.lower() == word.lower()]
    close = folded or difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def as_list(node: Any, where: str, report: Reporter) -> list[Any]:
    """``node`` as a list (absent: empty); anything else is reported."""
    if node is None:
        return []
    if not isinstance(node, list):
        report.error(where, "must be a list")
        return []
    return node


def str_list(node: Any, where: str, report: Reporter) -> list[str]:
    """A list of non-empty strings (numbers are taken as their text), stripped."""
    out = []
    for i, item in enumerate(as_list(node, where, report)):
        if isinstance(item, str | int) and not isinstance(item, bool) and str(item).strip():
            out.append(str(item).strip())
        else:
            report.error(f"{where}[{i}]", "must be a non-empty string")
    return out
