"""Prices: validation, model-name resolution, cost arithmetic, the price list (LiteLLM's
format) under the rules' prices, and the shipped table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from fleetgate.llm.pricelist import bundled_version, parse_litellm, read_price_list
from fleetgate.llm.pricing import Price, PricingTable, price_from_dict
from fleetgate.llm.usage import Usage
from fleetgate.policy.loader import PolicyError, load_policy

RULES = Path(__file__).resolve().parents[2] / "rules"


# -- price_from_dict ---------------------------------------------------------------------------

def test_price_from_dict_full() -> None:
    assert price_from_dict("m", {"input": 3, "output": 15.0, "cacheRead": 0.3,
                                 "cacheWrite": 3.75}) == Price(3.0, 15.0, 0.3, 3.75)


def test_cache_prices_default_to_input() -> None:
    p = price_from_dict("m", {"input": 2.5, "output": 10})
    assert p == Price(2.5, 10.0, 2.5, 2.5)
    assert isinstance(p.input, float) and isinstance(p.output, float)
    assert price_from_dict("m", {"input": 1, "output": 2, "cacheRead": 0}) == Price(1, 2, 0, 1)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (None, "must be a mapping"),
        ([1, 2], "must be a mapping"),
        (3.0, "must be a mapping"),
        ({"input": 1}, "needs both 'input' and 'output'"),
        ({"output": 1}, "needs both 'input' and 'output'"),
        ({}, "needs both 'input' and 'output'"),
        ({"input": 1, "output": None}, "needs both 'input' and 'output'"),
        ({"input": -1, "output": 1}, "input must be a number >= 0"),
        ({"input": 1, "output": "15"}, "output must be a number >= 0"),
        ({"input": True, "output": 1}, "input must be a number >= 0"),
        ({"input": 1, "output": 1, "cacheRead": -0.1}, "cacheRead must be a number >= 0"),
        ({"input": 1, "output": 1, "cacheWrite": [1]}, "cacheWrite must be a number >= 0"),
        ({"input": 1, "output": 1, "cache_read": 0.1}, r"unknown key\(s\) \['cache_read'\]"),
        ({"input": 1, "output": 1, "currency": "EUR"}, "unknown key"),
    ],
)
def test_price_from_dict_rejects(entry: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        price_from_dict("gpt-x", entry)


# -- resolve ---------------------------------------------------------------------------------

TABLE = PricingTable(
    {
        "claude-sonnet-4-5": Price(3.0, 15.0, 0.3, 3.75),
        "claude-3-5-haiku": Price(0.8, 4.0, 0.08, 1.0),
        "gpt-4o": Price(2.5, 10.0, 1.25, 2.5),
        "gpt-4o-mini": Price(0.15, 0.6, 0.075, 0.15),
        "gpt-5": Price(1.25, 10.0, 0.125, 1.25),
        "o3": Price(2.0, 8.0, 0.5, 2.0),
        "gemini-2.5-pro": Price(1.25, 10.0, 0.31, 1.25),
        "Grok-4": Price(3.0, 15.0, 0.75, 3.0),
    },
    {"prod-gpt4o": "gpt-4o", "Claude-Opus-4-0": "claude-sonnet-4-5",
     "team-default": "prod-gpt4o", "loop-a": "loop-b", "loop-b": "loop-a"},
)


@pytest.mark.parametrize(
    ("model", "key"),
    [
        ("claude-sonnet-4-5", "claude-sonnet-4-5"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-sonnet-4-5@20250929", "claude-sonnet-4-5"),  # Vertex AI spelling
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),  # not gpt-4o
        ("gpt-5-2025-08-07", "gpt-5"),
        ("o3-2025-04-16", "o3"),
        ("models/gemini-2.5-pro", "gemini-2.5-pro"),
        ("models/gemini-2.5-pro-latest", "gemini-2.5-pro"),
        ("GPT-4o", "gpt-4o"),
        ("  gpt-4o  ", "gpt-4o"),
        ("grok-4", "grok-4"),  # table keys are case-insensitive too
        # aliases, including alias -> alias, and dated alias names
        ("prod-gpt4o", "gpt-4o"),
        ("PROD-GPT4O", "gpt-4o"),
        ("team-default", "gpt-4o"),
        ("claude-opus-4-0", "claude-sonnet-4-5"),
        ("prod-gpt4o-2024-08-06", "gpt-4o"),
    ],
)
def test_resolve(model: str, key: str) -> None:
    assert TABLE.resolve(model) == key


@pytest.mark.parametrize(
    "model",
    [None, "", "gpt-4", "o3-mini", "gpt-4o-audio-preview", "claude-sonnet-4", "gemini-2.5",
     "models/unknown", "mistral-large-2411", "loop-a", "gpt-4o/evil"],
)
def test_unknown_model_is_unpriced(model: str | None) -> None:
    assert TABLE.resolve(model) is None
    assert TABLE.cost(model, Usage(input=1000, output=1000)) is None  # never 0.0


def test_empty_table_prices_nothing() -> None:
    assert PricingTable().cost("gpt-4o", Usage(input=1, output=1)) is None


# -- cost arithmetic ---------------------------------------------------------------------------

def test_cost_openai_cached_input() -> None:
    # OpenAI: prompt_tokens 1000 of which 800 cached; 100 completion of which 60 reasoning
    u = Usage(input=1000, output=100, cache_read=800, reasoning=60)
    cost = TABLE.cost("gpt-4o-2024-08-06", u)
    assert cost == pytest.approx((200 * 2.5 + 800 * 1.25 + 100 * 10.0) / 1e6)
    assert cost == pytest.approx(0.0025)


def test_cost_anthropic_cache_read_and_write() -> None:
    # input_tokens 472 + cache_read 2048 + cache_creation 1000, output 312
    u = Usage(input=472 + 2048 + 1000, output=312, cache_read=2048, cache_write=1000)
    cost = TABLE.cost("claude-sonnet-4-5-20250929", u)
    assert cost == pytest.approx((472 * 3.0 + 2048 * 0.3 + 1000 * 3.75 + 312 * 15.0) / 1e6)
    assert cost == pytest.approx(0.0104604)


def test_cost_reasoning_is_not_billed_twice() -> None:
    p = Price(1.0, 10.0, 0.1, 1.25)
    assert p.cost(Usage(output=500, reasoning=400)) == pytest.approx(500 * 10.0 / 1e6)


def test_cost_never_negative_on_inconsistent_usage() -> None:
    p = Price(1.0, 10.0, 0.1, 1.25)
    assert p.cost(Usage(input=10, cache_read=50)) == pytest.approx(50 * 0.1 / 1e6)


def test_cost_zero_usage_is_zero_not_none() -> None:
    assert TABLE.cost("gpt-4o", Usage()) == 0.0


# -- the shipped table ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped() -> PricingTable:
    return load_policy(RULES).pricing


@pytest.mark.parametrize(
    ("model", "key", "price", "origin"),
    [
        # from the shipped price list (LiteLLM's snapshot): dated names have their own entry
        ("claude-sonnet-4-5", "claude-sonnet-4-5", Price(3.0, 15.0, 0.3, 3.75), "litellm"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5-20250929",
         Price(3.0, 15.0, 0.3, 3.75), "litellm"),
        ("gpt-4o-2024-08-06", "gpt-4o-2024-08-06", Price(2.5, 10.0, 1.25, 2.5), "litellm"),
        ("gpt-5", "gpt-5", Price(1.25, 10.0, 0.125, 1.25), "litellm"),
        ("gpt-4o-mini", "gpt-4o-mini", Price(0.15, 0.6, 0.075, 0.15), "litellm"),
        ("models/gemini-2.5-pro", "gemini-2.5-pro", Price(1.25, 10.0, 0.125, 1.25), "litellm"),
        ("text-embedding-3-small", "text-embedding-3-small", Price(0.02, 0.0, 0.02, 0.02),
         "litellm"),
        # a model newer than the old hand-kept table: priced now, not refused under a budget
        ("claude-opus-4-6", "claude-opus-4-6", Price(5.0, 25.0, 0.5, 6.25), "litellm"),
        ("grok-4.3", "grok-4.3", Price(1.25, 2.5, 0.2, 1.25), "litellm"),  # xai/grok-4.3
        # from rules/pricing.yaml: what the list lacks, with its aliases and dated names
        ("claude-opus-4-0", "claude-opus-4", Price(15.0, 75.0, 1.5, 18.75), "rules"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1", Price(15.0, 75.0, 1.5, 18.75), "rules"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku", Price(0.8, 4.0, 0.08, 1.0), "rules"),
        ("grok-4-0709", "grok-4", Price(3.0, 15.0, 0.75, 3.0), "rules"),
    ],
)
def test_shipped_prices(shipped: PricingTable, model: str, key: str, price: Price,
                        origin: str) -> None:
    assert shipped.resolve(model) == key
    found = shipped.price(model)
    assert found is not None and found[:2] == (key, price)
    assert found[2].startswith(origin)


def test_shipped_table_leaves_unknown_models_unpriced(shipped: PricingTable) -> None:
    assert shipped.cost("llama-3.1-70b-instruct", Usage(input=10, output=10)) is None


def _operator_dir(tmp_path: Path, text: str, name: str = "zz-operator-pricing.yaml") -> Path:
    for f in RULES.glob("*.yaml"):
        shutil.copy(f, tmp_path / f.name)
    for f in RULES.glob("*.md"):  # fleet.yaml refers to its KILLSWITCH.md
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / name).write_text(text)
    return tmp_path


def test_operator_file_reprices_a_model(tmp_path: Path) -> None:
    rules = _operator_dir(tmp_path, """\
