"""The decision order of decide(): revoked, private destination, profile, egress, deny,
require, allow, default-deny; errors always deny."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from fleetgate.normalize import request_facts
from fleetgate.policy.decide import Decision, decide, private_destination_reason
from fleetgate.policy.loader import load_policy
from fleetgate.policy.model import Policy

POLICY = """\
apiVersion: fleetgate/v1
kind: Policy
authorization:
  rules:
  - deny: 'request.path.contains("delete")'
  - id: tenant-header
    hosts: ["tenant.example.com"]
    deny: 'request.headers["x-tenant"] != "acme"'
revoked:
  agents: [rogue]
  tokens: [stolen-jti]
destinations:
  allowPrivate: [10.96.0.0/12]
agents:
- name: worker
  match: 'jwt.agent_role == "worker"'
  egress:
    hosts: [api.example.com, "*.files.example.com", "tenant.example.com",
            "k8s.example.com:6443", "10.96.0.10", "10.0.0.5", "8.8.8.8"]
  authorization:
    rules:
    - id: worker.read
      allow: 'request.method in ["GET", "HEAD"]'
    - id: worker.post-messages
      allow: 'request.method == "POST" && request.path == "/v1/messages"'
    - id: worker.no-uploads
      hosts: ["*.files.example.com"]
      deny: 'request.method == "POST"'
      reason: uploads are not allowed
    - id: worker.allow-uploads
      hosts: ["*.files.example.com"]
      allow: 'request.method == "POST"'
    - id: worker.k8s-get-only
      hosts: ["k8s.example.com:6443"]
      require: 'request.method == "GET"'
      reason: read-only cluster access
    - id: worker.needs-trace
      hosts: ["tenant.example.com"]
      require: 'request.headers["x-trace"] != ""'
    - id: worker.flaky-allow
      allow: 'request.headers["x-magic"] == "please"'
- name: strict
  match: 'jwt.team == "blue"'
  egress:
    hosts: [blue.example.com]
  authorization:
    rules:
    - id: strict.get
      allow: 'request.method == "GET"'
