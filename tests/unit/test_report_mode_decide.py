"""Report mode in the pure decision: a report-mode rule or profile that would deny is
reported (``would_deny``) and the next element decides; report-mode elements never grant
what the enforcing ones refuse; allows are unaffected."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from fleetgate.normalize import request_facts
from fleetgate.policy.decide import Decision, decide
from fleetgate.policy.loader import PolicyError, load_policy
from fleetgate.policy.model import Policy
from fleetgate.rule import Mode

POLICY = """\
apiVersion: fleetgate/v1
authorization:
  rules:
  - id: no-delete
    mode: report
    deny: 'request.path.contains("delete")'
    reason: deletes are going away
  - id: hard-no-admin
    deny: 'request.path.startsWith("/admin")'
agents:
- name: worker
  match: 'jwt.agent_role == "worker"'
  egress: {hosts: [api.example.com]}
  authorization:
    rules:
    - id: worker.get-only
      mode: report
      require: 'request.method == "GET"'
    - id: worker.broken
      mode: report
      deny: 'jwt.missing == "x"'
    - id: worker.read
      allow: 'request.method in ["GET", "POST"]'
    - id: worker.report-allow
      mode: report
      allow: 'request.method == "PUT"'
- name: newbie
  mode: report
  match: 'jwt.agent_role == "newbie"'
  egress: {hosts: [api.example.com]}
  authorization:
    rules:
    - id: newbie.no-post
      deny: 'request.method == "POST"'
    - id: newbie.read
      allow: 'request.method == "GET"'
- name: newbie-too
  match: 'jwt.team == "blue"'
  egress: {hosts: [other.example.com]}
  authorization:
    rules:
    - id: blue.read
      allow: 'request.method == "GET"'