apiVersion: fleetgate/v1
kind: Policy
metadata: {name: contract-prices}
llm:
  pricing:
    overrides:
      claude-sonnet-4-5: {input: 2.4, output: 12.0}
    models:
      llama-3.1-70b: {input: 0.5, output: 0.5}
    aliases:
      vllm-llama: llama-3.1-70b
""")
    table = load_policy(rules).pricing
    assert table.prices["claude-sonnet-4-5"] == Price(2.4, 12.0, 2.4, 2.4)
    u = Usage(input=1_000_000, output=1_000_000)
    # the override covers the family, although the list has the dated name itself
    assert table.cost("claude-sonnet-4-5-20250929", u) == pytest.approx(14.4)
    assert table.cost("vllm-llama", u) == pytest.approx(1.0)
    # untouched entries keep their shipped price
    assert table.price("gpt-4o") == ("gpt-4o", Price(2.5, 10.0, 1.25, 2.5), bundled_version())


def test_pricing_a_model_twice_in_models_is_an_error(tmp_path: Path) -> None:
    rules = _operator_dir(tmp_path, """\
apiVersion: fleetgate/v1
kind: Policy
llm:
  pricing:
    models:
      claude-opus-4: {input: 1.0, output: 1.0}
""")
    with pytest.raises(PolicyError, match="priced twice"):
        load_policy(rules)


def test_alias_to_unpriced_model_is_policy_error(tmp_path: Path) -> None:
    rules = _operator_dir(tmp_path, """\
