"""End to end: ``fleetgate trace SESSION`` draws a real gateway's view of an agent family.

A coordinator session goes through a real mitmdump: MCP ``initialize``, ``tools/list``, a
``tools/call``, a denied call, a delegation, a streamed LLM call (the official openai SDK);
the delegated sub-agent makes its own LLM call. ``fleetgate trace`` runs as a subprocess, once
against the gateway's admin API (the families it keeps in memory) and once over its decision
log file (``--log``): both must print the same tree, with the calls labelled as the seed's
picture in order, the child nested under the delegation with its call, the denial naming its
rule, and token totals equal to what the upstream reported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import trustme
from conftest import GatewayFactory
from helpers import family_policy, mcp_route, rpc
from llm_upstream import OPENAI_USAGE, install

from harness import ADMIN_TOKEN, Gateway, Upstream, ssl_context, token, wait_until

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CONTROL = "https://fleetgate.internal"
SESSION = "s-trace-coord"
GPT4O_COST = (13 * 2.50 + 10 * 1.25 + 7 * 10.00) / 1e6  # rules/pricing.yaml, OPENAI_USAGE


@pytest.fixture
def upstream(upstream_ca: trustme.CA) -> Iterator[Upstream]:
    up = Upstream(upstream_ca, names=("api.openai.com",))
    install(up)
    up.route("/mcp", mcp_route("json"))
    yield up
    up.stop()


def rules(tmp_path: Path, port: int) -> Path:
    """Rules as a directory: the family's policy and the shipped pricing (costs are priced)."""
    d = tmp_path / "rules"
    d.mkdir()
    shutil.copy(REPO / "rules" / "pricing.yaml", d / "pricing.yaml")
    (d / "fleet.yaml").write_text(family_policy(port))
    return d


def trace_cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLEETGATE_ADMIN_TOKEN": ADMIN_TOKEN, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "fleetgate.cli", "trace", *args,
                           "--admin", gw.admin_url], capture_output=True, text=True,
                          timeout=60, env=env, check=False)


def call_rows(text: str) -> list[tuple[int, str, str]]:
    """(column of the label, label, rest of the row) of each call row of the box."""
    rows = []
    for line in text.splitlines():
        inner = line[2:-2]
        head = inner.lstrip()
        if not head.startswith("+"):
            continue
        offset_end = inner.index(head) + len(head.split()[0])
        after = inner[offset_end:]
        label = after.split()[0]
        rows.append((offset_end + after.index(label), label, after[after.index(label) +
                                                                  len(label):].strip()))
    return rows


def test_trace_draws_the_family_from_the_admin_api_and_from_the_log(
        make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream) -> None:
    gw = make_gateway(rules(tmp_path, upstream.port))
    coord = token("coord-1", role="coordinator", session_id=SESSION)
    with gw.client(coord) as c:
        init = rpc(c, upstream, 1, "initialize", {"protocolVersion": "2025-06-18"})
        assert init.status_code == 200, init.text
        sid = init.headers["Mcp-Session-Id"]
        assert rpc(c, upstream, 2, "tools/list", session=sid).status_code == 200
        assert rpc(c, upstream, 3, "tools/call", {"name": "nmap_scan", "arguments": {
            "target": "10.0.0.1"}}, session=sid).status_code == 200
        assert c.get(upstream.url + "/delete-everything").status_code == 403
        r = c.post(CONTROL + "/v1/delegate", json={"role": "security"})
        assert r.status_code == 200, r.text
        child = r.json()
    http = httpx.Client(proxy=gw.proxy_url(coord), verify=ssl_context(gw.ca_cert), timeout=20)
    with openai.OpenAI(api_key="sk-test", max_retries=0, http_client=http) as client:
        stream = client.chat.completions.create(
            model="gpt-4o", stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "analyze the scan"}])
        usages = [ev.usage for ev in stream if ev.usage is not None]
    http = httpx.Client(proxy=gw.proxy_url(child["token"]), verify=ssl_context(gw.ca_cert),
                        timeout=20)
    with openai.OpenAI(api_key="sk-test", max_retries=0, http_client=http) as client:
        answer = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "triage"}])
        assert answer.usage is not None
        usages.append(answer.usage)
    reported = sum(u.prompt_tokens + u.completion_tokens for u in usages)
    assert len(usages) == 2 and reported == 2 * (OPENAI_USAGE["prompt_tokens"] +
                                                 OPENAI_USAGE["completion_tokens"])
    family = {SESSION, child["session"]}
    assert wait_until(lambda: len([d for d in gw.decisions()
                                   if d.get("session") in family]) >= 7, timeout=10), \
        gw.decisions()

    api = trace_cli(gw, SESSION, "--ascii")
    assert api.returncode == 0, api.stderr
    out = api.stdout
    rows = call_rows(out)
    assert [label for _, label, _ in rows] == [
        "initialize", "list_tools", "call_tool(nmap_scan)",
        "GET", "delegate(security)", "llm_call(gpt-4o)", "llm_call(gpt-4o)"], out
    # the denial shows its rule; the child sits under its delegation, indented, with its call
    assert "DENIED no-deletes (403)" in rows[3][2] and "/delete-everything" in rows[3][2]
    lines = out.splitlines()
    delegate_at = next(i for i, line in enumerate(lines) if "delegate(security)" in line)
    assert f"`- {child['agent']}, role security, session {child['session']}" in \
        lines[delegate_at + 1]
    assert "llm_call(gpt-4o)" in lines[delegate_at + 2]  # the child's call, right below it
    root_col, child_col = rows[0][0], rows[-2][0]
    assert child_col > root_col and rows[-1][0] == root_col  # coord's own call: depth 0 again
    assert "ttft" in rows[-1][2]  # the coordinator's streamed call
    cost = f"${2 * GPT4O_COST:.5f}"
    assert f"Tokens: {reported:,} | Cost: {cost}" in out
    assert "Total (2 sessions): " in out and "Calls: 7 (1 denied)" in out
    assert f"Tokens: {OPENAI_USAGE['prompt_tokens'] + OPENAI_USAGE['completion_tokens']:,}" \
        in next(line for line in lines if "Session:" in line and "Calls: 1 " in line)

    offline = trace_cli(gw, SESSION, "--ascii", "--log", str(gw.decision_log))
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == out  # one picture, whichever source answered

    as_json = trace_cli(gw, SESSION, "--json")
    assert as_json.returncode == 0, as_json.stderr
    tree = json.loads(as_json.stdout)
    assert tree["totals"]["tokens"]["total"] == reported
    assert tree["root"]["children"][0]["session"] == child["session"]

    unknown = trace_cli(gw, "no-such-session")
    assert unknown.returncode == 1
    assert "no records of session 'no-such-session'" in unknown.stderr
    assert "--log FILE" in unknown.stderr
    fancy = trace_cli(gw, SESSION)  # a UTF-8 terminal: the seed's box drawing
    assert fancy.returncode == 0 and fancy.stdout.startswith("┌─ Trace: " + SESSION)
    assert "└─ " + child["agent"] in fancy.stdout
    print(fancy.stdout)  # the README's example comes from here (pytest -s)
