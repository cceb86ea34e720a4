"""Which policies need the pre-flight input estimate (``Policy.needs_input_estimate``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetgate.policy.loader import load_policy

BASE = """apiVersion: fleetgate/v1
kind: Policy
agents:
- name: worker
  match: 'jwt.agent_role == "worker"'
  egress:
    hosts: [api.openai.com]
"""


def _needs(tmp_path: Path, extra: str, profile: str = "") -> bool:
    (tmp_path / "rules.yaml").write_text(BASE + profile + extra)
    return load_policy(tmp_path).needs_input_estimate


def test_policy_with_no_consumer_needs_no_estimate(tmp_path: Path) -> None:
    extra = ("authorization:\n  rules:\n  - deny: 'llm.model == \"gpt-5\"'\n"
             "policies:\n  localRateLimit:\n  - {maxTokens: 5, tokensPerFill: 5, "
             "fillInterval: 1m, type: requests}\n")
    assert _needs(tmp_path, extra) is False


@pytest.mark.parametrize(("extra", "profile"), [
    pytest.param("authorization:\n  rules:\n  - deny: 'llm.estimated_input_tokens > 9000'\n",
                 "", id="rule-reads-estimate"),
    pytest.param("", "  authorization:\n    rules:\n    - deny: 'llm.estimated_input_tokens > 9000'\n",
                 id="profile-rule-reads-estimate"),
    pytest.param("policies:\n  localRateLimit:\n  - {maxTokens: 5, tokensPerFill: 5, "
                 "fillInterval: 1m, type: requests, "
                 "when: 'llm.estimated_input_tokens > 10'}\n", "", id="limit-when-reads-it"),
    pytest.param("policies:\n  localRateLimit:\n  - {maxTokens: 50000, tokensPerFill: 50000, "
                 "fillInterval: 1m, type: tokens}\n", "", id="tokens-limit"),
    pytest.param("", "  policies:\n    localRateLimit:\n    - {maxTokens: 50000, "
                 "tokensPerFill: 50000, fillInterval: 1m, type: tokens}\n",
                 id="profile-tokens-limit"),
    pytest.param("budgets:\n- {id: fleet.usd, per: fleet, period: month, usd: {hard: 20}}\n",
                 "", id="budget"),
    pytest.param("", "  budgets:\n  - {id: worker.usd, per: agent, period: day, "
                 "tokens: {hard: 100000}}\n", id="profile-budget"),
])
def test_each_consumer_makes_the_policy_need_the_estimate(tmp_path: Path, extra: str,
                                                          profile: str) -> None:
    assert _needs(tmp_path, extra, profile) is True


def test_example_fleet_rules_need_the_estimate() -> None:
    # rules/fleet.yaml has budgets and token limits: they reserve estimated input
    assert load_policy(Path(__file__).parents[2] / "rules").needs_input_estimate is True
