"""``fleetgate rules check`` warnings and "did you mean" suggestions: each message, where it
points (file:line and key path), and that the example rules raise none."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetgate.celexpr import CelError, compile_expr
from fleetgate.cli import main
from fleetgate.policy.loader import PolicyError, load_policy

RULES = Path(__file__).resolve().parents[2] / "rules"
HEAD = "apiVersion: fleetgate/v1\n"


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(HEAD + body)
    return path


def warnings_of(tmp_path: Path, body: str) -> list[str]:
    return list(load_policy(write(tmp_path, body)).warnings)


def problems_of(tmp_path: Path, body: str) -> list[str]:
    with pytest.raises(PolicyError) as exc:
        load_policy(write(tmp_path, body))
    return [str(p) for p in exc.value.problems]


def test_example_rules_have_no_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    assert load_policy(RULES).warnings == ()
    assert main(["rules", "check", "--strict", str(RULES)]) == 0
    assert "warning" not in capsys.readouterr().err


# -- did you mean --------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "line", "path", "suggestion"), [
    ("authorization:\n  rules:\n  - alow: 'true'\n", 4, "authorization.rules[0].alow",
     "did you mean 'allow'?"),
    ("authorization:\n  rulse: []\n", 3, "authorization.rulse", "did you mean 'rules'?"),
    ("agents:\n- name: a\n  match: 'true'\n  egres: {hosts: [a.com]}\n", 5, "agents[0].egres",
     "did you mean 'egress'?"),
    ("budgets:\n- period: day\n  usd: {hard: 1}\n  when_: 'true'\n", 5, "budgets[0].when_",
     "did you mean 'when'?"),
    ("mcpAuthorization:\n  rules:\n  - {allow: 'true', reson: x}\n", 4,
     "mcpAuthorization.rules[0].reson", "did you mean 'reason'?"),
    ("killswitch:\n  triggers:\n  - {id: t, metric: requests, above: 1, windw: 10s}\n", 4,
     "killswitch.triggers[0].windw", "did you mean 'window'?"),
    ("credentials:\n- {hosts: [a.com], secretfile: /x}\n", 3, "credentials[0].secretfile",
     "did you mean 'secretFile'?"),
    ("Destinations: {}\n", 2, "Destinations", "did you mean 'destinations'?"),
])
def test_unknown_key_suggests_the_closest(tmp_path: Path, body: str, line: int, path: str,
                                          suggestion: str) -> None:
    problems = [p for p in problems_of(tmp_path, body) if f" at {path}:" in p]
    assert problems, problems_of(tmp_path, body)
    assert f"r.yaml:{line} at {path}: unknown key" in problems[0]
    assert problems[0].endswith(suggestion)


def test_unknown_key_without_a_close_one_suggests_nothing(tmp_path: Path) -> None:
    [problem] = problems_of(tmp_path, "zzzzqqq: 1\n")
    assert "unknown key 'zzzzqqq'" in problem and "did you mean" not in problem


@pytest.mark.parametrize(("source", "suggestion"), [
    ('request.path.startswith("/v1")', "unknown function startswith; did you mean startsWith?"),
    ('request.path.endswidth("/v1")', "unknown function endswidth; did you mean endsWith?"),
    ('request.host.matchs("x")', "unknown function matchs; did you mean matches?"),
    ('reqest.method == "GET"', "unknown variable reqest; available: jwt, request; "
                               "did you mean request?"),
])
def test_unknown_function_or_variable_suggests(source: str, suggestion: str) -> None:
    with pytest.raises(CelError) as exc:
        compile_expr(source, ("jwt", "request"))
    assert str(exc.value) == suggestion


def test_cel_suggestion_reaches_rules_check(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "authorization:\n  rules:\n  - allow: 'request.path.startswith(\"/\")'\n")
    assert main(["rules", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "r.yaml:4 at authorization.rules[0].allow: CEL: unknown function startswith; " \
           "did you mean startsWith?" in err


# -- URL in hosts --------------------------------------------------------------------------

@pytest.mark.parametrize(("host", "say"), [
    ("https://api.github.com/", "write the host name 'api.github.com'"),
    ("http://api.github.com:8443/v3", "write the host name 'api.github.com:8443'"),
    ("api.github.com/repos", "has a path: write the host name 'api.github.com'"),
])
def test_url_in_hosts_says_write_the_host_name(tmp_path: Path, host: str, say: str) -> None:
    body = f"agents:\n- name: a\n  match: 'true'\n  egress:\n    hosts:\n    - {host!r}\n"
    [problem] = problems_of(tmp_path, body)
    assert "r.yaml:7 at agents[0].egress.hosts[0]" in problem
    assert say in problem and "port must be" not in problem


# -- warnings ------------------------------------------------------------------------------

def test_misspelt_claim_warns_with_the_closest_standard_claim(tmp_path: Path) -> None:
    [w] = warnings_of(tmp_path, "authorization:\n  rules:\n"
                                "  - allow: 'jwt.agnet_role == \"coder\"'\n")
    assert "r.yaml:4 at authorization.rules[0].allow: jwt.agnet_role is not one of the " \
           "standard claims" in w
    assert "did you mean 'agent_role'?" in w


def test_claims_are_checked_against_the_declared_list(tmp_path: Path) -> None:
    body = ("claims: [agent_role, team]\n"
            "agents:\n- name: a\n  match: 'has(jwt.team) && jwt.team == \"x\"'\n"
            "  authorization:\n    rules:\n    - deny: 'jwt.tema == \"y\" || jwt.sub == \"z\"'\n")
    [w] = warnings_of(tmp_path, body)
    assert "r.yaml:8 at agents[0].authorization.rules[0].deny: jwt.tema is not one of the " \
           "claims declared under 'claims:'; did you mean 'team'?" in w


def test_declared_claims_count_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(HEAD + "claims: [tenant]\n")
    (tmp_path / "b.yaml").write_text(HEAD + "authorization:\n  rules:\n"
                                            "  - allow: 'jwt.tenant == \"t\"'\n")
    assert load_policy(tmp_path).warnings == ()


def test_claim_inside_a_string_is_not_read(tmp_path: Path) -> None:
    assert warnings_of(tmp_path, "authorization:\n  rules:\n"
                                 "  - allow: 'request.path == \"jwt.nothing\"'\n") == []


@pytest.mark.parametrize(("expr", "say"), [
    ('request.method == "get"', "request.method == 'get' is never true: request.method is "
                                "upper case; write 'GET'"),
    ('request.method != "post"', "request.method != 'post' is always true"),
    ('"Get" == request.method', "request.method == 'Get' is never true"),
    ('request.host == "API.example.com"', "request.host == 'API.example.com' is never true: "
                                          "request.host is lower case without a trailing "
                                          "dot; write 'api.example.com'"),
    ('request.host == "api.example.com."', "write 'api.example.com'"),
    ('request.scheme == "HTTPS"', "request.scheme == 'HTTPS' is never true: request.scheme "
                                  "is lower case; write 'https'"),
    ('request.method in ["GET", "delete"]', "request.method in [...]: 'delete' never "
                                            "matches"),
])
def test_comparison_that_can_never_be_true_warns(tmp_path: Path, expr: str, say: str) -> None:
    [w] = warnings_of(tmp_path, f"authorization:\n  rules:\n  - deny: '{expr}'\n")
    assert "r.yaml:4 at authorization.rules[0].deny" in w and say in w


@pytest.mark.parametrize("expr", [
    'request.method == "GET"', 'request.host == "api.example.com"',
    'request.scheme == "https"', 'request.path == "/GET"', 'request.method in ["GET", "PUT"]',
    'request.headers["x"] == "get"',
])
def test_comparison_that_can_be_true_is_quiet(tmp_path: Path, expr: str) -> None:
    assert warnings_of(tmp_path, f"authorization:\n  rules:\n  - deny: '{expr}'\n") == []


def test_never_true_is_found_in_every_section(tmp_path: Path) -> None:
    body = ("approvals:\n- id: t\n  when: 'request.method == \"delete\"'\n"
            "policies:\n  localRateLimit:\n  - {maxTokens: 1, tokensPerFill: 1, "
            "fillInterval: 1s, when: 'request.scheme == \"HTTP\"'}\n")
    warnings = warnings_of(tmp_path, body)
    assert sorted(w.split(": ", 1)[0].rsplit(" at ", 1)[1] for w in warnings) == [
        "approvals[0].when", "policies.localRateLimit[0].when"]


def test_unknown_request_field_warns(tmp_path: Path) -> None:
    [w] = warnings_of(tmp_path, "authorization:\n  rules:\n  - deny: 'request.metod == \"GET\"'\n")
    assert "request.metod: requests have no such field; did you mean 'method'?" in w


def test_unguarded_claim_in_a_selector_warns(tmp_path: Path) -> None:
    body = "claims: [team]\nagents:\n- name: by-team\n  match: 'jwt.team != \"red\"'\n"
    [w] = warnings_of(tmp_path, body)
    assert "r.yaml:5 at agents[0].match: agent profile 'by-team': match reads jwt.team " \
           "without has(jwt.team)" in w


def test_wildcard_egress_next_to_allow_private_warns(tmp_path: Path) -> None:
    body = ("destinations: {allowPrivate: [10.0.0.0/8]}\n"
            "agents:\n- name: a\n  match: 'true'\n  egress:\n    hosts:\n    - api.x.com\n"
            "    - '*'\n")
    [w] = warnings_of(tmp_path, body)
    assert "r.yaml:9 at agents[0].egress.hosts[1]: egress '*' never reaches the private " \
           "networks in destinations.allowPrivate" in w


def test_wildcard_egress_without_allow_private_is_quiet(tmp_path: Path) -> None:
    body = "agents:\n- name: a\n  match: 'true'\n  egress:\n    hosts: ['*']\n"
    assert warnings_of(tmp_path, body) == []


def test_rules_check_prints_warnings_and_strict_fails(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "authorization:\n  rules:\n  - deny: 'request.method == \"get\"'\n")
    assert main(["rules", "check", str(path)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "r.yaml:4" in err
    assert main(["rules", "check", "--strict", str(path)]) == 1
    assert "1 warning(s); --strict fails on warnings" in capsys.readouterr().err


def test_a_reload_logs_the_warnings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fleetgate.metrics import GatewayMetrics
    from fleetgate.runtime.policy import PolicyService

    policy = load_policy(write(tmp_path, "authorization:\n  rules:\n"
                                         "  - deny: 'request.scheme == \"HTTP\"'\n"))
    with caplog.at_level("WARNING", logger="fleetgate.addons.rules"):
        PolicyService(GatewayMetrics()).install(policy)
    assert any("rules warning:" in r.message and "request.scheme" in r.message
               for r in caplog.records)