"""


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    path = tmp_path_factory.mktemp("rules") / "p.yaml"
    path.write_text(POLICY)
    return load_policy(path)


def judge(policy: Policy, method: str, url: str, **claims: str) -> Decision:
    scheme, _, rest = url.partition("://")
    host, _, path = rest.partition("/")
    return decide(policy, {"sub": "a1", **claims},
                  request_facts(method, scheme, host, 443, "/" + path, []))


def reported(d: Decision) -> list[str]:
    return [w.rule for w in d.would_deny]


def test_report_mode_deny_rule_is_reported_and_the_next_element_decides(policy: Policy) -> None:
    d = judge(policy, "GET", "https://api.example.com/delete/1", agent_role="worker")
    assert d.allow and d.rule == "worker.read"
    assert reported(d) == ["no-delete", "worker.broken"]
    assert d.would_deny[0].reason == "deletes are going away"
    assert d.would_deny[0].status == 403


def test_report_mode_require_is_reported(policy: Policy) -> None:
    d = judge(policy, "POST", "https://api.example.com/x", agent_role="worker")
    assert d.allow and d.rule == "worker.read"
    assert "worker.get-only" in reported(d)


def test_report_mode_rule_that_fails_to_evaluate_is_reported_not_enforced(policy: Policy) -> None:
    d = judge(policy, "GET", "https://api.example.com/x", agent_role="worker")
    assert d.allow
    [w] = d.would_deny
    assert w.rule == "worker.broken" and "failed to evaluate" in w.reason


def test_allow_unaffected_when_no_report_rule_would_deny(policy: Policy) -> None:
    d = judge(policy, "GET", "https://api.example.com/x", agent_role="worker", missing="y")
    assert d == Decision(True, "worker.read", "allowed", 200, ("worker",), named=True)


def test_enforcing_deny_still_denies_and_keeps_what_was_reported_before(policy: Policy) -> None:
    d = judge(policy, "GET", "https://api.example.com/admin/delete", agent_role="worker")
    assert not d.allow and d.rule == "hard-no-admin"
    assert reported(d) == ["no-delete"]


def test_report_mode_allow_never_grants_beside_an_enforcing_profile(policy: Policy) -> None:
    d = judge(policy, "PUT", "https://api.example.com/x", agent_role="worker")
    assert not d.allow and d.rule == "default-deny"


def test_report_mode_profile_alone_reports_its_denials_and_default_deny(policy: Policy) -> None:
    d = judge(policy, "POST", "https://api.example.com/x", agent_role="newbie")
    assert d.allow and d.rule == "report-mode"
    assert reported(d) == ["newbie.no-post", "default-deny"]


def test_report_mode_profile_alone_reports_egress(policy: Policy) -> None:
    d = judge(policy, "GET", "https://elsewhere.example.com/x", agent_role="newbie")
    assert d.allow and d.rule == "newbie.read"
    assert reported(d) == ["egress"]
    assert not d.named  # a reported egress never reaches an internal address


def test_report_mode_profile_allow_decides_when_it_is_alone(policy: Policy) -> None:
    d = judge(policy, "GET", "https://api.example.com/x", agent_role="newbie")
    assert d.allow and d.rule == "newbie.read" and d.would_deny == ()


def test_report_mode_profile_grants_nothing_beside_an_enforcing_one(policy: Policy) -> None:
    # newbie (report) admits api.example.com, blue (enforce) does not: egress is enforced
    d = judge(policy, "GET", "https://api.example.com/x", agent_role="newbie", team="blue")
    assert not d.allow and d.rule == "egress"
    # blue admits other.example.com; newbie's deny of POST is reported, default-deny enforced
    d = judge(policy, "POST", "https://other.example.com/x", agent_role="newbie", team="blue")
    assert not d.allow and d.rule == "default-deny"
    assert reported(d) == ["newbie.no-post"]


def test_global_enforcing_deny_applies_to_report_mode_profiles(policy: Policy) -> None:
    d = judge(policy, "GET", "https://api.example.com/admin", agent_role="newbie")
    assert not d.allow and d.rule == "hard-no-admin"


def test_no_profile_is_always_enforced(policy: Policy) -> None:
    assert judge(policy, "GET", "https://api.example.com/x").rule == "no-profile"


def test_report_mode_profile_match_error_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent("""\
        apiVersion: fleetgate/v1
        agents:
        - name: odd
          mode: report
          match: 'int(jwt.n) > 1'
          egress: {hosts: ["*"]}
        - name: all
          match: 'true'
          egress: {hosts: ["*"]}
          authorization: {rules: [{allow: 'true'}]}
        """))
    d = judge(load_policy(path), "GET", "https://x.example.com/", n="abc")
    assert d.allow and reported(d) == ["odd.match"]


def test_profile_mode_is_inherited_by_its_rules(policy: Policy) -> None:
    newbie = next(p for p in policy.agents if p.name == "newbie")
    assert newbie.mode is Mode.REPORT
    assert all(r.mode is Mode.REPORT for r in newbie.rules)


@pytest.mark.parametrize("where", ["rule", "profile"])
def test_bad_mode_is_refused_with_the_choices(tmp_path: Path, where: str) -> None:
    rule = "{allow: 'true', mode: shadow}" if where == "rule" else "{allow: 'true'}"
    pmode = "  mode: shadow\n" if where == "profile" else ""
    path = tmp_path / "p.yaml"
    path.write_text("apiVersion: fleetgate/v1\nagents:\n- name: a\n  match: 'true'\n"
                    f"{pmode}  authorization: {{rules: [{rule}]}}\n")
    with pytest.raises(PolicyError, match="mode must be 'enforce' or 'report'"):
        load_policy(path)


# -- MCP rules --------------------------------------------------------------------------

def _mcp(entries: list[object]) -> list[object]:
    from fleetgate.mcp.policy import compile_mcp_rules
    return list(compile_mcp_rules("srv", entries))


def _call(tool: str) -> dict[str, object]:
    return {"jwt": {}, "request": {}, "mcp": {"tool": {"name": tool, "arguments": {}}}}


def test_mcp_report_mode_deny_is_reported_and_the_allow_decides() -> None:
    from fleetgate.mcp.policy import may_call, may_list
    rules = _mcp([{"deny": 'mcp.tool.name == "rm"', "mode": "report", "id": "no-rm"},
                  'mcp.tool.name in ["rm", "ls"]'])
    v = may_call(rules, _call("rm"))  # type: ignore[arg-type]
    assert v.allow and v.rule == "srv.mcpAuthorization[1]"
    assert [w.rule for w in v.would_deny] == ["no-rm"]
    assert may_list(rules, _call("rm"))  # type: ignore[arg-type]  # never hidden
    assert may_call(rules, _call("ls")).would_deny == ()  # type: ignore[arg-type]


def test_mcp_report_mode_allow_grants_only_when_every_rule_reports() -> None:
    from fleetgate.mcp.policy import may_call
    mixed = _mcp([{"allow": 'mcp.tool.name == "ls"', "mode": "report"},
                  'mcp.tool.name == "cat"'])
    assert may_call(mixed, _call("ls")).rule == "mcp.default-deny"  # type: ignore[arg-type]
    only = _mcp([{"allow": 'mcp.tool.name == "ls"', "mode": "report"}])
    v = may_call(only, _call("rm"))  # type: ignore[arg-type]
    assert v.allow and v.rule == "report-mode"
    assert [w.rule for w in v.would_deny] == ["mcp.default-deny"]
    assert not may_call([], _call("rm")).allow  # no rule at all: still denied


def test_mcp_bad_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode must be 'enforce' or 'report'"):
        _mcp([{"allow": "true", "mode": "dry-run"}])
