"""fleetgate.durations: the one parser behind every duration in the rules, KILLSWITCH.md and the CLI."""

from __future__ import annotations

import math
import re

import pytest

from fleetgate.durations import SPOKEN, parse_duration, parse_spoken, seconds, unit_seconds


@pytest.mark.parametrize(("text", "expected"), [
    ("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("24h", 86400), ("7d", 604800),
    (" 30s ", 30), ("0", 0),
])
def test_compact(text: str, expected: int) -> None:
    assert parse_duration(text) == expected
    assert isinstance(parse_duration(text), int)


@pytest.mark.parametrize("text", ["", "soon", "1.5h", "-5s", "10 minutes", "5x", "1h30m", "h"])
def test_compact_rejects_with_the_message_operators_see(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"bad duration {text!r}: use e.g. 30s, 15m, 1h, 7d")):
        parse_duration(text)


@pytest.mark.parametrize(("value", "expected"), [
    (30, 30.0), (2.5, 2.5), (0, 0.0), (-1, -1.0), ("1m", 60.0), ("45", 45.0),
])
def test_seconds_takes_yaml_numbers_and_strings(value: object, expected: float) -> None:
    assert seconds(value) == expected


@pytest.mark.parametrize("value", [True, False, None, [1], {"s": 1}, math.inf, math.nan])
def test_seconds_rejects_what_is_no_duration(value: object) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        seconds(value)


def test_seconds_reports_a_bad_string_like_the_compact_parser() -> None:
    with pytest.raises(ValueError, match=re.escape("bad duration 'soon': use e.g. 30s, 15m, 1h, 7d")):
        seconds("soon")


@pytest.mark.parametrize(("text", "expected"), [
    ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("10 minutes", 600.0), ("1.5h", 5400.0),
    ("hour", 3600.0), ("2 days", 172800.0), ("  45 secs ", 45.0), ("3 HRS", 10800.0),
    ("1 min", 60.0),
])
def test_spoken(text: str, expected: float) -> None:
    assert parse_spoken(text) == expected


@pytest.mark.parametrize("text", ["soon", "", "5", "5 fortnights", "1h30m", "-1h"])
def test_spoken_rejects_with_the_killswitch_md_message(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(
            f"bad duration {text.strip()!r}: use e.g. 30s, 5m, 1h, 10 minutes")):
        parse_spoken(text)


def test_spoken_fragment_embeds_in_a_sentence() -> None:
    m = re.match(r"^every\s+" + SPOKEN + r"$", "every 10 minutes", re.I)
    assert m is not None
    assert float(m.group("n")) * unit_seconds(m.group("u")) == 600.0
    assert unit_seconds("Days") == 86400.0
