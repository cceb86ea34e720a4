"""Report mode and the canary policy through a real mitmdump: what a report-mode rule or
rate limit would deny reaches the upstream, and the decision log line (``would_deny``), the
metric (``fleetgate_would_deny_total``) and the flow's comment say what would have been
denied; a canary policy's disagreements are recorded while traffic passes; an invalid canary
changes nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import GatewayFactory

from harness import Gateway, Upstream, token, upstream_name, wait_until, write_rules

REPORT_DENY = """\
- name: rollout
  match: 'jwt.agent_role == "rollout"'
  egress:
    hosts: ["{host}"]
  authorization:
    rules:
    - id: rollout.no-export
      mode: report
      deny: 'request.path.startsWith("/export")'
      reason: exports are being phased out
    - id: rollout.allow
      allow: 'true'
  policies:
    localRateLimit:
    - id: rollout.burst
      mode: report
      maxTokens: 2
      tokensPerFill: 2
      fillInterval: 1h
"""

# Read in a child process: importing mitmproxy.io here would trip -W error (pyparsing).
_READ_FLOWS = """
import json, sys
from mitmproxy import http, io
with open(sys.argv[1], "rb") as f:
    print(json.dumps([{"path": fl.request.path, "comment": fl.comment}
                      for fl in io.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]))
"""


def saved_comments(path: Path) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", _READ_FLOWS, str(path)], check=True,
                         capture_output=True, text=True).stdout
    return {f["path"]: f["comment"] for f in json.loads(out)}


def metric(gw: Gateway, name: str, rule: str) -> float:
    m = re.search(rf'^{name}{{rule="{re.escape(rule)}"}} (\S+)$', gw.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def rollout_rules(tmp_path: Path, upstream: Upstream) -> Path:
    host = f"{upstream_name(upstream.port)}:{upstream.port}"
    return write_rules(tmp_path / "rules.yaml", [upstream.port],
                       extra=REPORT_DENY.format(host=host))


def test_report_mode_deny_rule_lets_the_request_through_and_says_so(
        make_gateway: GatewayFactory, upstream: Upstream, tmp_path: Path) -> None:
    flows = tmp_path / "flows.mitm"
    gw = make_gateway(rollout_rules(tmp_path, upstream), save_stream_file=str(flows))
    with gw.client(token("ro-1", role="rollout")) as c:
        r = c.get(f"{upstream.url}/export/all")
    assert r.status_code == 200
    assert "/export/all" in upstream.paths()  # it reached the upstream
    rec = gw.wait_for_decision(lambda d: d["path"] == "/export/all")
    assert rec["result"] == "allow" and rec["rule"] == "rollout.allow"
    assert rec["would_deny"] == [{"rule": "rollout.no-export",
                                  "reason": "exports are being phased out", "status": 403}]
    assert metric(gw, "fleetgate_would_deny_total", "rollout.no-export") == 1
    gw.stop()  # the flow file is complete once mitmdump has exited
    comment = saved_comments(flows)["/export/all"]
    assert comment.startswith("ro-1 / rollout / ")
    assert ("report: would deny by rollout.no-export: exports are being phased out"
            in comment)


def test_report_mode_rate_limit_never_429s_but_reports(
        make_gateway: GatewayFactory, upstream: Upstream, tmp_path: Path) -> None:
    gw = make_gateway(rollout_rules(tmp_path, upstream))
    with gw.client(token("ro-2", role="rollout")) as c:
        codes = [c.get(f"{upstream.url}/n{i}").status_code for i in range(4)]
    assert codes == [200, 200, 200, 200]
    assert len([p for p in upstream.paths() if p.startswith("/n")]) == 4
    recs = [gw.wait_for_decision(lambda d, i=i: d["path"] == f"/n{i}") for i in range(4)]
    assert [("would_deny" in r) for r in recs] == [False, False, True, True]
    assert recs[2]["would_deny"][0]["rule"] == "rollout.burst"
    assert recs[2]["would_deny"][0]["status"] == 429
    assert "exhausted" in recs[2]["would_deny"][0]["reason"]
    assert [r["limits"][0]["mode"] for r in recs[:2]] == ["report", "report"]
    assert metric(gw, "fleetgate_would_deny_total", "rollout.burst") == 2
    assert metric(gw, "fleetgate_ratelimit_rejections_total", "rollout.burst") == 0


CANARY = """\
apiVersion: fleetgate/v1
agents:
- name: tester
  match: 'jwt.agent_role == "tester"'
  egress:
    hosts: ["{host}"]
  authorization:
    rules:
    - id: canary.no-reports
      deny: 'request.path.startsWith("/reports")'
    - id: canary.allow
      allow: 'true'
