#!/usr/bin/env python3
"""Refresh the price list fleetgate ships (``llm.pricing.source: litellm``) from a LiteLLM wheel.

    pip download litellm --no-deps -d /tmp/litellm
    python scripts/update_prices.py /tmp/litellm/litellm-*.whl

LiteLLM (MIT) keeps ``model_prices_and_context_window.json``, a map of model name to
per-token USD prices, and ships a copy in its wheel
(``litellm/model_prices_and_context_window_backup.json``). This script takes that copy, keeps
the entries and fields fleetgate prices with (the LiteLLM format itself, so a full upstream
file loads the same way), and records where it came from beside it
(``addons/fleetgate/llm/prices/litellm.meta.json`` and the licence). Review the diff (``git
diff --stat``) before committing: a price that drops out makes that model unpriced, which a
USD budget refuses.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "addons" / "fleetgate" / "llm" / "prices"
MEMBER = "litellm/model_prices_and_context_window_backup.json"
KEEP = ("input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost",
        "cache_creation_input_token_cost", "litellm_provider", "mode")


def trim(data: dict[str, object]) -> dict[str, dict[str, object]]:
    """The entries with a per-token input price, with only the fields fleetgate reads."""
    out: dict[str, dict[str, object]] = {}
    for name, entry in sorted(data.items()):
        if name == "sample_spec" or not isinstance(entry, dict):
            continue
        price = entry.get("input_cost_per_token")
        if isinstance(price, bool) or not isinstance(price, int | float):
            continue
        out[name] = {k: entry[k] for k in KEEP if entry.get(k) is not None}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel", help="a litellm wheel (pip download litellm --no-deps)")
    args = ap.parse_args()
    wheel = Path(args.wheel)
    m = re.match(r"litellm-([^-]+)-", wheel.name)
    if not m:
        print(f"update_prices: {wheel.name} is not a litellm wheel", file=sys.stderr)
        return 2
    with zipfile.ZipFile(wheel) as z:
        data = json.loads(z.read(MEMBER))
        licence = next((n for n in z.namelist() if n.endswith("licenses/LICENSE")), None)
        if licence is None:
            print("update_prices: the wheel has no licenses/LICENSE", file=sys.stderr)
            return 2
        (OUT / "litellm.LICENSE").write_bytes(z.read(licence))
    prices = trim(data)
    lines = ",\n".join(f"{json.dumps(k)}: {json.dumps(v, sort_keys=True)}"
                       for k, v in prices.items())
    (OUT / "litellm.json").write_text("{\n" + lines + "\n}\n", encoding="utf-8")
    meta = {"name": "litellm", "version": m.group(1), "file": MEMBER,
            "fetched": datetime.date.today().isoformat(), "license": "MIT",
            "entries": len(prices), "upstream_entries": len(data)}
    (OUT / "litellm.meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(prices)} of {len(data)} entries from litellm {m.group(1)} to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
