"""Dollar cost of a call, from a pricing table that ships as data in ``rules/``.

Prices are USD per million tokens for input, output, cache reads and cache writes. Model
names resolve through: exact name -> operator aliases -> the name without a date suffix
(``claude-sonnet-4-5-20250929``, ``gpt-4o-2024-08-06``) or ``-latest`` -> ``models/`` prefix
stripped. A model the table does not know is reported ``unpriced`` (cost ``None``), never
silently as zero dollars.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fleetgate.llm.usage import Usage

__all__ = ["Price", "PricingTable", "price_from_dict"]

_DATE_SUFFIX = re.compile(r"(-\d{8}|-\d{4}-\d{2}-\d{2}|-latest|@\d{8})$")


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float
    cache_read: float
    cache_write: float

    def cost(self, u: Usage) -> float:
        uncached = max(u.input - u.cache_read - u.cache_write, 0)
        return (uncached * self.input + u.cache_read * self.cache_read
                + u.cache_write * self.cache_write + u.output * self.output) / 1_000_000


def price_from_dict(model: str, entry: Any) -> Price:
    if not isinstance(entry, Mapping):
        raise ValueError(f"price for {model!r} must be a mapping with input/output")
    unknown = set(entry) - {"input", "output", "cacheRead", "cacheWrite"}
    if unknown:
        raise ValueError(f"price for {model!r}: unknown key(s) {sorted(unknown)}")
    vals: dict[str, float] = {}
    for key in ("input", "output", "cacheRead", "cacheWrite"):
        v = entry.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise ValueError(f"price for {model!r}: {key} must be a number >= 0")
        vals[key] = float(v)
    if "input" not in vals or "output" not in vals:
        raise ValueError(f"price for {model!r} needs both 'input' and 'output'")
    return Price(vals["input"], vals["output"], vals.get("cacheRead", vals["input"]),
                 vals.get("cacheWrite", vals["input"]))


class PricingTable:
    def __init__(self, prices: Mapping[str, Price] | None = None,
                 aliases: Mapping[str, str] | None = None) -> None:
        self.prices = {k.lower(): v for k, v in (prices or {}).items()}
        self.aliases = {k.lower(): v.lower() for k, v in (aliases or {}).items()}

    def resolve(self, model: str | None) -> str | None:
        """The table key ``model`` is priced under, or ``None``."""
        if not model:
            return None
        name = model.strip().lower()
        for _ in range(4):
            if name in self.prices:
                return name
            if name in self.aliases:
                name = self.aliases[name]
                continue
            stripped = _DATE_SUFFIX.sub("", name)
            if stripped.startswith("models/"):
                stripped = stripped[len("models/"):]
            if stripped == name:
                return None
            name = stripped
        return name if name in self.prices else None

    def cost(self, model: str | None, usage: Usage) -> float | None:
        key = self.resolve(model)
        return None if key is None else self.prices[key].cost(usage)
