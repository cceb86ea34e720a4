"""A safe rule change, end to end, the way a user makes one (issue 20, "Done when").

One walkthrough through the real CLI (``python -m fleetgate.cli``, as ``fleetgate`` runs) and a
real gateway started as **mitmweb** by ``fleetgate run --web --record FILE``:

1. a rules directory with an MCP server (the MCP SDK's server) and an LLM provider (the mock
   OpenAI API);
2. test cases written *first* for a new MCP deny rule (``kubectl`` in the ``prod`` namespace)
   and a new token budget (the K-th chat completion of the day gets 429):
   ``fleetgate rules test`` fails at the cases' ``file:line``, the rule and the budget are
   added, it passes; ``--junit`` writes the counts;
3. the rule rolled out with ``mode: report``: the MCP SDK's ``tools/call`` it targets goes
   through, the decision log line carries ``would_deny`` with its id and
   ``fleetgate_would_deny_total{rule}`` counts it; the budget is enforced (a 429);
4. the mitmweb session saved as a user saves it (``GET /flows/dump``, mitmweb's "Save"), and
   recorded at the same time by ``--record`` (``fleetgate_record``, secrets masked);
5. ``fleetgate replay`` of both files under the rules with the rule switched to enforce:
   exactly the targeted call changes, allow -> deny by the new rule, against the report-mode
   rules and against the decisions recorded in the flows; ``--fail-on-change`` exits 1;
   identical rules change nothing, the budget's 429 included.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trustme
from llm_upstream import install, llm_rules_extra
from mcp.client.session import ClientSession
from mcp_client import list_all_tools, result_text, run_session
from mcp_upstream import McpUpstream

from harness import (
    ADMIN_TOKEN,
    REPO,
    SECRET,
    Gateway,
    Upstream,
    free_port,
    resolve_entries,
    ssl_context,
    token,
    wait_until,
    write_rules,
)

pytestmark = pytest.mark.e2e

WEB_PASSWORD = "e2e-web-password-0123456789"
RULE = "tools.no-prod-kubectl"
BUDGET = "tester.daily-tokens"

# the MCP server's rules; {new} is where the user adds the new rule
MCP_TOP = """mcp:
  servers:
  - name: tools
    hosts: ["{host}"]
    mcpAuthorization:
      rules:
{new}      - id: tools.tester
        allow: 'jwt.agent_role == "tester"'
"""
NEW_RULE = """      - id: tools.no-prod-kubectl
        deny: 'mcp.tool.name == "kubectl" && mcp.tool.arguments.namespace == "prod"'
        reason: production is changed through the deploy pipeline{mode}
"""
NEW_BUDGET = """budgets:
- id: tester.daily-tokens
  per: agent
  period: day
  tokens: {hard: 250}
"""
# Each chat completion reserves its input (~10 tokens) plus max_tokens 100 and is charged
# what the mock provider reports (23 in + 7 out): the 6th call of the day would pass 250.
CALLS_ALLOWED = 5

CASES = """\
# Test cases for the change: kubectl may not touch prod, and a daily token budget.
- name: kubectl in staging is fine
  jwt: &tester {{sub: agent-1, agent_role: tester}}
  request: {{method: POST, url: "{mcp}"}}
  mcp: {{call: kubectl, arguments: {{command: "rollout restart deploy/api", namespace: staging}}}}
  expect: {{allow: true, rule: tools.tester}}
- name: kubectl in prod is refused by the new rule
  jwt: *tester
  request: {{method: POST, url: "{mcp}"}}
  mcp: {{call: kubectl, arguments: {{command: "rollout restart deploy/api", namespace: prod}}}}
  expect: {{allow: false, rule: tools.no-prod-kubectl, stage: mcp}}
- name: the 6th chat completion of the day is refused by the budget
  jwt: *tester
  request: {{method: POST, url: "{llm}/v1/chat/completions",
            json: {{model: gpt-4o, max_tokens: 100, messages: [{{role: user, content: hi}}]}}}}
  usage: {{input: 23, output: 7}}
  repeat: 8
  every: 1s
  expect: {{at: 6, allow: false, status: 429, stage: budget, rule: tester.daily-tokens}}
