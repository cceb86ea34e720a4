"""The offline evaluator and ``fleetgate rules test``: verdicts in the gateway's order, and
reports a CI can use (a failure names ``file:line``, TAP, JUnit XML)."""

from __future__ import annotations

import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fleetgate.cli import main
from fleetgate.llm.usage import Usage
from fleetgate.offline.cases import find_case_files, load_case_file, run_case
from fleetgate.offline.evaluate import Evaluator, OfflineRequest, RequestSpecError, json_body
from fleetgate.offline.report import junit, tap
from fleetgate.policy.loader import load_policy
from fleetgate.policy.model import Policy

POLICY = """\
apiVersion: fleetgate/v1
kind: Policy
metadata: {name: t}
mcp:
  servers:
  - name: tools
    hosts: [mcp.example.com]
    mcpAuthorization:
      rules:
      - 'mcp.tool.name.startsWith("read_")'
      - id: no-secrets
        deny: 'mcp.tool.name == "read_file" && mcp.tool.arguments.path.startsWith("/etc")'
        reason: no reading /etc
agents:
- name: worker
  match: 'has(jwt.agent_role) && jwt.agent_role == "worker"'
  policies:
    localRateLimit:
    - {maxTokens: 3, tokensPerFill: 3, fillInterval: 1m, type: requests}
  budgets:
  - {id: worker.daily, per: agent, period: day, tokens: {hard: 10000}}
  egress:
    hosts: [api.anthropic.com, mcp.example.com, example.com]
  authorization:
    rules:
    - id: worker.any
      allow: 'true'
    - id: worker.no-opus
      deny: 'llm.is_llm && llm.model.startsWith("claude-opus")'
"""
WORKER = {"sub": "w-1", "agent_role": "worker"}
LLM = {"model": "claude-sonnet-4-5", "max_tokens": 1000,
       "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture()
def rules(tmp_path: Path) -> Path:
    d = tmp_path / "rules"
    d.mkdir()
    (d / "policy.yaml").write_text(POLICY)
    return d


@pytest.fixture()
def policy(rules: Path) -> Policy:
    return load_policy(rules)


def _mcp_call(tool: str, **args: object) -> bytes:
    return json_body({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                      "params": {"name": tool, "arguments": args}})


def test_request_from_url_keeps_the_spelling_for_request_facts() -> None:
    f = OfflineRequest.from_url("get", "https://API.Example.COM.:8443/a/%64elete?x=1&x=2").facts()
    assert (f.method, f.host, f.port, f.path, f.raw_path) == (
        "GET", "api.example.com", 8443, "/a/delete", "/a/%64elete")
    assert f.query == {"x": "1,2"}
    assert OfflineRequest.from_url("GET", "http://[::1]/").facts().port == 80
    assert OfflineRequest.from_url("GET", "https://[::1]:9/").facts().host == "::1"
    with pytest.raises(RequestSpecError):
        OfflineRequest.from_url("GET", "ftp://example.com/")


def test_no_identity_is_407_before_anything(policy: Policy) -> None:
    v = Evaluator(policy).evaluate(None, OfflineRequest.from_url("GET", "https://example.com/"))
    assert (v.allow, v.rule, v.status, v.stage) == (False, "identity.missing", 407, "identity")


def test_llm_body_is_read_before_the_rules(policy: Policy) -> None:
    ev = Evaluator(policy)
    url = "https://api.anthropic.com/v1/messages"
    unreadable = ev.evaluate(WORKER, OfflineRequest.from_url("POST", url, body=b"{"))
    assert (unreadable.rule, unreadable.status, unreadable.stage) == ("llm.body", 400, "llm")
    opus = ev.evaluate(WORKER, OfflineRequest.from_url(
        "POST", url, body=json_body({**LLM, "model": "claude-opus-4-1"})))
    assert (opus.allow, opus.rule, opus.stage) == (False, "worker.no-opus", "rules")


def test_mcp_call_judged_with_its_arguments(policy: Policy) -> None:
    ev = Evaluator(policy)
    url = "https://mcp.example.com/mcp"
    ok = ev.evaluate(WORKER, OfflineRequest.from_url("POST", url, body=_mcp_call(
        "read_file", path="/home/x")))
    assert (ok.allow, ok.rule, ok.http_rule) == (True, "tools.mcpAuthorization[0]", "worker.any")
    etc = ev.evaluate(WORKER, OfflineRequest.from_url("POST", url, body=_mcp_call(
        "read_file", path="/etc/shadow")))
    assert (etc.allow, etc.rule, etc.stage) == (False, "no-secrets", "mcp")
    other = ev.evaluate(WORKER, OfflineRequest.from_url("POST", url, body=_mcp_call("exec")))
    assert (other.allow, other.rule) == (False, "mcp.default-deny")
    junk = ev.evaluate(WORKER, OfflineRequest.from_url("POST", url, body=b"[]"))
    assert (junk.allow, junk.stage, junk.status) == (False, "mcp", 400)


def test_tools_list_filtered_per_agent(policy: Policy) -> None:
    body = json_body({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    answer = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [
        {"name": "read_file"}, {"name": "exec"}, {"name": "read_db"}]}}
    v = Evaluator(policy).evaluate(WORKER, OfflineRequest.from_url(
        "POST", "https://mcp.example.com/mcp", body=body), mcp_answer=answer)
    assert (v.visible, v.hidden) == (("read_file", "read_db"), ("exec",))


def test_rate_limit_refuses_the_fourth_call_and_refills_with_the_clock(policy: Policy) -> None:
    ev = Evaluator(policy)
    req = OfflineRequest.from_url("GET", "https://example.com/")
    got = [ev.evaluate(WORKER, req) for _ in range(4)]
    assert [v.allow for v in got] == [True, True, True, False]
    assert (got[3].rule, got[3].status, got[3].stage) == ("worker.localRateLimit[0]", 429, "limit")
    ev.advance(60)
    assert ev.evaluate(WORKER, req).allow


def test_budget_refuses_once_spend_reaches_the_hard_limit(policy: Policy) -> None:
    """10,000 tokens a day; each call reserves its input and max_tokens (1000) and is charged
    the 1010 tokens it used: 9 calls fit (9090), the 10th's reservation would not."""
    ev = Evaluator(policy)
    req = OfflineRequest.from_url("POST", "https://api.anthropic.com/v1/messages",
                                  body=json_body(LLM))
    n = 0
    while True:
        ev.advance(61)  # past the rate limit's minute
        v = ev.evaluate(WORKER, req, usage=Usage(input=10, output=1000))
        n += 1
        if not v.allow:
            break
    assert (v.rule, v.status, v.stage) == ("worker.daily", 429, "budget")
    assert n == 10
    ev.advance(86400)  # the next day
    assert ev.evaluate(WORKER, req).allow


CASES = """\
- name: reads are fine
  jwt: &w {sub: w-1, agent_role: worker}
  request: {method: GET, url: "https://example.com/"}
  expect: {allow: true, rule: worker.any}
- name: a wrong expectation
  jwt: *w
  request: {method: GET, url: "https://example.com/"}
  expect: {allow: false, rule: worker.any}
- name: the 4th call in a minute
  jwt: *w
  request: {method: GET, url: "https://example.com/"}
  repeat: 5
  expect: {at: 4, status: 429, rule: "worker.localRateLimit[0]"}
- name: a broken case
  jwt: *w
  request: {method: GET, url: "https://example.com/"}
  expect: {alow: true}
"""


def test_a_failing_case_reports_file_and_line(rules: Path, policy: Policy) -> None:
    (rules / "tests").mkdir()
    path = rules / "tests" / "t.yaml"
    path.write_text(CASES)
    assert find_case_files(rules) == [path]
    cf = load_case_file(path)
    assert cf.rules == rules.resolve()
    results = [run_case(policy, c) for c in cf.cases]
    assert [r.ok for r in results] == [True, False, True, False]
    assert results[1].message() == (
        f"{path}:8: a wrong expectation: expected allow false got true "
        "(allow 200 (rule worker.any, allowed: allowed))")
    assert results[3].error and "unknown expect key(s) ['alow']" in results[3].message()
    assert results[3].message().startswith(f"{path}:17: a broken case: ")
    t = tap(results)
    assert "not ok 2 - t.yaml: a wrong expectation" in t and f"  at: {path}:8" in t
    root = ET.fromstring(junit(results))
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("4", "1", "1")
    failed = root.find(".//testcase[@name='a wrong expectation']")
    assert failed is not None and failed.get("line") == "8" and failed.find("failure") is not None


def test_command_exits_1_on_a_failure_and_writes_junit(rules: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    (rules / "cases").mkdir()
    (rules / "cases" / "ok.yaml").write_text(CASES.split("- name: a wrong")[0])
    assert main(["rules", "test", str(rules)]) == 0
    assert "ok: 1 case(s) passed in 1 file(s)" in capsys.readouterr().out
    (rules / "cases" / "bad.yaml").write_text(textwrap.dedent(CASES))
    report = tmp_path / "junit.xml"
    assert main(["rules", "test", str(rules), "--junit", str(report)]) == 1
    out = capsys.readouterr().out
    assert f"{rules / 'cases' / 'bad.yaml'}:8: a wrong expectation" in out
    assert "2 of 5 case(s) failed in 2 file(s)" in out
    assert ET.parse(report).getroot().get("tests") == "5"


def test_rejected_rules_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "r"
    (d / "tests").mkdir(parents=True)
    (d / "p.yaml").write_text("apiVersion: fleetgate/v1\nkind: Policy\nagents: 3\n")
    (d / "tests" / "t.yaml").write_text(CASES)
    assert main(["rules", "test", str(d)]) == 2
    assert "fleetgate rules check" in capsys.readouterr().err
