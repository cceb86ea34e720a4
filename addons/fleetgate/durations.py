"""Durations, as the rules, KILLSWITCH.md and the command line write them: one parser.

Two spellings, one unit table:

* compact (rules YAML, CLI): ``90`` (seconds), ``90s``, ``15m``, ``1h``, ``7d``:
  :func:`parse_duration`; :func:`seconds` also takes a YAML number (seconds);
* spoken (KILLSWITCH.md prose): ``30s``, ``1.5h``, ``10 minutes``, ``hour`` (one of the unit):
  :func:`parse_spoken`, and :data:`SPOKEN` for grammars that embed a duration in a sentence.

Pure: no clock, no I/O. Each caller keeps its own range check (a cooldown may be 0, a window
may not) and, where operators see it, its own message.
"""

from __future__ import annotations

import math
import re

__all__ = ["SPOKEN", "UNIT_SECONDS", "parse_duration", "parse_spoken", "seconds", "unit_seconds"]

UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_COMPACT = re.compile(r"^(\d+)([smhd]?)$")
# A regex fragment with groups "n" (optional number, default 1) and "u" (the unit word).
SPOKEN = (r"(?P<n>\d+(?:\.\d+)?)?\s*(?P<u>seconds?|secs?|s|minutes?|mins?|m|hours?|hrs?|h|"
          r"days?|d)\b")
_SPOKEN = re.compile(r"\s*" + SPOKEN + r"\s*", re.I)


def parse_duration(text: str) -> int:
    """``90`` / ``90s`` / ``15m`` / ``1h`` / ``7d`` -> whole seconds; ``ValueError`` otherwise."""
    m = _COMPACT.match(text.strip())
    if not m:
        raise ValueError(f"bad duration {text!r}: use e.g. 30s, 15m, 1h, 7d")
    return int(m.group(1)) * UNIT_SECONDS[m.group(2)]


def seconds(value: object) -> float:
    """A YAML duration: a finite number (seconds) or a compact string (:func:`parse_duration`).

    Anything else (a boolean, a list, ``.inf``) is a ``ValueError``.
    """
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        return float(parse_duration(value))
    raise ValueError(f"bad duration {value!r}: use e.g. 30s, 15m, 1h")


def unit_seconds(unit: str) -> float:
    """Seconds in a unit word matched by :data:`SPOKEN` (``minutes`` -> 60)."""
    return float(UNIT_SECONDS[unit[0].lower()])


def parse_spoken(text: str) -> float:
    """``30s`` / ``1.5h`` / ``10 minutes`` / ``hour`` -> seconds; ``ValueError`` otherwise."""
    m = _SPOKEN.fullmatch(text)
    if m is None:
        raise ValueError(f"bad duration {text.strip()!r}: use e.g. 30s, 5m, 1h, 10 minutes")
    return float(m.group("n") or 1) * unit_seconds(m.group("u"))
