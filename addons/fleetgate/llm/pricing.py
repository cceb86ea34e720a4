"""Dollar cost of a call, from the rules' prices (``llm.pricing``) over a public price list.

Prices are USD per million tokens for input, output, cache reads and cache writes. Model
names resolve through: exact name -> operator aliases -> the name without a date suffix
(``claude-sonnet-4-5-20250929``, ``gpt-4o-2024-08-06``) or ``-latest`` -> ``models/`` prefix
stripped. That walk runs over the rules' own prices first and only then over the price list
(``llm.pricing.source``, :mod:`fleetgate.llm.pricelist`): a price the operator wrote covers the
model's whole family, dated versions included, even where the list has a dated entry. A model
neither knows is reported ``unpriced`` (cost ``None``), never silently as zero dollars.
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
    """``prices``: the rules' own (``models`` and ``overrides``); ``listed``: a price list's
    (``llm.pricing.source``), named ``listed_from`` (``litellm 1.110.2 (...)`` or a path)."""

    def __init__(self, prices: Mapping[str, Price] | None = None,
                 aliases: Mapping[str, str] | None = None,
                 listed: Mapping[str, Price] | None = None, listed_from: str = "") -> None:
        self.prices = {k.lower(): v for k, v in (prices or {}).items()}
        self.aliases = {k.lower(): v.lower() for k, v in (aliases or {}).items()}
        self.listed = {k.lower(): v for k, v in (listed or {}).items()}
        self.listed_from = listed_from

    def resolve(self, model: str | None) -> str | None:
        """The key ``model`` is priced under (in :attr:`prices`, else :attr:`listed`), or
        ``None``."""
        if not model:
            return None
        name = model.strip().lower()
        return self._walk(name, self.prices) or self._walk(name, self.listed)

    def _walk(self, name: str, table: Mapping[str, Price]) -> str | None:
        for _ in range(4):
            if name in table:
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
        return name if name in table else None

    def price(self, model: str | None) -> tuple[str, Price, str] | None:
        """(key, price, where from: ``rules`` or the list's name) for ``model``, or ``None``."""
        key = self.resolve(model)
        if key is None:
            return None
        if key in self.prices:
            return key, self.prices[key], "rules"
        return key, self.listed[key], self.listed_from or "price list"

    def cost(self, model: str | None, usage: Usage) -> float | None:
        found = self.price(model)
        return None if found is None else found[1].cost(usage)