"""


def fleetgate(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it, in its own process."""
    return subprocess.run([sys.executable, "-m", "fleetgate.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def policy(path: Path, llm: Upstream, mcp: McpUpstream, rule: str | None = None,
           budget: bool = False) -> Path:
    """The rules file, with the new MCP rule (``rule``: its mode, ``""`` enforce by default)
    and the new budget when asked."""
    new = "" if rule is None else NEW_RULE.format(
        mode="" if not rule else f"\n        mode: {rule}")
    top = (llm_rules_extra(llm.port) + MCP_TOP.format(host=f"{mcp.name}:{mcp.port}", new=new)
           + (NEW_BUDGET if budget else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_rules(path, [llm.port, mcp.port], top=top)


@pytest.fixture
def llm(upstream_ca: trustme.CA) -> Iterator[Upstream]:
    up = Upstream(upstream_ca)
    install(up)
    yield up
    up.stop()


@pytest.fixture
def mcp_server(upstream_ca: trustme.CA) -> Iterator[McpUpstream]:
    with McpUpstream(upstream_ca, "streamable-json") as up:
        yield up


@dataclass
class RunWebGateway(Gateway):
    """``fleetgate run --web --record FILE``: mitmweb started by the CLI, as a user does."""

    record: Path = Path()
    web_port: int = 0

    def argv(self) -> list[str]:
        secret = self.workdir / "jwt.secret"
        secret.write_bytes(SECRET)
        self.web_port = free_port()
        argv = [sys.executable, "-m", "fleetgate.cli", "run", "--web",
                "--rules", str(self.rules), "--record", str(self.record),
                "--listen-host", "127.0.0.1", "--listen-port", "0",
                "--metrics", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                "--confdir", str(self.confdir), "--decision-log", str(self.decision_log),
                "--jwt-secret-file", str(secret), "--state-dir", "",
                "--", "--web-port", str(self.web_port),
                "--set", f"web_password={WEB_PASSWORD}",
                "--set", f"fleetgate_admin_token={ADMIN_TOKEN}",
                "--set", f"ssl_verify_upstream_trusted_ca={self.upstream_ca}"]
        for entry in resolve_entries():
            argv += ["--set", f"fleetgate_resolve={entry}"]
        return argv

    def web(self, path: str) -> httpx.Response:
        """mitmweb's API with its password, as its page (or a script) calls it."""
        return httpx.get(f"http://127.0.0.1:{self.web_port}{path}", timeout=10,
                         headers={"Authorization": f"Bearer {WEB_PASSWORD}"})


def would_deny_metric(gw: Gateway, rule: str) -> float:
    m = re.search(rf'^fleetgate_would_deny_total{{rule="{re.escape(rule)}"}} (\S+)$',
                  gw.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def replay(flows: Path, rules: Path, *more: str) -> tuple[int, dict[str, Any]]:
    done = fleetgate("replay", str(flows), "--rules", str(rules), "--json", *more)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def changes(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(method, path, old, new) of each change, ``old``/``new`` as ``allow rule``."""
    def word(v: dict[str, Any]) -> str:
        return f"{'allow' if v['allow'] else 'deny'} {v['rule']}"
    return [(c["method"], "/" + c["url"].split("/", 3)[3], word(c["old"]), word(c["new"]))
            for c in report["changes"]]


def test_write_a_case_roll_out_in_report_mode_replay_the_mitmweb_session_and_see_the_diff(
        request: pytest.FixtureRequest, tmp_path: Path, confdir: Path, upstream_ca_file: Path,
        llm: Upstream, mcp_server: McpUpstream) -> None:
    rules_dir = tmp_path / "policy"
    rules = policy(rules_dir / "rules.yaml", llm, mcp_server)

    # -- 1-2. the cases first: they fail where they are written ---------------------------
    cases = rules_dir / "tests" / "rollout.yaml"
    cases.parent.mkdir()
    cases.write_text(CASES.format(mcp=mcp_server.url, llm=llm.url))
    lines = cases.read_text().splitlines()
    expect_lines = [i for i, line in enumerate(lines, start=1) if "expect:" in line]
    junit = tmp_path / "junit.xml"
    before = fleetgate("rules", "test", str(rules_dir), "--junit", str(junit))
    assert before.returncode == 1, before.stdout + before.stderr
    out = before.stdout
    assert (f"{cases}:{expect_lines[1]}: kubectl in prod is refused by the new rule: "
            "expected allow false got true") in out
    assert (f"{cases}:{expect_lines[2]}: the 6th chat completion of the day is refused by the "
            "budget: expected allow false got true") in out
    assert f"{cases}:{expect_lines[0]}" not in out  # staging passes already
    assert "2 of 3 case(s) failed in 1 file(s)" in out
    suites = ET.parse(junit).getroot()
    assert (suites.get("tests"), suites.get("failures"), suites.get("errors")) == ("3", "2", "0")
    failed = {tc.get("name"): tc.get("line") for tc in suites.iter("testcase")
              if tc.find("failure") is not None}
    assert failed == {"kubectl in prod is refused by the new rule": str(expect_lines[1]),
                      "the 6th chat completion of the day is refused by the budget":
                          str(expect_lines[2])}

    # the user adds the rule and the budget: the cases pass
    policy(rules, llm, mcp_server, rule="", budget=True)
    after = fleetgate("rules", "test", str(rules_dir), "--junit", str(junit))
    assert after.returncode == 0, after.stdout + after.stderr
    assert "ok: 3 case(s) passed in 1 file(s)" in after.stdout
    suites = ET.parse(junit).getroot()
    assert (suites.get("tests"), suites.get("failures"), suites.get("errors")) == ("3", "0", "0")
    assert [tc.get("name") for tc in suites.iter("testcase")] == [
        "kubectl in staging is fine", "kubectl in prod is refused by the new rule",
        "the 6th chat completion of the day is refused by the budget"]
    enforce = tmp_path / "enforce" / "rules.yaml"  # what the change will become
    enforce.parent.mkdir()
    enforce.write_text(rules.read_text())

    # -- 3. rolled out in report mode, on a gateway run as mitmweb -------------------------
    report = tmp_path / "report" / "rules.yaml"
    policy(report, llm, mcp_server, rule="report", budget=True)
    assert fleetgate("rules", "check", str(report)).returncode == 0
    recorded = tmp_path / "recorded.flows"
    workdir = tmp_path / "gateway"
    workdir.mkdir()
    gw = RunWebGateway(rules=report, workdir=workdir, confdir=confdir,
                       upstream_ca=upstream_ca_file, record=recorded)
    request.addfinalizer(gw.stop)
    gw.start()
    jwt = token("agent-1", role="tester")

    async def agent(session: ClientSession) -> list[str]:
        await list_all_tools(session)
        out = []
        for ns in ("staging", "prod"):
            r = await session.call_tool("kubectl", {"command": "rollout restart deploy/api",
                                                    "namespace": ns})
            assert not r.is_error, result_text(r)
            out.append(result_text(r))
        return out

    texts = run_session(mcp_server.url, "streamable-json", agent,
                        proxy=gw.proxy_url(jwt), ca=gw.ca_cert)
    assert ["prod" in t for t in texts] == [False, True]  # the prod call reached the server
    assert [c.arguments["namespace"] for c in mcp_server.calls if c.name == "kubectl"] == [
        "staging", "prod"]

    http = httpx.Client(proxy=gw.proxy_url(jwt), verify=ssl_context(gw.ca_cert), timeout=20)
    codes = []
    with openai.OpenAI(base_url=llm.url + "/v1", api_key="sk-agent-secret-key", max_retries=0,
                       http_client=http) as client:
        for _ in range(CALLS_ALLOWED + 1):
            try:
                client.chat.completions.create(model="gpt-4o", max_tokens=100,
                                               messages=[{"role": "user", "content": "hi"}])
                codes.append(200)
            except openai.RateLimitError as exc:
                codes.append(exc.status_code)
                assert BUDGET in exc.message
    assert codes == [200] * CALLS_ALLOWED + [429]  # the budget is enforced

    would = gw.wait_for_decision(lambda d: bool(d.get("would_deny")))
    assert would["result"] == "allow" and would["path"] == "/mcp"
    assert would["would_deny"] == [{"rule": RULE, "status": 403, "reason":
                                    "production is changed through the deploy pipeline"}]
    [call] = would["mcp"]["calls"]
    assert (call["target"], call["allow"], call["rule"]) == ("kubectl", True, "tools.tester")
    assert wait_until(lambda: would_deny_metric(gw, RULE) == 1)
    assert [d for d in gw.decisions() if d.get("would_deny")] == [would]  # only that call

    # -- 4. the session saved from mitmweb, as its "Save" does ----------------------------
    flows = [f for f in gw.web("/flows").json() if f["type"] == "http"]
    assert any(f["comment"].endswith(f"report: would deny by {RULE}: production is changed "
                                     "through the deploy pipeline") for f in flows), flows
    dump = gw.web("/flows/dump")
    assert dump.status_code == 200
    saved = tmp_path / "mitmweb.flows"
    saved.write_bytes(dump.content)
    gw.stop()  # the recording is complete once the gateway has exited
    # mitmweb saves flows as they are, the agent's API key included; --record masks it
    assert b"sk-agent-secret-key" in saved.read_bytes()
    assert b"sk-agent-secret-key" not in recorded.read_bytes()

    # -- 5. replay: what changes when the rule is enforced --------------------------------
    expected = [("POST", "/mcp", "allow tools.tester", f"deny {RULE}")]
    for flows_file in (saved, recorded):
        code, against_report = replay(flows_file, enforce, "--against", str(report),
                                      "--fail-on-change")
        assert (code, changes(against_report)) == (1, expected), against_report
        assert against_report["no_identity"] == []
        new = against_report["changes"][0]["new"]
        assert new["status"] == 200 and "deploy pipeline" in new["reason"]
        # against what the gateway decided then (recorded in each flow)
        code, against_recorded = replay(flows_file, enforce, "--fail-on-change")
        assert (code, changes(against_recorded)) == (1, expected), against_recorded
        # the same rules change nothing: the budget's 429 is replayed as it happened
        code, same = replay(flows_file, report, "--against", str(report), "--fail-on-change")
        assert (code, same["changes"]) == (0, []), same
        code, same = replay(flows_file, report, "--fail-on-change")
        assert (code, same["changes"], same.get("no_baseline")) == (0, [], []), same
        assert same["judged"] == same["flows"] >= 2 + CALLS_ALLOWED + 1  # every flow judged

    # in words, for a person
    words = fleetgate("replay", str(saved), "--rules", str(enforce), "--against", str(report))
    assert words.returncode == 0
    assert (f"POST {mcp_server.url}: allow (tools.tester) -> deny ({RULE})"
            in words.stdout.splitlines())
    assert re.search(r"^1 of \d+ flow\(s\) change decision", words.stdout, re.M), words.stdout
