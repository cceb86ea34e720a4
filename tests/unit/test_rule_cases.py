"""Decision tables for the example rules: every case in rules/cases/*.yaml is one test.

A case is ``{name, jwt: {claims}, request: {method, url, headers?, body?}, expect: {allow, rule}}``.
The URL goes through the same normalisation as live traffic (``request_facts``), so a case
written with ``%64elete`` or ``API.Example.COM.`` checks the gateway, not the test. A ``body``
(the JSON an SDK sends) on an LLM provider's route gives rules the ``llm.*`` facts the gateway
would read from it (``parse_request``), so model and ``max_tokens`` rules have cases too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from fleetgate.llm.request import parse_request
from fleetgate.normalize import RequestFacts, request_facts
from fleetgate.policy.decide import decide
from fleetgate.policy.loader import load_policy
from fleetgate.policy.model import Policy

RULES = Path(__file__).resolve().parents[2] / "rules"
CASES = RULES / "cases"
DEFAULT_PORTS = {"https": 443, "http": 80}


def _load_cases() -> list[Any]:
    params = []
    files = sorted([*CASES.glob("*.yaml"), *CASES.glob("*.yml")])
    assert files, f"no case files in {CASES}"
    for path in files:
        cases = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert isinstance(cases, list), f"{path.name}: a case file is a list of cases"
        for case in cases:
            params.append(pytest.param(case, id=f"{path.stem}: {case['name']}"))
    return params


def facts_from(request: dict[str, Any]) -> RequestFacts:
    url = request["url"]
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    # Keep the host exactly as written (urlsplit's .hostname would lower-case it for us).
    netloc = parts.netloc.rpartition("@")[2]
    if netloc.startswith("["):
        host = netloc[: netloc.index("]") + 1]
    else:
        host = netloc.rsplit(":", 1)[0] if parts.port is not None else netloc
    port = parts.port if parts.port is not None else DEFAULT_PORTS[scheme]
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    headers = [(str(k), str(v)) for k, v in (request.get("headers") or {}).items()]
    return request_facts(request["method"], scheme, host, port, target, headers)


def llm_facts(policy: Policy, request: dict[str, Any], facts: RequestFacts) -> dict[str, Any] | None:
    """``llm.*`` as LlmInspector sets them: only for a POST with a body on a provider's route."""
    if "body" not in request:
        return None
    route = policy.providers.route(facts.host, facts.port, facts.path)
    assert route is not None and facts.method == "POST", (
        f"{request['url']}: a case body is only read on an LLM provider's route (POST)")
    return {"is_llm": True, **parse_request(route, request["body"], facts.path).to_cel()}


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(RULES)


def test_facts_from_url_keeps_the_spelling_for_request_facts() -> None:
    f = facts_from({"method": "get", "url": "https://API.Example.COM.:8443/a/%64elete?x=1&x=2"})
    assert (f.method, f.host, f.port, f.path, f.raw_path) == (
        "GET", "api.example.com", 8443, "/a/delete", "/a/%64elete")
    assert f.query == {"x": "1,2"}
    assert facts_from({"method": "GET", "url": "http://[::1]/"}).port == 80
    assert facts_from({"method": "GET", "url": "https://[::1]:9/"}).host == "::1"


@pytest.mark.parametrize("case", _load_cases())
def test_rule_case(policy: Policy, case: dict[str, Any]) -> None:
    assert set(case) <= {"name", "jwt", "request", "expect", "why"}, case
    facts = facts_from(case["request"])
    decision = decide(policy, case["jwt"], facts, llm_facts(policy, case["request"], facts))
    expect = case["expect"]
    assert (decision.allow, decision.rule) == (expect["allow"], expect["rule"]), (
        f"{case['request']['method']} {case['request']['url']}: got "
        f"allow={decision.allow} rule={decision.rule!r} ({decision.reason})")
