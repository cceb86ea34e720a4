"""``llm: {providers, pricing}``: operator-defined LLM providers and the pricing table.

``llm.pricing.source`` names a price list in LiteLLM's format (``litellm``: the snapshot the
package ships, or a file path relative to the rules file) that prices every model the rules'
own ``models``/``overrides`` do not; the loader reads it (:func:`load_source`) once every
file is read, since at most one file may name it.

The entries themselves are read by the llm package (:func:`~fleetgate.llm.providers.
provider_from_dict`, :func:`~fleetgate.llm.pricing.price_from_dict`, which raise
``ValueError``); here they are located, checked for duplicates across every file, and the
aliases are checked to lead somewhere once every file is read (:func:`alias_problems`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetgate.llm.pricelist import PriceList, read_price_list
from fleetgate.llm.pricing import Price, PricingTable, price_from_dict
from fleetgate.llm.providers import Provider, provider_from_dict
from fleetgate.policy.report import Problem, Reporter, as_list, check_keys
from fleetgate.policy.schema import keys

__all__ = ["LlmSection", "alias_problems", "load_source", "parse_llm"]


@dataclass
class LlmSection:
    """The ``llm`` sections read so far. Prices are keyed by lower-case model name, with
    where each was declared (``file:line``)."""

    providers: list[Provider] = field(default_factory=list)
    prices: dict[str, tuple[Price, str]] = field(default_factory=dict)
    overrides: dict[str, tuple[Price, str]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    # llm.pricing.source as written, and where: the rules file and its line; then the list
    source: tuple[str, str, int | None] | None = None
    price_list: PriceList | None = None

    def merge(self, other: LlmSection) -> None:
        self.providers.extend(other.providers)
        self.prices.update(other.prices)
        self.overrides.update(other.overrides)
        self.aliases.update(other.aliases)
        self.source = self.source or other.source

    def pricing(self) -> PricingTable:
        prices = {k: v[0] for k, v in self.prices.items()}
        prices.update({k: v[0] for k, v in self.overrides.items()})  # overrides always win
        listed = self.price_list
        return PricingTable(prices, self.aliases, listed.prices if listed else None,
                            listed.name if listed else "")


def parse_llm(node: Any, where: str, report: Reporter, *,
              seen: LlmSection) -> LlmSection | None:
    """One document's ``llm`` section; ``seen``: what earlier files declared (for
    duplicates, which are errors: re-price a model with ``llm.pricing.overrides``)."""
    if node is None:
        return None
    if not isinstance(node, dict):
        report.error(where, "llm must be a mapping with 'providers' and/or 'pricing'")
        return None
    check_keys(node, where, keys("Llm"), report)
    out = LlmSection()
    names = {p.name for p in seen.providers}
    for i, entry in enumerate(as_list(node.get("providers"), f"{where}.providers", report)):
        provider = _provider(entry, f"{where}.providers[{i}]", report)
        if provider is None:
            continue
        if provider.name in names:
            report.error(f"{where}.providers[{i}].name",
                         f"duplicate provider name {provider.name!r}")
            continue
        names.add(provider.name)
        out.providers.append(provider)
    _pricing(node.get("pricing"), f"{where}.pricing", report, seen, out)
    return out


def _provider(node: Any, where: str, report: Reporter) -> Provider | None:
    if not isinstance(node, dict):
        report.error(where, "a provider is a mapping {name, api, hosts, pathPrefix}")
        return None
    check_keys(node, where, keys("Provider"), report)
    try:
        return provider_from_dict(node)
    except ValueError as exc:
        report.error(where, str(exc))
        return None


def _pricing(node: Any, where: str, report: Reporter, seen: LlmSection,
             out: LlmSection) -> None:
    if node is None:
        return
    if not isinstance(node, dict):
        report.error(where, "pricing must be a mapping with 'source', 'models', 'overrides' "
                     "and/or 'aliases'")
        return
    check_keys(node, where, keys("Pricing"), report)
    if "source" in node:
        _source(node["source"], f"{where}.source", report, seen, out)
    for key, before, table in (("models", seen.prices, out.prices),
                               ("overrides", seen.overrides, out.overrides)):
        models = node.get(key) or {}
        if not isinstance(models, dict):
            report.error(f"{where}.{key}", f"{key} must map model name -> {{input, output, ...}}")
            continue
        for model, entry in models.items():
            at = f"{where}.{key}.{model}"
            name = str(model).lower()
            if isinstance(entry, dict) and not check_keys(entry, at, keys("Price"), report):
                continue
            try:
                price = price_from_dict(str(model), entry)
            except ValueError as exc:
                report.error(at, str(exc))
                continue
            first = before.get(name) or table.get(name)
            if first is not None:
                report.error(at, f"{model!r} is priced twice in {where}.{key} (first at "
                             f"{first[1]}); re-price a model with {where}.overrides")
                continue
            table[name] = (price, report.source(at))
    aliases = node.get("aliases") or {}
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        report.error(f"{where}.aliases", "aliases must map a model name to a priced model name")
        return
    out.aliases.update({str(k).lower(): v.lower() for k, v in aliases.items()})


def _source(node: Any, where: str, report: Reporter, seen: LlmSection,
            out: LlmSection) -> None:
    if not isinstance(node, str) or not node.strip():
        report.error(where, "source must be 'litellm' (the price list fleetgate ships) or the "
                     "path of a price list file in LiteLLM's format")
        return
    if seen.source is not None:
        first = f"{seen.source[1]}:{seen.source[2]}" if seen.source[2] else seen.source[1]
        report.error(where, f"llm.pricing.source is already set at {first}: name one price "
                     "list, and re-price models with llm.pricing.overrides")
        return
    out.source = (node.strip(), report.file, report.lines.at(where))


def load_source(llm: LlmSection) -> Problem | None:
    """Read the price list ``llm.pricing.source`` names (a path: relative to the directory of
    the rules file naming it) into ``llm.price_list``; the problem when it cannot be read (the
    rules are then rejected: a budget must not lose its prices silently)."""
    if llm.source is None:
        return None
    spec, file, line = llm.source
    try:
        llm.price_list = read_price_list(spec, Path(os.path.dirname(file) or "."))
    except ValueError as exc:
        return Problem(file, line, "llm.pricing.source", str(exc))
    return None


def alias_problems(llm: LlmSection) -> list[tuple[str, str]]:
    """(key path, message) for every alias that leads to no priced model: checked once
    every file is read, since an alias may point at a model priced in another file."""
    table = llm.pricing()
    return [(f"llm.pricing.aliases.{alias}",
             f"alias {alias!r} does not lead to a priced model "
             f"(-> {target!r}; unknown or a cycle)")
            for alias, target in llm.aliases.items() if table.resolve(alias) is None]
