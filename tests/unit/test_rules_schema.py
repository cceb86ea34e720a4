"""The JSON Schema of the rules format: generated from the loader's own model
(fleetgate.policy.schema), committed, referenced by the examples, and in step with the
parsers (a key they accept is in the schema, and the other way round)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from schema_audit import SCHEMA_FILE, schema_errors

from fleetgate.cli import main
from fleetgate.llm.pricing import price_from_dict
from fleetgate.mcp.policy import compile_mcp_entry
from fleetgate.policy.loader import PolicyError, load_policy
from fleetgate.policy.schema import MODEL, Field, json_schema, keys, schema_text

RULES = SCHEMA_FILE.parent
EXAMPLES = sorted(p for p in RULES.glob("*.yaml") if p.stem != "kustomization")


def test_committed_schema_is_the_generated_one() -> None:
    assert SCHEMA_FILE.read_text() == schema_text(), (
        "rules/fleetgate-rules.schema.json is stale: run "
        "`fleetgate rules schema > rules/fleetgate-rules.schema.json`")


def test_rules_schema_command_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_references_the_schema_and_validates(path: Path) -> None:
    text = path.read_text()
    assert text.splitlines()[0] == "# yaml-language-server: $schema=fleetgate-rules.schema.json"
    for doc in yaml.safe_load_all(text):
        assert schema_errors(doc) == []


def test_examples_load() -> None:
    load_policy(RULES)  # and every document passed the schema audit (tests/conftest.py)


@pytest.mark.parametrize(("doc", "where"), [
    ({"apiVersion": "fleetgate/v1", "authorization": {"rules": [{"alow": "true"}]}},
     "authorization.rules.0"),
    ({"apiVersion": "fleetgate/v1", "agents": [{"name": "a", "egres": {}}]}, "agents.0"),
    ({"apiVersion": "fleetgate/v1", "authorization": {"rules": [{"allow": "true",
                                                                  "deny": "true"}]}},
     "authorization.rules.0"),
    ({"apiVersion": "fleetgate/v2"}, "apiVersion"),
    ({"apiVersion": "fleetgate/v1", "budgets": [{"period": "week", "usd": {"hard": 1}}]},
     "budgets.0.period"),
    ({"apiVersion": "fleetgate/v1", "mcp": {"servers": [{"name": "s", "hosts": ["a"],
                                                          "pins": "block"}]}},
     "mcp.servers.0.pins"),
])
def test_schema_refuses_what_the_loader_refuses(doc: dict[str, Any], where: str,
                                                tmp_path: Path) -> None:
    errors = schema_errors(doc)
    assert any(e.startswith(where) for e in errors), errors
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(PolicyError):
        load_policy(tmp_path / "r.yaml")


def test_loader_accepts_exactly_the_schemas_top_level_keys(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("apiVersion: fleetgate/v1\nbogus: 1\n")
    with pytest.raises(PolicyError) as exc:
        load_policy(tmp_path / "r.yaml")
    message = str(exc.value)
    for key in keys("Policy"):
        assert repr(key) in message  # the error lists the schema's keys, all of them


@pytest.mark.parametrize("name", sorted(MODEL))
def test_every_object_of_the_model_is_reachable_from_the_document(name: str) -> None:
    reachable: set[str] = set()

    def visit(f: Field | None) -> None:
        if f is None:
            return
        if f.ref and f.ref not in reachable:
            reachable.add(f.ref)
            for g in MODEL[f.ref].fields.values():
                visit(g)
        visit(f.items)
        visit(f.values)
        for alt in f.any_of:
            visit(alt)

    visit(Field("", ref="Policy"))
    assert name in reachable


def test_mcp_rule_keys_are_the_ones_compile_mcp_entry_takes() -> None:
    # compile_mcp_entry (fleetgate.mcp, below the policy layer) keeps its own check: it must
    # accept every key the schema declares for an MCP rule
    for key in keys("McpRule") - {"allow", "deny"}:
        value = {"id": "x", "reason": "r", "mode": "report"}.get(key, "x")
        compile_mcp_entry({"allow": "true", key: value}, "r")


def test_price_keys_are_the_ones_price_from_dict_takes() -> None:
    entry = dict.fromkeys(keys("Price"), 1.0)
    price_from_dict("m", entry)
    assert {k for k, f in MODEL["Price"].fields.items() if f.required} == {"input", "output"}