apiVersion: fleetgate/v1
kind: Policy
llm:
  pricing:
    aliases:
      prod-chat: gpt-9-ultra
""")
    with pytest.raises(PolicyError) as exc:
        load_policy(rules)
    assert [p.path for p in exc.value.problems] == ["llm.pricing.aliases.prod-chat"]
    assert "gpt-9-ultra" in str(exc.value)


def test_alias_cycle_is_policy_error(tmp_path: Path) -> None:
    """An alias loop prices nothing, just like an alias to an unpriced model."""
    rules = _operator_dir(tmp_path, """\
apiVersion: fleetgate/v1
kind: Policy
llm:
  pricing:
    aliases:
      chat-a: chat-b
      chat-b: chat-a
""")
    with pytest.raises(PolicyError):
        load_policy(rules)


def test_alias_to_dated_name_of_a_priced_model_loads(tmp_path: Path) -> None:
    """An Azure deployment pinned to a model version is the natural alias target; the table
    prices ``gpt-4o-2024-08-06`` (via its family), so the loader must not call it unpriced."""
    rules = _operator_dir(tmp_path, """\
apiVersion: fleetgate/v1
kind: Policy
llm:
  pricing:
    aliases:
      prod-gpt4o: gpt-4o-2024-08-06
""")
    assert load_policy(rules).pricing.resolve("prod-gpt4o") == "gpt-4o-2024-08-06"
    assert load_policy(rules).pricing.cost("prod-gpt4o", Usage(output=1_000_000)) == 10.0


def test_invalid_price_in_rules_is_policy_error(tmp_path: Path) -> None:
    rules = _operator_dir(tmp_path, """\
