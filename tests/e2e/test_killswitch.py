"""The kill switch end to end: a real mitmdump, the openai SDK, an MCP SSE stream.

A coordinator delegates through the gateway's own endpoint to three specialists, one of which
delegates again. Every member of that family and an unrelated agent hold open a streaming LLM
answer and an MCP SSE stream. Killing the coordinator's session with cascade must cut the
family's ten connections (and nothing of the unrelated agent's), refuse their next requests
and their new child tokens, and survive a restart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import GatewayFactory

from harness import (
    ADMIN_TOKEN,
    Gateway,
    Seen,
    Upstream,
    ssl_context,
    token,
    upstream_name,
    wait_until,
)

CONTROL = "https://fleetgate.internal"


def chunked_events(h: BaseHTTPRequestHandler, events: Iterable[str], interval: float) -> None:
    """Send SSE events as HTTP/1.1 chunks, one every ``interval`` seconds, until the client
    (or the gateway) goes away."""
    h.send_response(200)
    h.send_header("Content-Type", "text/event-stream")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    try:
        for ev in events:
            data = ev.encode()
            h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            h.wfile.flush()
            time.sleep(interval)
        h.wfile.write(b"0\r\n\r\n")
    except OSError:
        pass
    h.close_connection = True


def slow_openai_stream(h: BaseHTTPRequestHandler, seen: Seen) -> None:
    """An OpenAI chat stream that keeps going (a chunk every 50 ms for up to 30 s)."""
    base = {"id": "chatcmpl-k", "object": "chat.completion.chunk", "created": 1763900000,
            "model": "gpt-4o-2024-08-06"}

    def events() -> Iterator[str]:
        for i in range(600):
            delta = {"role": "assistant", "content": ""} if i == 0 else {"content": f" w{i}"}
            ev = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            yield f"data: {json.dumps(ev)}\n\n"
    chunked_events(h, events(), 0.05)


def mcp_sse_stream(h: BaseHTTPRequestHandler, seen: Seen) -> None:
    """The HTTP+SSE MCP transport's GET stream: ``endpoint`` first, then server messages."""
    def events() -> Iterator[str]:
        yield "event: endpoint\ndata: /mcp/messages?session_id=k1\n\n"
        for i in range(300):
            note = {"jsonrpc": "2.0", "method": "notifications/message",
                    "params": {"level": "info", "data": f"tick {i}"}}
            yield f"event: message\ndata: {json.dumps(note)}\n\n"
    chunked_events(h, events(), 0.1)


def kill_rules(path: Path, port: int, killswitch: str = "") -> Path:
    text = f"""apiVersion: fleetgate/v1
destinations:
  allowPrivate: ["127.0.0.1/32"]
llm:
  providers:
  - name: openai
    api: openai
    hosts: ["{upstream_name(port)}:{port}", "127.0.0.1:{port}"]
mcp:
  servers:
  - name: tools
    hosts: ["{upstream_name(port)}:{port}", "127.0.0.1:{port}"]
    path: /mcp
    mcpAuthorization:
      rules:
      - 'true'
delegation:
  roles:
    coordinator: [security, network, cloud]
    security: [general]
  maxDepth: 3
  maxChildren: 5
  maxTtl: 30m
killswitch:
  triggers:
  - id: runaway-loop
    metric: identical_requests
    above: 5
    window: 60s
    ladder: [throttle, stop]
    throttle: {{requests: 1, per: 30s}}
    cooldown: 1s
{killswitch}
agents:
- name: fleet
  match: 'jwt.agent_role in ["coordinator", "security", "network", "cloud", "general"]'
  egress:
    hosts: ["{upstream_name(port)}:{port}", "127.0.0.1:{port}"]
  authorization:
    rules:
    - allow: 'true'
"""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


@pytest.fixture
def kill_upstream(upstream: Upstream) -> Upstream:
    upstream.route("/v1/chat/completions", slow_openai_stream)
    upstream.route("/mcp", mcp_sse_stream)
    return upstream


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture
def kill_gateway(make_gateway: GatewayFactory, kill_upstream: Upstream, tmp_path: Path,
                 state_dir: Path) -> Gateway:
    rules = kill_rules(tmp_path / "rules.yaml", kill_upstream.port)
    return make_gateway(rules, fleetgate_state_dir=str(state_dir))