"""


def test_canary_policy_reports_disagreements_while_traffic_passes(
        make_gateway: GatewayFactory, upstream: Upstream, tmp_path: Path) -> None:
    host = f"{upstream_name(upstream.port)}:{upstream.port}"
    canary = tmp_path / "canary.yaml"
    canary.write_text(CANARY.format(host=host))
    gw = make_gateway(write_rules(tmp_path / "rules.yaml", [upstream.port]),
                      fleetgate_canary_rules=str(canary))
    with gw.client(token("t-1")) as c:
        assert c.get(f"{upstream.url}/reports/q3").status_code == 200
        assert c.get(f"{upstream.url}/fine").status_code == 200
        # the enforcing policy denies this one; the canary would allow it
        assert c.get(f"{upstream.url}/x/delete").status_code == 403
    assert "/reports/q3" in upstream.paths()
    rec = gw.wait_for_decision(lambda d: d["path"] == "/reports/q3")
    assert rec["result"] == "allow"
    assert rec["canary"]["allow"] is False and rec["canary"]["rule"] == "canary.no-reports"
    assert rec["canary"]["revision"]
    assert "canary" not in gw.wait_for_decision(lambda d: d["path"] == "/fine")
    denied = gw.wait_for_decision(lambda d: d["path"] == "/x/delete")
    assert denied["result"] == "deny" and denied["canary"]["allow"] is True
    assert metric(gw, "fleetgate_canary_disagreements_total", "canary.no-reports") == 1
    assert metric(gw, "fleetgate_canary_disagreements_total", "canary.allow") == 1
    state = gw.ready().json()["state"]["canary"]
    assert state["ok"] is True and state["revision"] == rec["canary"]["revision"]

    # hot reload: the canary stops denying /reports, so the verdicts agree again
    canary.write_text(CANARY.format(host=host).replace("/reports", "/nothing"))
    assert wait_until(lambda: gw.ready().json()["state"]["canary"]["revision"]
                      != rec["canary"]["revision"], timeout=10)
    with gw.client(token("t-1")) as c:
        assert c.get(f"{upstream.url}/reports/q4").status_code == 200
    assert "canary" not in gw.wait_for_decision(lambda d: d["path"] == "/reports/q4")


def test_invalid_canary_leaves_traffic_unaffected(
        make_gateway: GatewayFactory, upstream: Upstream, tmp_path: Path) -> None:
    canary = tmp_path / "canary.yaml"
    canary.write_text("apiVersion: fleetgate/v1\nauthorization: {rules: [{deny: 'nope('}]}\n")
    gw = make_gateway(write_rules(tmp_path / "rules.yaml", [upstream.port]),
                      fleetgate_canary_rules=str(canary))
    ready = gw.ready()
    assert ready.status_code == 200
    body: dict[str, Any] = ready.json()
    assert body["ready"] is True and body["degraded"] is True
    assert body["state"]["canary"]["ok"] is False
    assert "CEL" in " ".join(body["state"]["canary"]["last_error"])
    with gw.client(token("t-2")) as c:
        assert c.get(f"{upstream.url}/ok").status_code == 200
        assert c.get(f"{upstream.url}/x/delete").status_code == 403
    rec = gw.wait_for_decision(lambda d: d["path"] == "/ok")
    assert rec["result"] == "allow" and "canary" not in rec
    # a good canary later is picked up; traffic never noticed the bad one
    canary.write_text(CANARY.format(host=f"{upstream_name(upstream.port)}:{upstream.port}"))
    assert wait_until(lambda: gw.ready().json()["state"]["canary"]["ok"], timeout=10)
    time.sleep(0.1)
    with gw.client(token("t-2")) as c:
        assert c.get(f"{upstream.url}/reports/1").status_code == 200
    assert gw.wait_for_decision(lambda d: d["path"] == "/reports/1")["canary"]["allow"] is False


REPORT_BUDGET = """
budgets:
- id: fleet.report-cap
  mode: report
  per: fleet
  period: day
  tokens: {hard: 60}
"""


def test_report_mode_budget_never_refuses_but_reports(
        make_gateway: GatewayFactory, upstream: Upstream, tmp_path: Path) -> None:
    import httpx
    import openai  # the agent's own SDK, as in the budget tests
    from llm_upstream import install, llm_rules_extra

    from harness import ssl_context

    install(upstream)
    rules = write_rules(tmp_path / "rules.yaml", [upstream.port],
                        top=llm_rules_extra(upstream.port) + REPORT_BUDGET)
    gw = make_gateway(rules)
    http = httpx.Client(proxy=gw.proxy_url(token("b-1")), verify=ssl_context(gw.ca_cert),
                        timeout=20)
    with openai.OpenAI(base_url=upstream.url + "/v1", api_key="sk-test", max_retries=0,
                       http_client=http) as c:
        for _ in range(4):  # each reserves its input plus max_tokens 20; the cap is 60
            c.chat.completions.create(model="gpt-4o", max_tokens=20,
                                      messages=[{"role": "user", "content": "hi"}])
    assert sum(1 for s in upstream.seen if s.path.endswith("/chat/completions")) == 4
    assert wait_until(lambda: len([d for d in gw.decisions()
                                   if d["path"].endswith("/chat/completions")]) == 4)
    recs = [d for d in gw.decisions() if d["path"].endswith("/chat/completions")]
    assert all(r["result"] == "allow" for r in recs)
    would = [w for r in recs for w in r.get("would_deny", [])]
    assert would and {w["rule"] for w in would} == {"fleet.report-cap"}
    assert all(w["status"] == 429 and "would be exceeded" in w["reason"] for w in would)
    assert recs[0].get("budgets", [{}])[0].get("mode") == "report"
    assert metric(gw, "fleetgate_would_deny_total", "fleet.report-cap") == len(would)
    assert 'fleetgate_budget_rejections_total{budget="fleet.report-cap"}' not in gw.metrics()
