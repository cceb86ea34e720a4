"""Bounded rule cost: the static bound at compile time, the timed trial, the runtime guard."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from fleetgate import celcost, celexpr
from fleetgate.celexpr import CelError, TooSlow, compile_expr
from fleetgate.normalize import request_facts
from fleetgate.policy.decide import decide
from fleetgate.policy.loader import PolicyError, load_policy
from fleetgate.policy.parse_rules import REQUEST_ROOTS

REPO = Path(__file__).resolve().parents[2]


def lst(n: int) -> str:
    return "[" + ", ".join(str(i) for i in range(n)) + "]"


def nested(levels: int, n: int = 20) -> str:
    """``levels`` comprehensions over ``n``-element literal lists, nested."""
    body = "true"
    for i in reversed(range(levels)):
        body = f"{lst(n)}.{'exists' if i == levels - 1 else 'all'}(v{i}, {body})"
    return body


# -- the static bound ------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "steps", "nesting"), [
    # the list (1 + 3 items), then 3 x (1 + the body: x, 0 and >)
    ("[1, 2, 3].all(x, x > 0)", 3 + 1 + 3 * (1 + 3), 1),
    # a list from the token counts as UNKNOWN_SIZE
    ('jwt.groups.exists(g, g == "b")', 2 + celcost.UNKNOWN_SIZE * (1 + 3), 1),
    # map/filter keep their range's size; concatenation adds
    ("[1, 2].map(x, x).all(y, true)", (3 + 2 * 2) + 2 * 2, 1),
    ("([1] + [2, 3]).all(y, true)", (1 + 2 + 3) + 3 * 2, 1),
])
def test_bound_counts_nodes_and_multiplies_comprehensions(source: str, steps: int,
                                                          nesting: int) -> None:
    cost = celcost.analyse(source)
    assert cost == celcost.Cost(steps, nesting)


def test_bound_grows_with_nesting_as_the_product_of_sizes() -> None:
    two, three = celcost.analyse(nested(2)), celcost.analyse(nested(3))
    assert two.nesting == 2 and three.nesting == 3
    assert three.steps > 19 * two.steps  # 20x the work, not 20 more steps


@pytest.mark.parametrize("source", [
    "b'abc' + r\"x\" == '''t'''", "-1.5e3 < 0x1Fu", ".jwt.sub == 'a'", "x ? [1, 2] : [3]",
    "[?x, 1]", "m[?'k'].orValue(1)", "a.?b", "{?'a': x}", "google.protobuf.Int64Value{value: 1}",
    "!!(a in {'k': 1}) || -a.b[0] % 2 == 1 && size(a) >= 2",
    "has(jwt.team) // a comment\n && jwt.team == \"x\"",
])
def test_the_grammar_the_engine_accepts_is_analysed(source: str) -> None:
    # inside a comprehension, so the parser (not the text-length bound) answers
    cost = celcost.analyse(f"[1, 2].all(z, {source})")
    assert cost.nesting == 1 and cost.steps > 2 * 2


def test_without_a_comprehension_the_text_bounds_the_cost() -> None:
    assert celcost.analyse("true") == celcost.Cost(4, 0)
    source = 'jwt.sub in jwt.allowed && request.method == "GET"'
    assert celcost.analyse(source) == celcost.Cost(len(source) + celcost.UNKNOWN_SIZE, 0)
    with pytest.raises(CelError, match="exceeds the limit"):  # 2,000 linear searches
        compile_expr(" || ".join(["jwt.sub in jwt.allowed"] * 2000), ("jwt",))


def test_five_level_nested_comprehension_is_refused_at_compile() -> None:
    with pytest.raises(CelError, match=r"comprehensions nest 5 deep \(at most 3\)"):
        compile_expr(nested(5), REQUEST_ROOTS)


def test_a_wide_shallow_comprehension_is_refused_by_its_cost() -> None:
    source = f"{lst(400)}.all(a, {lst(400)}.exists(b, a == b))"  # 160,000 iterations
    with pytest.raises(CelError, match=r"worst-case cost [\d,]+ steps exceeds the limit of 100,000"):
        compile_expr(source, REQUEST_ROOTS)


def test_nested_comprehensions_over_request_data_count_at_the_documented_size() -> None:
    two = 'jwt.a.exists(x, jwt.b.exists(y, x == y))'
    assert compile_expr(two, ("jwt",)).source == two  # 100 x 100: accepted
    three = 'jwt.a.exists(x, jwt.b.exists(y, jwt.c.exists(z, x == y && y == z)))'
    with pytest.raises(CelError, match="exceeds the limit"):
        compile_expr(three, ("jwt",))


def test_nested_comprehension_in_a_rules_file_is_refused_with_file_and_line(
        tmp_path: Path) -> None:
    rules = tmp_path / "r.yaml"
    rules.write_text(textwrap.dedent(f"""\
        apiVersion: fleetgate/v1
        authorization:
          rules:
          - id: fine
            allow: 'jwt.sub == "a"'
          - id: frozen
            deny: '{nested(5)}'
        agents:
        - name: w
          match: 'true'
          egress: {{hosts: ["*"]}}
        """))
    with pytest.raises(PolicyError) as info:
        load_policy(rules)
    [problem] = info.value.problems
    assert problem.file == str(rules)
    assert problem.line == 7
    assert problem.path == "authorization.rules[1].deny"
    assert "comprehensions nest 5 deep" in problem.message
    assert f"{rules}:7 at authorization.rules[1].deny" in str(info.value)


@pytest.mark.parametrize("section", [
    "agents:\n- name: w\n  match: '{expr}'\n  egress: {{hosts: ['*']}}\n",
    "policies:\n  localRateLimit:\n  - maxTokens: 5\n    tokensPerFill: 1\n    fillInterval: 1s\n"
    "    key: 'string({expr})'\n",
])
def test_every_compiled_expression_is_bounded(tmp_path: Path, section: str) -> None:
    rules = tmp_path / "r.yaml"
    rules.write_text("apiVersion: fleetgate/v1\n" + section.format(expr=nested(4)))
    with pytest.raises(PolicyError, match="comprehensions nest 4 deep"):
        load_policy(rules)


def test_the_example_rules_load_and_stay_well_under_the_bound() -> None:
    policy = load_policy(REPO / "rules")
    sources = [r.expr.source for r in policy.rules]
    for a in policy.agents:
        sources += [a.match.source, *(r.expr.source for r in a.rules)]
    assert sources
    assert max(celcost.analyse(s).steps for s in sources) < celcost.MAX_COST // 10


# -- the timed trial -----------------------------------------------------------------------------


def test_trial_refuses_an_expression_slower_than_its_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    slow = nested(3)  # statically fine (~25,000 steps), a few ms to evaluate
    assert compile_expr(slow, REQUEST_ROOTS)
    monkeypatch.setattr(celcost, "TRIAL_BUDGET", 0.0005)
    with pytest.raises(CelError, match=r"a trial evaluation against synthetic facts took \d+ ms"):
        compile_expr(slow, REQUEST_ROOTS)
    assert compile_expr('jwt.sub == "a"', REQUEST_ROOTS)  # microseconds: accepted


# -- the runtime guard ---------------------------------------------------------------------------

CLAIMS: dict[str, Any] = {"sub": "a", "agent_role": "w"}
DATA: dict[str, Any] = {"jwt": CLAIMS, "request": {}, "llm": {"is_llm": False}}


def test_an_evaluation_over_the_runtime_budget_raises_and_is_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    slow = compile_expr(nested(3), REQUEST_ROOTS)
    fast = compile_expr('jwt.sub == "a"', REQUEST_ROOTS)
    assert slow.evaluate(DATA) is True
    before = celexpr.over_budget_count()
    monkeypatch.setattr(celcost, "RUNTIME_BUDGET", 0.0005)
    with pytest.raises(TooSlow, match=r"evaluation took \d+ ms, over the 0.5 ms budget"):
        slow.evaluate(DATA)
    assert celexpr.over_budget_count() == before + 1
    assert fast.evaluate(DATA) is True
    assert celexpr.over_budget_count() == before + 1


def test_a_slow_rule_denies_the_request_naming_the_rule(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rules = tmp_path / "r.yaml"
    rules.write_text(textwrap.dedent(f"""\
        apiVersion: fleetgate/v1
        agents:
        - name: w
          match: 'jwt.agent_role == "w"'
          egress: {{hosts: ["*"]}}
          authorization:
            rules:
            - id: slow-allow
              allow: '{nested(3)}'
        """))
    policy = load_policy(rules)
    facts = request_facts("GET", "https", "api.example.com", 443, "/", [])
    assert decide(policy, CLAIMS, facts).allow
    monkeypatch.setattr(celcost, "RUNTIME_BUDGET", 0.0005)
    decision = decide(policy, CLAIMS, facts)
    assert not decision.allow
    assert "slow-allow: evaluation took" in decision.reason
