"""``fleetgate pricing check``: which models the installed OpenAI and Anthropic SDKs name that
the rules' price table (``llm.pricing``, with its price list) cannot price.

A model the table does not price is ``unpriced``: counted, never free, and refused under a USD
budget. New models reach agents through SDK upgrades, so the SDKs' own model lists are the
early warning: each SDK declares the names it knows as ``Literal`` types
(:data:`SDK_MODEL_TYPES`), read with :func:`typing.get_args`; no network, no API key.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import typing
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from fleetgate.cli_kill import emit, table
from fleetgate.llm.pricing import PricingTable

__all__ = ["SDK_MODEL_TYPES", "SdkModels", "add_pricing_command", "check_rows", "sdk_models"]

# (distribution, module, type): the model names each SDK's request types accept
SDK_MODEL_TYPES = (
    ("openai", "openai.types.shared", "ResponsesModel"),  # chat models and responses-only ones
    ("openai", "openai.types", "ChatModel"),
    ("openai", "openai.types", "EmbeddingModel"),
    ("anthropic", "anthropic.types", "Model"),
)


@dataclass(frozen=True)
class SdkModels:
    """Model names by SDK (``{"openai": {...}}``), the SDKs' versions, and what could not be
    read (``{"anthropic": "not installed"}``)."""

    models: dict[str, set[str]]
    versions: dict[str, str]
    missing: dict[str, str]


def literal_strings(tp: Any) -> set[str]:
    """Every string in the ``Literal[...]`` types inside ``tp`` (a ``Union``, ``Literal``,
    or alias of them)."""
    out: set[str] = set()
    if typing.get_origin(tp) is typing.Literal:
        return {a for a in typing.get_args(tp) if isinstance(a, str)}
    for arg in typing.get_args(tp):
        out |= literal_strings(arg)
    return out


def sdk_models(types: tuple[tuple[str, str, str], ...] = SDK_MODEL_TYPES) -> SdkModels:
    models: dict[str, set[str]] = {}
    versions: dict[str, str] = {}
    missing: dict[str, str] = {}
    for dist, module, name in types:
        try:
            versions[dist] = metadata.version(dist)
            tp = getattr(importlib.import_module(module), name)
        except metadata.PackageNotFoundError:
            missing[dist] = "not installed"
            continue
        except (ImportError, AttributeError) as exc:
            missing[dist] = f"{module}.{name} not found ({exc}); this check knows SDK versions " \
                "that declare it"
            continue
        models.setdefault(dist, set()).update(literal_strings(tp))
    return SdkModels(models, versions, missing)


def check_rows(pricing: PricingTable, sdks: SdkModels) -> list[dict[str, Any]]:
    """One row per (model, SDK): priced or not, under which key and from where."""
    rows = []
    for sdk, names in sorted(sdks.models.items()):
        for model in sorted(names):
            found = pricing.price(model)
            rows.append({"model": model, "sdk": sdk, "priced": found is not None,
                         "key": found[0] if found else None,
                         "source": found[2] if found else None})
    return rows


def cmd_pricing_check(args: argparse.Namespace) -> int:
    from fleetgate.policy.loader import PolicyError, iter_problems, load_policy

    try:
        pricing = load_policy(args.rules).pricing
    except PolicyError as exc:
        for line in iter_problems(exc):
            print(line, file=sys.stderr)
        print(f"fleetgate: the rules at {args.rules} do not load; fix them first "
              "(fleetgate rules check)", file=sys.stderr)
        return 2
    sdks = sdk_models()
    rows = check_rows(pricing, sdks)
    unpriced = [r for r in rows if not r["priced"]]
    if args.json:
        emit([json.dumps({"rules": str(args.rules), "price_list": pricing.listed_from or None,
                          "sdks": sdks.versions, "missing": sdks.missing,
                          "models": rows if args.all else unpriced,
                          "unpriced": len(unpriced), "checked": len(rows)}, indent=2)])
    else:
        shown = rows if args.all else unpriced
        lines = [f"price list: {pricing.listed_from or 'none (llm.pricing.source not set)'}; "
                 f"SDKs: {', '.join(f'{k} {v}' for k, v in sorted(sdks.versions.items()))
                          or 'none'}"]
        lines += [f"warning: {sdk}: {why}" for sdk, why in sorted(sdks.missing.items())]
        if shown:
            lines += ["", *table(("MODEL", "SDK", "PRICED AS", "FROM"),
                                 [(r["model"], r["sdk"], r["key"] or "UNPRICED", r["source"])
                                  for r in shown])]
        lines += ["", f"{len(unpriced)} of {len(rows)} model name(s) the SDKs declare are "
                  "unpriced" + (": a USD budget refuses them; price them in llm.pricing.models "
                                "or aliases, or refresh the price list" if unpriced else "")]
        emit(lines)
    if not rows and args.strict:
        print("fleetgate: no SDK model lists could be read (install openai and/or anthropic)",
              file=sys.stderr)
        return 1
    return 1 if unpriced and args.strict else 0


def add_pricing_command(sub: Any) -> None:
    p = sub.add_parser("pricing", help="the LLM price table (llm.pricing and its price list)")
    ps = p.add_subparsers(dest="pricing_cmd", required=True, metavar="COMMAND")
    check = ps.add_parser(
        "check", help="list models the installed OpenAI and Anthropic SDKs name that the "
        "rules cannot price", description=__doc__.split("\n\n")[0].replace("``", "'"))
    check.add_argument("--rules", default="rules",
                       help="rules file or directory (default: %(default)s)")
    check.add_argument("--strict", action="store_true",
                       help="exit 1 when a model is unpriced (or no SDK could be read): for CI")
    check.add_argument("--all", action="store_true",
                       help="list priced models too, with the key and source pricing them")
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.set_defaults(func=cmd_pricing_check)