apiVersion: fleetgate/v1
kind: Policy
llm:
  pricing:
    models:
      gpt-4o: {input: -1, output: 10}
""")
    with pytest.raises(PolicyError) as exc:
        load_policy(rules)
    assert [p.path for p in exc.value.problems] == ["llm.pricing.models.gpt-4o"]


# -- the price list (llm.pricing.source) -----------------------------------------------------------

LIST = {
    "sample_spec": {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0},
    "gpt-9": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05,
              "cache_read_input_token_cost": 1.25e-06, "litellm_provider": "openai"},
    "claude-x-1": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
                   "cache_read_input_token_cost": 3e-07,
                   "cache_creation_input_token_cost": 3.75e-06},
    "xai/grok-9": {"input_cost_per_token": 2e-06, "output_cost_per_token": 6e-06},
    "gemini/gemini-9": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06},
    "gemini-9": {"input_cost_per_token": 1.5e-06, "output_cost_per_token": 3e-06},
    "azure/gpt-9": {"input_cost_per_token": 9e-06, "output_cost_per_token": 9e-06},
    "dall-e-9": {"input_cost_per_image": 0.04, "mode": "image_generation"},
    "no-output": {"input_cost_per_token": 1e-06},
    "negative": {"input_cost_per_token": -1e-06, "output_cost_per_token": 1e-06},
    "text-price": {"input_cost_per_token": "1e-06", "output_cost_per_token": 1e-06},
    "bool-price": {"input_cost_per_token": True, "output_cost_per_token": 1e-06},
    "bad-cache": {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06,
                  "cache_read_input_token_cost": "cheap"},
    "not-a-mapping": 3,
}


def test_price_list_reads_litellm_format_in_usd_per_million() -> None:
    listed = parse_litellm(json.dumps(LIST), "test")
    # decimal scaling: 2.5e-06 per token is exactly 2.5 per million, not 2.4999999999999996
    assert listed.prices["gpt-9"] == Price(2.5, 10.0, 1.25, 2.5)
    assert listed.prices["claude-x-1"] == Price(3.0, 15.0, 0.3, 3.75)
    assert listed.prices["azure/gpt-9"] == Price(9.0, 9.0, 9.0, 9.0)


def test_price_list_skips_what_it_cannot_price_never_as_free() -> None:
    listed = parse_litellm(json.dumps(LIST), "test")
    for name in ("dall-e-9", "no-output", "negative", "text-price", "bool-price", "bad-cache",
                 "not-a-mapping", "sample_spec"):
        assert name not in listed.prices
    assert listed.skipped == 7  # every entry but sample_spec (documentation) is counted


def test_first_party_prefixed_names_are_listed_bare_unless_a_bare_entry_exists() -> None:
    listed = parse_litellm(json.dumps(LIST), "test")
    assert listed.prices["grok-9"] == Price(2.0, 6.0, 2.0, 2.0)  # api.x.ai says "grok-9"
    assert listed.prices["gemini-9"] == Price(1.5, 3.0, 1.5, 1.5)  # the bare entry wins
    assert "gpt-9" in listed.prices and listed.prices["gpt-9"].input == 2.5  # azure/ is no alias


@pytest.mark.parametrize("text", ["", "[1, 2]", "{not json", "null"])
def test_price_list_that_is_no_json_object_is_an_error(text: str) -> None:
    with pytest.raises(ValueError, match="test"):
        parse_litellm(text, "test")


def test_rules_prices_win_over_the_list_for_the_whole_family() -> None:
    listed = {"gpt-9": Price(2.5, 10.0, 1.25, 2.5), "gpt-9-2030-01-01": Price(3, 12, 3, 3),
              "only-listed": Price(1, 1, 1, 1)}
    table = PricingTable({"gpt-9": Price(1, 2, 1, 1)}, {"prod": "only-listed"}, listed, "L")
    assert table.price("gpt-9-2030-01-01") == ("gpt-9", Price(1, 2, 1, 1), "rules")
    assert table.price("prod") == ("only-listed", Price(1, 1, 1, 1), "L")
    assert table.price("nothing") is None
    assert PricingTable(None, None, listed).price("gpt-9-2030-01-01") == (
        "gpt-9-2030-01-01", Price(3, 12, 3, 3), "price list")


def test_bundled_list_is_litellms_snapshot_with_its_provenance() -> None:
    listed = read_price_list("litellm", Path("/nonexistent"))
    assert listed.name.startswith("litellm 1.") and "fetched" in listed.name
    assert len(listed.prices) > 1000 and listed.digest
    meta = json.loads((Path(__file__).resolve().parents[2] / "addons" / "fleetgate" / "llm"
                       / "prices" / "litellm.meta.json").read_text())
    assert meta["license"] == "MIT" and meta["version"] in listed.name


def _pricing_file(tmp_path: Path, pricing: str, name: str = "pricing.yaml") -> Path:
    (tmp_path / name).write_text("apiVersion: fleetgate/v1\nkind: Policy\nllm:\n  pricing:\n"
                                 + "".join(f"    {line}\n" for line in pricing.splitlines()))
    return tmp_path


def test_source_path_is_relative_to_the_rules_file(tmp_path: Path) -> None:
    (tmp_path / "prices").mkdir()
    (tmp_path / "prices" / "contract.json").write_text(json.dumps(LIST))
    rules = _pricing_file(tmp_path, "source: prices/contract.json\n"
                          "overrides:\n  gpt-9: {input: 1, output: 1}")
    table = load_policy(rules).pricing
    assert table.price("claude-x-1") == ("claude-x-1", Price(3.0, 15.0, 0.3, 3.75),
                                         str(tmp_path / "prices" / "contract.json"))
    assert table.price("gpt-9") == ("gpt-9", Price(1, 1, 1, 1), "rules")


def test_a_changed_price_list_changes_the_revision(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text(json.dumps(LIST))
    rules = _pricing_file(tmp_path, "source: list.json")
    before = load_policy(rules).revision
    (tmp_path / "list.json").write_text(json.dumps({**LIST, "new": LIST["gpt-9"]}))
    after = load_policy(rules)
    assert after.revision != before and after.pricing.resolve("new") == "new"


def test_without_source_no_list_prices(tmp_path: Path) -> None:
    rules = _pricing_file(tmp_path, "models:\n  m: {input: 1, output: 1}")
    assert load_policy(rules).pricing.cost("gpt-4o", Usage(input=1, output=1)) is None


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("missing.json", "cannot read the price list 'missing.json'"),
        ("''", "source must be 'litellm'"),
        ("[a, b]", "source must be 'litellm'"),
        ("bad.json", "not JSON"),
    ],
)
def test_unusable_source_rejects_the_rules(tmp_path: Path, source: str, message: str) -> None:
    (tmp_path / "bad.json").write_text("{oops")
    rules = _pricing_file(tmp_path, f"source: {source}")
    with pytest.raises(PolicyError, match=message) as exc:
        load_policy(rules)
    assert [(p.path, p.line) for p in exc.value.problems] == [("llm.pricing.source", 5)]


def test_source_named_twice_is_an_error(tmp_path: Path) -> None:
    _pricing_file(tmp_path, "source: litellm", "a.yaml")
    _pricing_file(tmp_path, "source: litellm", "b.yaml")
    with pytest.raises(PolicyError, match=r"already set at .*a.yaml:5"):
        load_policy(tmp_path)


def test_alias_may_lead_to_a_listed_model(tmp_path: Path) -> None:
    rules = _pricing_file(tmp_path, "source: litellm\naliases:\n  prod-opus: claude-opus-4-6")
    assert load_policy(rules).pricing.resolve("prod-opus") == "claude-opus-4-6"