"""


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    d = tmp_path_factory.mktemp("decide")
    (d / "policy.yaml").write_text(POLICY)
    return load_policy(d)


def facts(method: str, host: str, target: str, port: int = 443,
          headers: list[tuple[str, str]] | None = None) -> Any:
    return request_facts(method, "https", host, port, target, headers or [])


WORKER: dict[str, Any] = {"sub": "w-1", "agent_role": "worker", "team": "red", "jti": "j-1"}


def check(policy: Policy, decision: Decision, allow: bool, rule: str) -> None:
    assert (decision.allow, decision.rule) == (allow, rule), decision
    assert decision.reason
    if allow:
        assert decision.status == 200
    else:
        assert decision.status == 403


# -- happy path ----------------------------------------------------------------------------


def test_allowed_request(policy: Policy) -> None:
    d = decide(policy, WORKER, facts("GET", "api.example.com", "/v1/models"))
    check(policy, d, True, "worker.read")
    assert d.profiles == ("worker",)


def test_second_allow_rule(policy: Policy) -> None:
    d = decide(policy, WORKER, facts("POST", "api.example.com", "/v1/messages"))
    check(policy, d, True, "worker.post-messages")


# -- 1. revoked ----------------------------------------------------------------------------


def test_revoked_agent_wins_over_everything(policy: Policy) -> None:
    d = decide(policy, {**WORKER, "sub": "rogue"}, facts("GET", "api.example.com", "/"))
    check(policy, d, False, "revoked")
    assert "rogue" in d.reason


def test_revoked_agent_via_agent_id(policy: Policy) -> None:
    d = decide(policy, {**WORKER, "agent_id": "rogue"}, facts("GET", "api.example.com", "/"))
    check(policy, d, False, "revoked")


def test_revoked_token_by_jti(policy: Policy) -> None:
    d = decide(policy, {**WORKER, "jti": "stolen-jti"}, facts("GET", "api.example.com", "/"))
    check(policy, d, False, "revoked")
    assert "stolen-jti" in d.reason


def test_revoked_beats_private_destination_and_no_profile(policy: Policy) -> None:
    d = decide(policy, {"sub": "rogue"}, facts("GET", "169.254.169.254", "/"))
    check(policy, d, False, "revoked")


# -- 2. literal private destination --------------------------------------------------------


@pytest.mark.parametrize("host", ["169.254.169.254", "127.0.0.1", "10.0.0.5", "[::1]",
                                  "[::ffff:169.254.169.254]", "[64:ff9b::a9fe:a9fe]",
                                  "192.168.0.1", "100.64.1.1"])
def test_literal_private_destination_denied(policy: Policy, host: str) -> None:
    d = decide(policy, WORKER, facts("GET", host, "/"))
    check(policy, d, False, "destinations.private")
    assert "allowPrivate" in d.reason


def test_private_destination_checked_before_profiles(policy: Policy) -> None:
    # an identity no profile selects still gets the more specific answer
    d = decide(policy, {"sub": "nobody", "agent_role": "x"}, facts("GET", "10.0.0.5", "/"))
    check(policy, d, False, "destinations.private")


def test_allow_private_covers_the_address(policy: Policy) -> None:
    d = decide(policy, WORKER, facts("GET", "10.96.0.10", "/"))
    check(policy, d, True, "worker.read")


def test_allow_private_covered_but_not_in_egress(policy: Policy) -> None:
    d = decide(policy, WORKER, facts("GET", "10.96.0.11", "/"))
    check(policy, d, False, "egress")


def test_public_ip_literal_is_not_private(policy: Policy) -> None:
    d = decide(policy, WORKER, facts("GET", "8.8.8.8", "/"))
    check(policy, d, True, "worker.read")


def test_private_destination_reason(policy: Policy) -> None:
    for named in (True, False):
        assert private_destination_reason(policy, "api.example.com", named=named) is None
        assert private_destination_reason(policy, "8.8.8.8", named=named) is None
        assert private_destination_reason(policy, "10.112.0.1", named=named)  # outside /12
        why = private_destination_reason(policy, "169.254.169.254", named=named)
        assert why is not None
        assert "169.254.169.254" in why
    # inside allowPrivate: only for a destination an explicit egress entry names
    assert private_destination_reason(policy, "10.96.0.1", named=True) is None
    why = private_destination_reason(policy, "10.96.0.1", named=False)
    assert why is not None and "wildcard" in why


# -- 3. profiles ---------------------------------------------------------------------------


def test_no_profile(policy: Policy) -> None:
    d = decide(policy, {"sub": "x", "agent_role": "stranger", "team": "red"},
               facts("GET", "api.example.com", "/"))
    check(policy, d, False, "no-profile")
    assert d.profiles == ()


def test_missing_claim_means_the_profile_does_not_match(policy: Policy) -> None:
    # no agent_role claim: worker's selector does not select; strict's (team) does
    d = decide(policy, {"sub": "x", "team": "blue"}, facts("GET", "blue.example.com", "/"))
    check(policy, d, True, "strict.get")
    assert d.profiles == ("strict",)


def test_missing_claim_in_a_later_profile_is_not_a_denial(policy: Policy) -> None:
    # worker matches; strict's selector reads a team claim the token lacks: not selected
    d = decide(policy, {"sub": "w", "agent_role": "worker"},
               facts("GET", "api.example.com", "/"))
    check(policy, d, True, "worker.read")
    assert d.profiles == ("worker",)


def test_missing_claims_everywhere_is_no_profile(policy: Policy) -> None:
    d = decide(policy, {"sub": "x"}, facts("GET", "api.example.com", "/"))
    check(policy, d, False, "no-profile")
    assert "lacks a claim" in d.reason and "worker" in d.reason and "'agent_role'" in d.reason


@pytest.mark.parametrize("claims", [{"sub": "x", "level": "high"}, {"sub": "x", "level": {"a": 1}},
                                    {"sub": "x", "level": [1]}])
def test_other_match_errors_deny_naming_that_profile(tmp_path: Path,
                                                     claims: dict[str, Any]) -> None:
    (tmp_path / "p.yaml").write_text(
        "apiVersion: fleetgate/v1\n"
        "agents:\n"
        "- name: anyone\n"
        "  match: 'jwt.sub == \"x\"'\n"
        "  egress: {hosts: [api.example.com]}\n"
        "  authorization: {rules: [{id: ok, allow: 'true'}]}\n"
        "- name: levelled\n"
        "  match: 'int(jwt.level) > 2'\n"
        "  egress: {hosts: [api.example.com]}\n"
        "  authorization: {rules: [{id: lv, deny: 'true'}]}\n")
    policy = load_policy(tmp_path)
    d = decide(policy, claims, facts("GET", "api.example.com", "/"))
    check(policy, d, False, "levelled.match")
    assert "'levelled'" in d.reason and "could not be evaluated" in d.reason
    assert "anyone" not in d.reason
    # the same token without the claim: levelled does not select, anyone allows
    d = decide(policy, {"sub": "x"}, facts("GET", "api.example.com", "/"))
    check(policy, d, True, "ok")


def test_several_profiles_union_egress_and_rules(policy: Policy) -> None:
    both = {"sub": "w", "agent_role": "worker", "team": "blue"}
    d = decide(policy, both, facts("GET", "blue.example.com", "/"))
    assert d.allow
    assert d.profiles == ("worker", "strict")


# -- 4. egress -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port"),
    [("evil.example.com", 443), ("api.example.com.evil.com", 443),
     ("files.example.com", 443), ("blue.example.com", 443), ("k8s.example.com", 443)],
)
def test_egress_not_matching(policy: Policy, host: str, port: int) -> None:
    d = decide(policy, WORKER, facts("GET", host, "/", port=port))
    check(policy, d, False, "egress")
    assert d.profiles == ("worker",)


def test_egress_is_checked_before_rules(policy: Policy) -> None:
    d = decide(policy, WORKER, facts("GET", "evil.example.com", "/delete"))
    check(policy, d, False, "egress")


def test_egress_matches_normalised_host(policy: Policy) -> None:
    d = decide(policy, WORKER, facts("GET", "API.Example.COM.", "/"))
    check(policy, d, True, "worker.read")


def test_egress_with_port(policy: Policy) -> None:
    check(policy, decide(policy, WORKER, facts("GET", "k8s.example.com", "/api", 6443)),
          True, "worker.read")


# -- 5-7. deny, require, allow -------------------------------------------------------------


def test_global_deny(policy: Policy) -> None:
    d = decide(policy, WORKER, facts("GET", "api.example.com", "/v1/files/delete"))
    check(policy, d, False, "policy.authorization[0]")


def test_deny_beats_allow(policy: Policy) -> None:
    # worker.allow-uploads would allow it, but the deny comes first
    d = decide(policy, WORKER, facts("POST", "up.files.example.com", "/u"))
    check(policy, d, False, "worker.no-uploads")
    assert d.reason == "uploads are not allowed"


def test_deny_without_reason_names_the_expression(policy: Policy) -> None:
    d = decide(policy, WORKER, facts("GET", "api.example.com", "/delete"))
    assert 'request.path.contains("delete")' in d.reason


def test_rule_hosts_scope_the_rule(policy: Policy) -> None:
    # worker.no-uploads only applies to *.files.example.com
    d = decide(policy, WORKER, facts("POST", "api.example.com", "/v1/messages"))
    check(policy, d, True, "worker.post-messages")


def test_require_false_denies_with_its_id(policy: Policy) -> None:
    d = decide(policy, WORKER, facts("HEAD", "k8s.example.com", "/api", 6443))
    check(policy, d, False, "worker.k8s-get-only")
    assert d.reason == "read-only cluster access"


def test_require_scoped_by_port(policy: Policy) -> None:
    # the require rule is for :6443 only; api.example.com HEAD is fine
    check(policy, decide(policy, WORKER, facts("HEAD", "api.example.com", "/")),
          True, "worker.read")


def test_require_error_denies(policy: Policy) -> None:
    d = decide(policy, WORKER, facts("GET", "tenant.example.com", "/",
                                     headers=[("X-Tenant", "acme")]))
    check(policy, d, False, "worker.needs-trace")
    assert "failed to evaluate" in d.reason


def test_require_true_then_allow(policy: Policy) -> None:
    d = decide(policy, WORKER, facts("GET", "tenant.example.com", "/",
                                     headers=[("X-Tenant", "acme"), ("X-Trace", "t")]))
    check(policy, d, True, "worker.read")


def test_deny_error_fails_closed(policy: Policy) -> None:
    # the tenant-header deny reads a header that is absent: that must deny, not allow
    d = decide(policy, WORKER, facts("GET", "tenant.example.com", "/",
                                     headers=[("X-Trace", "t")]))
    check(policy, d, False, "tenant-header")
    assert "failing closed" in d.reason


def test_deny_match_on_header(policy: Policy) -> None:
    d = decide(policy, WORKER, facts("GET", "tenant.example.com", "/",
                                     headers=[("X-Tenant", "other"), ("X-Trace", "t")]))
    check(policy, d, False, "tenant-header")


def test_default_deny(policy: Policy) -> None:
    d = decide(policy, WORKER, facts("PUT", "api.example.com", "/v1/x",
                                     headers=[("X-Magic", "no")]))
    check(policy, d, False, "default-deny")
    assert "PUT api.example.com/v1/x" in d.reason


def test_allow_error_is_not_an_allow(policy: Policy) -> None:
    # worker.flaky-allow reads a header that is absent: it errors, which is not "true"
    d = decide(policy, WORKER, facts("PUT", "api.example.com", "/v1/x"))
    check(policy, d, False, "default-deny")
    assert "worker.flaky-allow" in d.reason


def test_allow_rule_that_is_true(policy: Policy) -> None:
    d = decide(policy, WORKER, facts("PUT", "api.example.com", "/v1/x",
                                     headers=[("X-Magic", "please")]))
    check(policy, d, True, "worker.flaky-allow")


# -- fail-closed generalities --------------------------------------------------------------


def _tiny(tmp_path: Path, rules: str) -> Policy:
    head = (
        "apiVersion: fleetgate/v1\n"
        "agents:\n"
        "- name: a\n"
        "  match: 'true'\n"
        "  egress: {hosts: ['*']}\n"
        "  authorization:\n"
        "    rules:\n"
    )
    (tmp_path / "p.yaml").write_text(head + textwrap.indent(textwrap.dedent(rules), "    "))
    return load_policy(tmp_path)


@pytest.mark.parametrize(
    "expr",
    ['jwt.tenant != "acme"', 'request.headers["x-tenant"] != "acme"',
     '!(request.query["safe"] == "yes")', 'jwt.missing.nested == 1',
     'int(request.headers["x-n"]) > 5'],
)
def test_missing_field_never_turns_a_deny_into_an_allow(tmp_path: Path, expr: str) -> None:
    policy = _tiny(tmp_path, f"""\
        - id: d
          deny: '{expr}'
        - id: everything
          allow: 'true'
        """)
    d = decide(policy, {"sub": "a"}, facts("GET", "x.example.com", "/"))
    assert not d.allow
    assert d.rule == "d"


def test_decide_is_total_for_odd_claims(tmp_path: Path) -> None:
    policy = _tiny(tmp_path, "- id: ok\n  allow: 'jwt.sub == \"a\"'\n")
    for claims in ({}, {"sub": None}, {"sub": 5}, {"jti": 7}, {"sub": ["a"]}):
        d = decide(policy, claims, facts("GET", "x.example.com", "/"))
        assert d.allow is False
        assert d.rule == "default-deny"


# -- evasions through request_facts --------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "target"),
    [
        ("api.example.com", "/v1/%64elete"),
        ("api.example.com", "/v1/%2564elete"),
        ("api.example.com", "/v1/files/../delete"),
        ("api.example.com", "/v1//delete"),
        ("api.example.com", "\\v1\\delete"),
        ("api.example.com", "/v1/x/%2e%2e/delete?ok=1"),
        ("API.EXAMPLE.COM.", "/v1/delete"),
        ("Api.Example.Com.", "/v1/%64elete"),
    ],
)
def test_evasions_hit_the_seed_deny_rule(policy: Policy, host: str, target: str) -> None:
    d = decide(policy, WORKER, facts("GET", host, target))
    check(policy, d, False, "policy.authorization[0]")


def test_delete_in_query_is_not_the_path(policy: Policy) -> None:
    d = decide(policy, WORKER, facts("GET", "api.example.com", "/v1/list?action=delete"))
    check(policy, d, True, "worker.read")


def test_upper_case_method_delete_is_default_denied(policy: Policy) -> None:
    d = decide(policy, WORKER, facts("delete", "API.EXAMPLE.COM.", "/v1/items/1"))
    check(policy, d, False, "default-deny")
