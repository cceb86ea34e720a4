"""The policy converts for CEL only the request parts some rule reads, and that never
changes a decision."""

from __future__ import annotations

from pathlib import Path

from fleetgate.normalize import request_facts
from fleetgate.policy.decide import decide
from fleetgate.policy.loader import load_policy

BASE = """apiVersion: fleetgate/v1
agents:
- name: a
  match: 'jwt.agent_role == "a"'
  egress: {hosts: [api.example.com]}
  authorization:
    rules:
    - allow: 'request.method == "GET"'
"""


def test_unread_parts_are_left_out(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(BASE)
    assert load_policy(f).cel_inputs == frozenset()


def test_read_parts_are_kept_and_rules_on_them_still_work(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(BASE + """    - deny: '"x-danger" in request.headers && request.headers["x-danger"] == "1"'
    - deny: 'llm.is_llm && llm.model == "forbidden"'
""")
    policy = load_policy(f)
    assert policy.cel_inputs == frozenset({"headers", "llm"})
    claims = {"sub": "x", "agent_role": "a"}
    bad = request_facts("GET", "https", "api.example.com", 443, "/", [("X-Danger", "1")])
    ok = request_facts("GET", "https", "api.example.com", 443, "/", [("X-Other", "1")])
    assert decide(policy, claims, bad).rule == "a.authorization[1]"
    assert decide(policy, claims, ok).allow
    assert not decide(policy, claims, ok, {"is_llm": True, "model": "forbidden"}).allow


def test_roles_and_sessions_can_be_revoked(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(BASE + "revoked:\n  roles: [a]\n  sessions: [s-9]\n")
    policy = load_policy(f)
    facts = request_facts("GET", "https", "api.example.com", 443, "/", [])
    d = decide(policy, {"sub": "x", "agent_role": "a"}, facts)
    assert (d.allow, d.rule) == (False, "revoked") and "role 'a'" in d.reason
    f.write_text(BASE + "revoked:\n  sessions: [s-9]\n")
    policy = load_policy(f)
    assert decide(policy, {"sub": "x", "agent_role": "a"}, facts).allow
    d = decide(policy, {"sub": "x", "agent_role": "a", "session_id": "s-9"}, facts)
    assert (d.allow, d.rule) == (False, "revoked") and "session 's-9'" in d.reason
    d = decide(policy, {"sub": "x", "agent_role": "a", "sid": "s-9"}, facts)
    assert not d.allow
