"""Profile ``match``: a missing claim does not select; other errors deny; ``rules check``
warns about claim reads without ``has()``."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetgate.celexpr import CelError, MissingField, compile_expr, has_unguarded_access
from fleetgate.cli import main

ROOTS = ("jwt", "request")


@pytest.mark.parametrize("source", [
    'jwt.agent_role == "x"', 'jwt["agent_role"] == "x"', 'jwt.org.team == "x"',
    '!(jwt.agent_role == "x")', 'request.headers["x-team"] == "x"',
])
def test_a_missing_key_is_a_missing_field(source: str) -> None:
    with pytest.raises(MissingField):
        compile_expr(source, ROOTS).evaluate({"jwt": {"sub": "a", "org": {}},
                                              "request": {"headers": {}}})


@pytest.mark.parametrize("source", [
    "int(jwt.sub) > 1", "jwt.sub + 1 == 2", "jwt.groups[3] == 1", "jwt.sub.x == 1", "jwt.sub",
])
def test_other_errors_are_not_missing_fields(source: str) -> None:
    with pytest.raises(CelError) as info:
        compile_expr(source, ROOTS).evaluate({"jwt": {"sub": "a", "groups": [1]},
                                              "request": {}})
    assert not isinstance(info.value, MissingField)


@pytest.mark.parametrize(("source", "unguarded"), [
    ('jwt.agent_role == "x"', ["agent_role"]),
    ('jwt["agent_role"] == "x"', ["agent_role"]),
    ('has(jwt.agent_role) && jwt.agent_role == "x"', []),
    ('"team" in jwt && jwt["team"] != "x"', []),
    ('has(jwt.user) && jwt.agent_role == "x" && jwt.user != ""', ["agent_role"]),
    ('jwt.sub == "jwt.other"', ["sub"]),  # text inside a string literal is not a read
    ('has(jwt.org) && jwt.org.team == "x"', []),
    ("true", []),
    ('jwt.groups.exists(g, g == "x")', ["groups"]),
])
def test_unguarded_claim_reads(source: str, unguarded: list[str]) -> None:
    assert has_unguarded_access(source) == unguarded


RULES = """\
apiVersion: fleetgate/v1
agents:
- name: by-team
  match: 'jwt.team != "red"'
  egress: {hosts: [api.example.com]}
- name: guarded
  match: 'has(jwt.agent_role) && jwt.agent_role == "x"'
  egress: {hosts: [api.example.com]}
claims: [sub, agent_role, team]
"""


def test_rules_check_warns_but_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.yaml").write_text(RULES)
    assert main(["rules", "check", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "ok: revision" in out.out
    warnings = [ln for ln in out.err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1, out.err
    assert "r.yaml:4 at agents[0].match" in warnings[0] and "'by-team'" in warnings[0]
    assert "has(jwt.team)" in warnings[0]