class Holder:
    """One agent's two open streams (LLM via the openai SDK, MCP GET via httpx)."""

    def __init__(self, gw: Gateway, up: Upstream, name: str, tok: str) -> None:
        self.name = name
        self.chunks = 0
        self.events = 0
        self.ended: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self.threads = [threading.Thread(target=self._llm, args=(gw, up, tok), daemon=True),
                        threading.Thread(target=self._mcp, args=(gw, up, tok), daemon=True)]
        for t in self.threads:
            t.start()

    def _llm(self, gw: Gateway, up: Upstream, tok: str) -> None:
        try:
            with httpx.Client(proxy=gw.proxy_url(tok), verify=ssl_context(gw.ca_cert),
                              timeout=40) as http:
                client = openai.OpenAI(api_key="not-a-real-key", base_url=up.url + "/v1",
                                       http_client=http, max_retries=0)
                stream = client.chat.completions.create(
                    model="gpt-4o", stream=True, messages=[{"role": "user", "content": "go"}])
                for _ in stream:
                    self.chunks += 1
        except Exception as exc:
            self.errors["llm"] = f"{type(exc).__name__}: {exc}"
        self.ended["llm"] = time.monotonic()

    def _mcp(self, gw: Gateway, up: Upstream, tok: str) -> None:
        try:
            with gw.client(tok, timeout=40) as c, c.stream(
                    "GET", up.url + "/mcp", headers={"Accept": "text/event-stream"}) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        self.events += 1
        except Exception as exc:
            self.errors["mcp"] = f"{type(exc).__name__}: {exc}"
        self.ended["mcp"] = time.monotonic()

    @property
    def flowing(self) -> bool:
        return self.chunks >= 2 and self.events >= 2


