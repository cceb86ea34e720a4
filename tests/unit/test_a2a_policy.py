"""The ``a2a`` rules section and ``a2a.*`` in authorization rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleetgate.a2a.facts import message_facts
from fleetgate.a2a.messages import parse_request
from fleetgate.normalize import request_facts
from fleetgate.policy.decide import decide
from fleetgate.policy.loader import PolicyError, load_policy

RULES = """apiVersion: fleetgate/v1
a2a:
  maxDepth: 3
  agents:
  - {name: ceo, url: "https://ceo.agents.test:8443/a2a"}
  - {name: marketing, url: "https://marketing.agents.test/"}
authorization:
  rules:
  - id: a2a.marketing-not-ceo
    deny: 'a2a.is_a2a && a2a.sender == "marketing" && a2a.target == "ceo"'
    reason: marketing reports to its department head, not the CEO
agents:
- name: all
  match: 'true'
  egress: {hosts: ["*.agents.test:8443", "*.agents.test", "api.example.com"]}
  authorization:
    rules:
    - allow: 'true'
"""


def load(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return load_policy(path)


def test_agents_and_max_depth_load(tmp_path: Path) -> None:
    policy = load(tmp_path, RULES)
    assert policy.a2a.max_depth == 3
    ceo = policy.a2a.agent_for("ceo.agents.test", 8443, "/a2a")
    assert ceo is not None and ceo.name == "ceo"
    assert policy.a2a.agent_for("ceo.agents.test", 8443, "/.well-known/agent-card.json") is ceo
    assert policy.a2a.agent_for("ceo.agents.test", 8443, "/a2ax") is None
    assert policy.a2a.agent_for("ceo.agents.test", 443, "/a2a") is None
    assert policy.a2a.agent_for("ceo.agents.test.evil.com", 8443, "/a2a") is None
    assert policy.a2a.agent_for("marketing.agents.test", 443, "/anything") is not None
    assert load(tmp_path, "apiVersion: fleetgate/v1\n").a2a.max_depth == 5


@pytest.mark.parametrize(("section", "message"), [
    ("a2a: {agents: [{name: x, url: 'https://x.test', colour: red}]}", "unknown key 'colour'"),
    ("a2a: {depth: 3}", "unknown key 'depth'"),
    ("a2a: {maxDepth: -1}", "maxDepth must be an integer"),
    ("a2a: {maxDepth: true}", "maxDepth must be an integer"),
    ("a2a: {agents: [{name: x, url: 'ftp://x.test'}]}", "http(s) URL"),
    ("a2a: {agents: [{name: x, url: 'https://x.test/?a=1'}]}", "query"),
    ("a2a: {agents: [{url: 'https://x.test'}]}", "needs a 'name'"),
    ("a2a: {agents: [{name: x, url: 'https://x.test'}, {name: x, url: 'https://y.test'}]}",
     "duplicate A2A agent name"),
    ("a2a: [x]", "a2a must be a mapping"),
])
def test_bad_sections_are_refused_with_their_line(tmp_path: Path, section: str,
                                                  message: str) -> None:
    with pytest.raises(PolicyError) as exc:
        load(tmp_path, f"apiVersion: fleetgate/v1\n{section}\n")
    assert message in str(exc.value) and "rules.yaml:2" in str(exc.value)


def test_max_depth_set_twice_differently_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("apiVersion: fleetgate/v1\na2a: {maxDepth: 3}\n")
    (tmp_path / "b.yaml").write_text("apiVersion: fleetgate/v1\na2a: {maxDepth: 4}\n")
    with pytest.raises(PolicyError, match="set differently"):
        load_policy(tmp_path)


def judge(policy: Any, sender: str, target: str | None, host: str = "ceo.agents.test") -> Any:
    facts = request_facts("POST", "https", host, 8443, "/a2a", [])
    a2a = None
    if target is not None:
        msg = parse_request({"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {
            "message": {"messageId": "m", "role": "ROLE_USER", "parts": [{"text": "x"}]}}})
        a2a = message_facts(msg, target=target, sender=sender, counted=1)
    return decide(policy, {"sub": sender, "agent_role": sender}, facts, None, a2a)


def test_cel_decides_who_may_message_whom(tmp_path: Path) -> None:
    policy = load(tmp_path, RULES)
    denied = judge(policy, "marketing", "ceo")
    assert not denied.allow and denied.rule == "a2a.marketing-not-ceo"
    assert "department head" in denied.reason
    assert judge(policy, "cto", "ceo").allow
    # not A2A: every a2a field is there and empty, the rule neither errors nor matches
    assert judge(policy, "marketing", None, host="api.example.com").allow
