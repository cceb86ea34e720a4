"""Prices: validation, model-name resolution, cost arithmetic, and the shipped table."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

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
    ("model", "key", "price"),
    [
        ("claude-sonnet-4-5", "claude-sonnet-4-5", Price(3.0, 15.0, 0.3, 3.75)),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5", Price(3.0, 15.0, 0.3, 3.75)),
        ("claude-opus-4-0", "claude-opus-4", Price(15.0, 75.0, 1.5, 18.75)),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku", Price(0.8, 4.0, 0.08, 1.0)),
        ("gpt-4o-2024-08-06", "gpt-4o", Price(2.5, 10.0, 1.25, 2.5)),
        ("gpt-5", "gpt-5", Price(1.25, 10.0, 0.125, 1.25)),
        ("gpt-4o-mini", "gpt-4o-mini", Price(0.15, 0.6, 0.075, 0.15)),
        ("models/gemini-2.5-pro", "gemini-2.5-pro", Price(1.25, 10.0, 0.31, 1.25)),
        ("grok-4-0709", "grok-4", Price(3.0, 15.0, 0.75, 3.0)),
        ("text-embedding-3-small", "text-embedding-3-small", Price(0.02, 0.0, 0.02, 0.02)),
    ],
)
def test_shipped_prices(shipped: PricingTable, model: str, key: str, price: Price) -> None:
    assert shipped.resolve(model) == key
    assert shipped.prices[key] == price


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
    assert table.cost("claude-sonnet-4-5-20250929", u) == pytest.approx(14.4)
    assert table.cost("vllm-llama", u) == pytest.approx(1.0)
    # untouched entries keep their shipped price
    assert table.prices["gpt-4o"] == Price(2.5, 10.0, 1.25, 2.5)


def test_pricing_a_model_twice_in_models_is_an_error(tmp_path: Path) -> None:
    rules = _operator_dir(tmp_path, """\
apiVersion: fleetgate/v1
kind: Policy
llm:
  pricing:
    models:
      gpt-4o: {input: 1.0, output: 1.0}
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
    assert load_policy(rules).pricing.resolve("prod-gpt4o") == "gpt-4o"


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
