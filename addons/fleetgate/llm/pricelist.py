"""A maintained public price list, in LiteLLM's model price map format, under the rules' prices.

A hand-kept table goes stale the day a provider ships a model: every newer model is then
``unpriced`` and a USD budget refuses it. LiteLLM keeps ``model_prices_and_context_window.json``
current for thousands of models (MIT licence); fleetgate ships a snapshot of it (the fields it
prices with: ``llm/prices/litellm.json``, provenance in ``litellm.meta.json``, refreshed by
``scripts/update_prices.py``) and reads the same format from any file an operator points at.

The format: a JSON object, model name -> entry; an entry is priced when it has
``input_cost_per_token`` and ``output_cost_per_token`` (USD per token, numbers >= 0);
``cache_read_input_token_cost`` and ``cache_creation_input_token_cost`` default to the input
price, as in the rules. Prices become USD per million tokens (the rules' unit) by decimal
scaling, so ``2.5e-06`` is exactly ``2.5``. Long-context tiers (``*_above_200k_tokens``), batch
and priority prices are not read, as in the rules table. Entries that do not fit are left out
(so their models stay unpriced: never free) and counted in :attr:`PriceList.skipped`.

Keys prefixed with the provider (``xai/grok-4.3``) are also listed under their bare name when
the provider is one whose own API takes bare names (:data:`FIRST_PARTY_PREFIXES`) and the list
has no bare entry of that name: a request to ``api.x.ai`` says ``grok-4.3``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from fleetgate.llm.pricing import Price

__all__ = ["BUNDLED", "FIRST_PARTY_PREFIXES", "PriceList", "bundled_version", "parse_litellm",
           "read_price_list"]

BUNDLED = "litellm"  # llm.pricing.source: litellm -> the snapshot shipped in the package
_DIR = Path(__file__).resolve().parent / "prices"
FIRST_PARTY_PREFIXES = ("xai/", "gemini/", "deepseek/", "mistral/")


@dataclass(frozen=True)
class PriceList:
    """USD per million tokens by lower-case model name; ``name`` says where it came from
    (``litellm 1.110.2`` or a file path), ``digest`` is folded into the policy revision."""

    name: str
    prices: Mapping[str, Price] = field(default_factory=dict)
    skipped: int = 0
    digest: str = ""


def _per_million(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return float(Decimal(repr(value)).scaleb(6))


def _price(entry: Any) -> Price | None:
    if not isinstance(entry, Mapping):
        return None
    inp = _per_million(entry.get("input_cost_per_token"))
    out = _per_million(entry.get("output_cost_per_token"))
    if inp is None or out is None:
        return None
    read, write = (entry.get(k) for k in ("cache_read_input_token_cost",
                                          "cache_creation_input_token_cost"))
    cache_read = inp if read is None else _per_million(read)
    cache_write = inp if write is None else _per_million(write)
    if cache_read is None or cache_write is None:
        return None
    return Price(inp, out, cache_read, cache_write)


def parse_litellm(text: str, name: str, digest: str = "") -> PriceList:
    """The price list in ``text`` (LiteLLM's format); ``ValueError`` when it is not a JSON
    object at all. Entries that cannot be priced are skipped and counted, not errors: the
    upstream file carries image, audio and search models priced per call."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{name}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{name}: a price list is a JSON object of model name -> prices")
    prices: dict[str, Price] = {}
    skipped = 0
    for model, entry in data.items():
        if model == "sample_spec":  # LiteLLM's documentation entry
            continue
        price = _price(entry)
        if price is None:
            skipped += 1
            continue
        prices[str(model).strip().lower()] = price
    for model, price in list(prices.items()):
        for prefix in FIRST_PARTY_PREFIXES:
            if model.startswith(prefix):
                prices.setdefault(model[len(prefix):], price)
    return PriceList(name, prices, skipped, digest)


def bundled_version() -> str:
    """``litellm 1.110.2 (fetched 2026-12-06)``: which snapshot the package ships."""
    try:
        meta = json.loads((_DIR / "litellm.meta.json").read_text(encoding="utf-8"))
        return f"litellm {meta['version']} (fetched {meta['fetched']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "litellm (unknown version)"


def read_price_list(spec: str, base: Path) -> PriceList:
    """The list ``llm.pricing.source`` names: ``litellm`` (the shipped snapshot) or a path to
    a file in LiteLLM's format, relative to the rules file's directory. ``ValueError`` (with
    what to do) when it cannot be read."""
    import hashlib

    if spec == BUNDLED:
        path, name = _DIR / "litellm.json", bundled_version()
    else:
        path = Path(spec).expanduser()
        path = path if path.is_absolute() else base / path
        name = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the price list {spec!r} ({path}): {exc.strerror or exc}; "
                         f"give a file in LiteLLM's format, or 'litellm' for the list "
                         "fleetgate ships") from None
    digest = hashlib.sha256(raw).hexdigest()
    cached = _PARSED.get((name, digest))
    if cached is not None:
        return cached
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 ({exc.reason})") from None
    listed = parse_litellm(text, name, digest)
    if len(_PARSED) >= 4:
        _PARSED.clear()
    _PARSED[(name, digest)] = listed
    return listed


# (name, sha256) -> parsed list: every reload re-reads the file, only a changed one is parsed
_PARSED: dict[tuple[str, str], PriceList] = {}
