"""Test modules are imported by basename (no packages under tests/): two files with one name
in different directories make pytest refuse to collect the second ("import file mismatch"),
and CI goes red only when both land. Caught here, by name, the moment the second is added."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_module_has_a_unique_basename() -> None:
    names = Counter(p.name for p in TESTS.rglob("test_*.py") if "__pycache__" not in p.parts)
    assert [n for n, c in names.items() if c > 1] == []