def delegate(gw: Gateway, parent: str, role: str) -> dict[str, Any]:
    with gw.client(parent) as c:
        r = c.post(CONTROL + "/v1/delegate", json={"role": role})
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_killing_a_coordinator_session_recalls_its_whole_family(
        kill_gateway: Gateway, kill_upstream: Upstream, make_gateway: GatewayFactory,
        state_dir: Path, tmp_path: Path) -> None:
    gw, up = kill_gateway, kill_upstream
    coord = token("coord-1", role="coordinator", session_id="s-coord", user="alice")
    family = {"coordinator": coord}
    for role in ("security", "network", "cloud"):
        family[role] = delegate(gw, coord, role)["token"]
    grand = delegate(gw, family["security"], "general")
    family["general"] = grand["token"]
    assert grand["depth"] == 2 and grand["agent"].startswith("coord-1/security-")
    # scope only narrows: a coordinator may not mint a 'general' agent directly
    with gw.client(coord) as c:
        r = c.post(CONTROL + "/v1/delegate", json={"role": "general"})
    assert r.status_code == 403 and r.json()["fleetgate"]["rule"] == "delegation.role"
    with gw.client(coord) as c:
        bad = c.post(CONTROL + "/v1/delegate", content=b"\xff not json",
                     headers={"Content-Type": "application/json"})
        unknown = c.get(CONTROL + "/v1/anything")
    assert bad.status_code == 400 and bad.json()["fleetgate"]["rule"] == "delegation.bad_request"
    assert unknown.status_code == 404
    with gw.client(family["general"]) as c:
        me = c.get(CONTROL + "/v1/whoami").json()
    assert me["role"] == "general" and me["depth"] == 2 and me["applies"] is None
    assert not any("delegate" in p or "whoami" in p for p in up.paths())  # never dialled

    other = token("other-1", role="security", session_id="s-other")
    holders = {n: Holder(gw, up, n, t) for n, t in family.items()}
    bystander = Holder(gw, up, "other", other)
    assert wait_until(lambda: all(h.flowing for h in [*holders.values(), bystander]), 15), \
        {n: (h.chunks, h.events, h.errors) for n, h in holders.items()}

    sent = time.monotonic()
    r = gw.admin("/v1/actions", {"verb": "stop", "scope": {"kind": "session", "value": "s-coord",
                                                            "cascade": True},
                                 "reason": "runaway coordinator", "by": "e2e"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["new"] and out["sessions"] == ["s-coord"] and len(out["descendants"]) == 4
    assert out["cut_ms"] < 100, out["cut_ms"]  # the gateway's own command-to-last-cut time
    cut_flows = [c for c in out["cut"] if c.get("method")]
    assert len(cut_flows) >= 10  # five agents x (LLM stream + MCP stream)
    # client-observed: every stream ends within 2 s of the command; bench/ measures the distribution
    assert wait_until(lambda: all(len(h.ended) == 2 for h in holders.values()),
                      sent + 2.0 - time.monotonic()), {n: h.ended for n, h in holders.items()}
    for name, h in holders.items():
        assert set(h.errors) == {"llm", "mcp"}, (name, h.errors)  # cut, not finished
    # the bystander's streams are untouched and it keeps working
    assert not bystander.ended and not bystander.errors
    before = bystander.chunks
    assert wait_until(lambda: bystander.chunks > before + 3, 5)
    with gw.client(other) as c:
        assert c.get(up.url + "/still-working").status_code == 200

    # the family's next requests are refused before reaching anything
    for name, tok in family.items():
        with gw.client(tok) as c:
            r = c.get(up.url + f"/after-{name}")
        assert r.status_code == 503, (name, r.text)
        assert r.headers["x-should-retry"] == "false"  # the SDKs must not retry a stop
        body = r.json()["fleetgate"]
        assert body["rule"] == "killswitch.stop" and "runaway coordinator" in body["reason"]
    assert not any(p.startswith("/after-") for p in up.paths())
    # and a killed parent cannot buy a new child
    with gw.client(family["cloud"]) as c:
        r = c.post(CONTROL + "/v1/delegate", json={"role": "general"})
    assert r.status_code == 503 and r.json()["fleetgate"]["rule"] == "killswitch.stop"

    # the kill log says what was running and how far it got
    log = gw.admin("/v1/log?limit=100").json()["log"]
    action_rows = [row for row in log if row["event"] == "action"]
    assert action_rows[-1]["by"] == "e2e" and len(action_rows[-1]["descendants"]) == 4
    cuts = [row for row in log if row["event"] == "cut" and row.get("method")]
    assert {row["path"] for row in cuts} >= {"/v1/chat/completions", "/mcp"}
    assert all(row["bytes_received"] > 0 and row["phase"] == "streaming the response"
               for row in cuts)
    assert {row["agent"] for row in cuts} >= {"coord-1", grand["agent"]}
    metrics = gw.metrics()
    assert 'fleetgate_kill_actions_total{event="apply",scope="session",source="operator",' \
           'verb="stop"} 1.0' in metrics
    assert "fleetgate_kill_cut_seconds_count 1.0" in metrics
    assert 'fleetgate_kill_sessions{state="stopped"} 5.0' in metrics  # the family
    assert 'fleetgate_kill_sessions{state="live"} 1.0' in metrics  # the bystander

    # the CLI over the admin API shows the same
    env = {**os.environ, "FLEETGATE_ADMIN_TOKEN": ADMIN_TOKEN, "FLEETGATE_ADMIN_URL":
           gw.admin_url}
    cli = [sys.executable, "-m", "fleetgate.cli"]
    tree = subprocess.run([*cli, "sessions", "tree"], env=env, capture_output=True, text=True,
                          timeout=30)
    assert tree.returncode == 0, tree.stderr
    assert "s-coord  coord-1 (coordinator) [stopped" in tree.stdout
    assert f"    {grand['session']}" in tree.stdout  # two levels below the coordinator
    status = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True, timeout=30)
    row = next(line for line in status.stdout.splitlines() if "session:s-coord" in line)
    assert row.split()[1:3] == ["stop", "session:s-coord+descendants"], status.stdout

    # a restart keeps them dead; a child first seen after the kill is dead on arrival
    gw.stop()
    gw2 = make_gateway(gw.rules, fleetgate_state_dir=str(state_dir))
    with gw2.client(family["general"]) as c:
        assert c.get(up.url + "/after-restart").status_code == 503
    late = token("late-child", role="general", session_id="s-late", parent_session="s-coord")
    with gw2.client(late) as c:
        r = c.get(up.url + "/late")
    assert r.status_code == 503 and "through ancestor session 's-coord'" in \
        r.json()["fleetgate"]["reason"]
    with gw2.client(other) as c:
        assert c.get(up.url + "/other-after-restart").status_code == 200
    assert "/after-restart" not in up.paths() and "/late" not in up.paths()

    # unrevoke lifts it for the family
    r = gw2.admin("/v1/lift", {"action": "unrevoke", "scope": "session:s-coord", "by": "e2e"})
    assert r.status_code == 200 and len(r.json()["lifted"]) == 1
    with gw2.client(family["network"]) as c:
        assert c.get(up.url + "/after-unrevoke").status_code == 200


def test_a_stop_in_the_rules_yaml_alone_cuts_and_refuses(
        kill_gateway: Gateway, kill_upstream: Upstream) -> None:
    gw, up = kill_gateway, kill_upstream
    rogue = token("rogue-1", role="cloud", session_id="s-rogue")
    h = Holder(gw, up, "rogue", rogue)
    assert wait_until(lambda: h.flowing, 10)
    kill_rules(gw.rules, up.port, killswitch="""  stop:
  - agent: rogue-1
    reason: leaked a credential""")
    assert wait_until(lambda: len(h.ended) == 2, 5), "the rules stop did not cut the streams"
    with gw.client(rogue) as c:
        r = c.get(up.url + "/after")
    assert r.status_code == 503 and "leaked a credential" in r.json()["fleetgate"]["reason"]
    assert "/after" not in up.paths()
    status = gw.admin("/v1/status").json()
    assert [a["source"] for a in status["actions"]] == ["rules"]
    # removing it from the rules lifts it
    kill_rules(gw.rules, up.port)
    assert wait_until(lambda: not gw.admin("/v1/status").json()["actions"], 5)
    with gw.client(rogue) as c:
        assert c.get(up.url + "/back").status_code == 200


def test_a_runaway_loop_is_throttled_then_stopped_automatically(
        kill_gateway: Gateway, kill_upstream: Upstream) -> None:
    gw, up = kill_gateway, kill_upstream
    looper = token("looper-1", role="network", session_id="s-loop")
    calm = token("calm-1", role="network", session_id="s-calm")
    statuses: list[int] = []
    with gw.client(looper) as c:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (not statuses or statuses[-1] != 503):
            statuses.append(c.post(up.url + "/loop", json={"same": "request"}).status_code)
            time.sleep(0.1)
    assert statuses[:5] == [200] * 5, statuses
    assert 429 in statuses and statuses[-1] == 503, statuses
    assert statuses.index(429) < statuses.index(503)
    assert up.paths().count("/loop") <= 6  # the throttle let at most one more through
    with gw.client(calm) as c:  # per agent: another agent of the same role is untouched
        assert c.post(up.url + "/loop", json={"same": "request"}).status_code == 200
    log = gw.admin("/v1/log").json()["log"]
    auto = [row for row in log if row["event"] == "action"]
    assert [row["verb"] for row in auto] == ["throttle", "stop"]
    assert all(row["source"] == "trigger:runaway-loop" for row in auto)
    assert "identical" in auto[0]["reason"]


def test_pause_holds_requests_until_resume_and_throttle_sets_a_ceiling(
        kill_gateway: Gateway, kill_upstream: Upstream) -> None:
    gw, up = kill_gateway, kill_upstream
    tok = token("p-1", role="cloud", session_id="s-p")
    r = gw.admin("/v1/actions", {"verb": "pause", "scope": "role:cloud", "reason": "maintenance"})
    assert r.status_code == 200, r.text
    result: dict[str, Any] = {}

    def call() -> None:
        with gw.client(tok, timeout=40) as c:
            result["r"] = c.get(up.url + "/paused")

    t = threading.Thread(target=call)
    t.start()
    # held at the gateway: for a whole second neither an answer nor the upstream sees it
    assert not wait_until(lambda: "r" in result or "/paused" in up.paths(), 1.0), result
    resumed = time.monotonic()
    assert gw.admin("/v1/lift", {"action": "resume", "scope": "role:cloud"}).json()["lifted"]
    assert wait_until(lambda: "r" in result, resumed + 1.0 - time.monotonic())  # released at once
    t.join(10)
    assert result["r"].status_code == 200
    # a throttle: 2 requests per minute for the role
    r = gw.admin("/v1/actions", {"verb": "throttle", "scope": "role:cloud", "requests": 2,
                                 "per": 60, "reason": "too chatty"})
    assert r.status_code == 200
    with gw.client(tok) as c:
        codes = [c.get(up.url + f"/t{i}").status_code for i in range(3)]
        last = c.get(up.url + "/t3")
    assert codes == [200, 200, 429]
    assert int(last.headers["Retry-After"]) > 0 and "too chatty" in last.json()["fleetgate"]["reason"]


def test_pause_that_is_never_resumed_answers_503_with_retry_after(
        make_gateway: GatewayFactory, kill_upstream: Upstream, tmp_path: Path) -> None:
    rules = kill_rules(tmp_path / "rules.yaml", kill_upstream.port, killswitch="""  pause:
  - role: cloud
    reason: frozen""")
    gw = make_gateway(rules, fleetgate_pause_max_wait="1")
    result: dict[str, httpx.Response] = {}

    def call() -> None:
        with gw.client(token("p-2", role="cloud")) as c:
            result["r"] = c.get(kill_upstream.url + "/never")

    t = threading.Thread(target=call)
    started = time.monotonic()
    t.start()
    # held for (about) the 1 s maximum wait, then answered well before 5 s
    assert not wait_until(lambda: "r" in result, started + 0.9 - time.monotonic())
    assert wait_until(lambda: "r" in result, started + 5 - time.monotonic())
    t.join(5)
    r = result["r"]
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert r.json()["fleetgate"]["rule"] == "killswitch.pause"
    assert "/never" not in kill_upstream.paths()


def test_admin_api_needs_its_token_and_is_not_reachable_through_the_proxy(
        kill_gateway: Gateway, kill_upstream: Upstream) -> None:
    gw = kill_gateway
    assert gw.admin("/v1/status", token=None).status_code == 401
    assert gw.admin("/v1/status", token="wrong-token-xxxxxxxx").status_code == 401
    assert gw.admin("/v1/actions", {"verb": "stop", "scope": "all"}).status_code == 400  # reason
    with gw.client(token("sneaky", role="cloud")) as c:
        r = c.get(f"http://127.0.0.1:{gw.admin_port}/v1/status",
                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code in (502, 403), r.text  # the gateway never proxies to itself
    # a message deeper than the maximum is dropped (seed 004's depth counter)
    with gw.client(token("deep", role="cloud")) as c:
        r = c.post(kill_upstream.url + "/msg", headers={"X-Message-Depth": "6"}, json={})
        ok = c.post(kill_upstream.url + "/msg2", json={"depth": 3, "payload": "x"})
    assert r.status_code == 403 and r.json()["fleetgate"]["rule"] == "killswitch.message-depth"
    assert ok.status_code == 200 and "/msg" not in kill_upstream.paths()


def test_stop_all_and_unrevoke_from_the_cli(kill_gateway: Gateway, kill_upstream: Upstream
                                            ) -> None:
    gw, up = kill_gateway, kill_upstream
    env = {**os.environ, "FLEETGATE_ADMIN_TOKEN": ADMIN_TOKEN, "FLEETGATE_ADMIN_URL":
           gw.admin_url}
    cli = [sys.executable, "-m", "fleetgate.cli"]
    out = subprocess.run([*cli, "stop", "--all", "--reason", "incident 42"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "stop global" in out.stdout
    with gw.client(token("any", role="general")) as c:
        assert c.get(up.url + "/x").status_code == 503
    out = subprocess.run([*cli, "unrevoke", "--all"], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and "lifted 1" in out.stdout, out.stdout + out.stderr
    with gw.client(token("any", role="general")) as c:
        assert c.get(up.url + "/y").status_code == 200
    log = subprocess.run([*cli, "killlog"], env=env, capture_output=True, text=True, timeout=30)
    assert "incident 42" in log.stdout and "lift" in log.stdout


def test_a_cut_llm_streams_kill_log_row_carries_its_usage_so_far(
        kill_gateway: Gateway, kill_upstream: Upstream) -> None:
    gw, up = kill_gateway, kill_upstream
    h = Holder(gw, up, "cut-llm", token("cut-llm-1", role="cloud", session_id="s-cut-llm"))
    assert wait_until(lambda: h.chunks >= 5, 10), (h.chunks, h.errors)
    r = gw.admin("/v1/actions", {"verb": "stop", "scope": "agent:cut-llm-1",
                                 "reason": "usage so far", "by": "e2e"})
    assert r.status_code == 200, r.text
    assert wait_until(lambda: "llm" in h.ended, 5) and "llm" in h.errors
    cut = [row for row in gw.admin("/v1/log").json()["log"]
           if row["event"] == "cut" and row.get("path") == "/v1/chat/completions"]
    assert len(cut) == 1, cut
    llm = cut[0]["llm"]
    assert llm is not None, cut[0]
    assert llm["provider"] == "openai" and llm["model"] == "gpt-4o" and llm["outcome"] == "cut"
    # the stream was cut before the provider's usage chunk: counted from what streamed
    assert llm["estimated"] is True and llm["tokens"]["output"] >= 4, llm
    assert "cost_usd" in llm and "priced" in llm
    # the same row in the CLI, and the decision log agrees on the tokens
    env = {**os.environ, "FLEETGATE_ADMIN_TOKEN": ADMIN_TOKEN, "FLEETGATE_ADMIN_URL":
           gw.admin_url}
    out = subprocess.run([sys.executable, "-m", "fleetgate.cli", "killlog"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if "/v1/chat/completions" in x)
    assert f"{llm['tokens']['output']} out tokens (estimated)" in line, line
    d = gw.wait_for_decision(lambda d: d.get("path") == "/v1/chat/completions")
    assert d["llm"]["tokens"]["output"] == llm["tokens"]["output"], d


def test_status_prints_a_table_and_raw_json(kill_gateway: Gateway, kill_upstream: Upstream
                                            ) -> None:
    gw, up = kill_gateway, kill_upstream
    # a trigger escalates (runaway-loop: identical requests), an operator pauses a role for 10m
    with gw.client(token("loop-st", role="network", session_id="s-st")) as c:
        codes = [c.post(up.url + "/loop", json={"same": 1}).status_code for _ in range(7)]
    assert 429 in codes, codes
    r = gw.admin("/v1/actions", {"verb": "pause", "scope": "role:cloud", "reason": "maintenance",
                                 "by": "alice", "for": 600})
    assert r.status_code == 200, r.text
    env = {**os.environ, "FLEETGATE_ADMIN_TOKEN": ADMIN_TOKEN, "FLEETGATE_ADMIN_URL":
           gw.admin_url}
    cli = [sys.executable, "-m", "fleetgate.cli", "status"]
    raw = subprocess.run([*cli, "--json"], env=env, capture_output=True, text=True, timeout=30)
    assert raw.returncode == 0, raw.stderr
    payload = json.loads(raw.stdout)
    assert {"actions", "sessions", "live_flows", "bound_tunnels", "triggers"} <= set(payload)
    out = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "{" not in text and "'" not in text, text  # no Python or JSON reprs
    lines = text.splitlines()
    assert lines[0].startswith("2 action(s) in force;"), text
    header = lines[lines.index("ACTIONS IN FORCE") + 1].split()
    assert header == ["ID", "ACTION", "SCOPE", "BY", "SOURCE", "SINCE", "EXPIRES", "REASON"]
    pause = next(line for line in lines if "role:cloud" in line)
    assert "pause" in pause and "alice" in pause and "maintenance" in pause
    assert " in 9m5" in pause or " in 10m00s" in pause, pause
    throttle = next(line for line in lines if "agent:loop-st" in line)
    assert "throttle 1/30s" in throttle and "trigger:runaway-loop" in throttle, throttle
    trig = lines[lines.index("TRIGGERS") + 1:]
    assert trig[0].split() == ["TRIGGER", "METRIC", "PER", "KEY", "STATE", "VALUE", "ABOVE",
                               "SINCE"]
    assert any("runaway-loop" in t and "throttle (step 1)" in t for t in trig), text
    # piped into a reader that stops early: no traceback
    head = subprocess.run(f"{sys.executable} -m fleetgate.cli killlog --limit 1000 | head -1",
                          shell=True, env=env, capture_output=True, text=True, timeout=30)
    assert "Traceback" not in head.stderr and "BrokenPipe" not in head.stderr, head.stderr


# -- websockets -----------------------------------------------------------------------------

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_ticker(h: BaseHTTPRequestHandler, seen: Seen) -> None:
    """A websocket server (RFC 6455 via wsproto) that sends a text frame every 50 ms."""
    import base64
    import hashlib

    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import TextMessage

    key = seen.headers["sec-websocket-key"]
    accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
    h.wfile.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").encode())
    h.wfile.flush()
    conn = Connection(ConnectionType.SERVER)
    try:
        for i in range(600):
            h.wfile.write(conn.send(TextMessage(data=f"tick {i}")))
            h.wfile.flush()
            time.sleep(0.05)
    except OSError:
        pass
    h.close_connection = True


def ws_client(gw: Gateway, up: Upstream, tok: str, state: dict[str, Any]) -> None:
    """An agent's websocket through the proxy: CONNECT, TLS with the gateway's CA, wsproto."""
    import base64
    import socket

    from wsproto import WSConnection
    from wsproto.connection import ConnectionType
    from wsproto.events import AcceptConnection, Request, TextMessage

    stop: threading.Event = state["stop"]
    raw = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    sock: Any = raw
    try:
        auth = base64.b64encode(f"agent:{tok}".encode()).decode()
        raw.sendall(f"CONNECT 127.0.0.1:{up.port} HTTP/1.1\r\nHost: 127.0.0.1:{up.port}\r\n"
                    f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
        assert b" 200 " in raw.recv(4096)
        sock = ssl_context(gw.ca_cert).wrap_socket(raw, server_hostname="127.0.0.1")
        sock.settimeout(0.2)
        ws = WSConnection(ConnectionType.CLIENT)
        sock.sendall(ws.send(Request(host=f"127.0.0.1:{up.port}", target="/ws")))
        while not stop.is_set():
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                break
            ws.receive_data(data)
            for ev in ws.events():
                if isinstance(ev, AcceptConnection):
                    state["open"] = True
                elif isinstance(ev, TextMessage):
                    state["messages"] = state.get("messages", 0) + 1
        else:
            return  # the test is over: no "ended"
    except OSError as exc:
        state["error"] = repr(exc)
    finally:
        sock.close()
    state["ended"] = time.monotonic()


def test_a_stop_cuts_an_open_websocket(kill_gateway: Gateway, kill_upstream: Upstream) -> None:
    gw, up = kill_gateway, kill_upstream
    up.route("/ws", ws_ticker)
    states: dict[str, dict[str, Any]] = {"rogue": {"stop": threading.Event()},
                                         "calm": {"stop": threading.Event()}}
    threads = [threading.Thread(target=ws_client, daemon=True, args=(
        gw, up, token(f"{name}-ws", role="cloud", session_id=f"s-{name}"), states[name]))
        for name in states]
    for t in threads:
        t.start()
    assert wait_until(lambda: all(s.get("messages", 0) >= 3 for s in states.values()), 10), states
    sent = time.monotonic()
    r = gw.admin("/v1/actions", {"verb": "stop", "scope": "agent:rogue-ws", "reason": "ws test"})
    assert r.status_code == 200 and any(c.get("path") == "/ws" for c in r.json()["cut"])
    # cut within 2 s of the command
    assert wait_until(lambda: "ended" in states["rogue"], sent + 2.0 - time.monotonic()), \
        "the websocket was not cut"
    calm_before = states["calm"]["messages"]
    assert wait_until(lambda: states["calm"]["messages"] > calm_before + 3, 5)
    assert "ended" not in states["calm"]  # the other agent's websocket is untouched
    cut = [row for row in gw.admin("/v1/log").json()["log"]
           if row["event"] == "cut" and row.get("path") == "/ws"]
    assert cut and cut[0]["phase"].startswith("websocket open (")
    for st in states.values():
        st["stop"].set()
    for t in threads:
        t.join(5)
