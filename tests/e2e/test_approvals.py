"""Human approval end to end (seed 004's tiers), through a real mitmdump.

Agents are the official ``openai`` SDK and the ``mcp`` SDK client, reaching their upstreams by
name (``api.openai.com``, ``up<port>.fleetgate.test``); people are operators with personal
admin tokens, deciding through the CLI and the admin API. The upstreams count what they
received: "exactly once" and "never forwarded" are read there, not from the gateway.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trustme
from conftest import GatewayFactory
from llm_upstream import install, llm_rules_extra
from mcp.shared.exceptions import MCPError
from mcp_client import call_tool
from mcp_upstream import McpUpstream

from harness import Gateway, Upstream, ssl_context, token, upstream_name, wait_until, write_rules

pytestmark = pytest.mark.e2e

OPERATORS = {"alice": ["oncall"], "bob": ["security"], "carol": ["oncall"], "dave": ["leads"]}
WEBHOOK_SECRET = b"webhook-secret-0123456789abcdef"


def op_token(name: str) -> str:
    return f"{name}-personal-token-0123456789"


def approvals_top(hold: str, window: str = "24h") -> str:
    return f"""
approvals:
- id: read-only
  when: 'request.method == "GET"'
  approvers: 0
- id: llm-big-model
  when: 'llm.is_llm && llm.model == "gpt-4o"'
  approvers: 1
  approvedBy: [group:oncall]
  hold: {hold}
  window: {window}
  reason: gpt-4o calls need a human
- id: infrastructure
  when: 'mcp.method == "tools/call" && mcp.tool.name.startsWith("terraform")'
  approvers: 2
  approvedBy: [group:oncall]
  secondary: [group:security]
  escalateTo: [group:leads]
  hold: {hold}
  window: {window}
  reason: infrastructure changes need a human and a secondary review
- id: external-comms
  when: 'request.path.startsWith("/send")'
  approvers: 1
  hold: {hold}
  window: {window}
"""


class Webhook:
    """A chat webhook on 127.0.0.1: records signed deliveries; the first ``fail`` answer 500."""

    def __init__(self, fail: int = 0) -> None:
        self.events: list[tuple[dict[str, str], bytes]] = []
        self.fail = fail
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if owner.fail > 0:
                    owner.fail -= 1
                    self.send_response(500)
                    self.end_headers()
                    return
                owner.events.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, event: str) -> list[dict[str, Any]]:
        return [json.loads(b) for _, b in self.events
                if json.loads(b)["fleetgate"]["event"] == event]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook(fail=1)  # the first delivery fails: retried with backoff
    yield hook
    hook.stop()


@pytest.fixture
def llm(upstream_ca: trustme.CA) -> Iterator[Upstream]:
    up = Upstream(upstream_ca, names=("api.openai.com",))
    install(up)
    yield up
    up.stop()


@pytest.fixture
def mcp_server(upstream_ca: trustme.CA) -> Iterator[McpUpstream]:
    with McpUpstream(upstream_ca, "streamable-json") as up:
        yield up


def rules(path: Path, llm: Upstream, mcp: McpUpstream, hold: str, window: str = "24h") -> Path:
    mcp_top = f"""
mcp:
  servers:
  - name: infra
    hosts: ["{mcp.name}:{mcp.port}"]
    mcpAuthorization:
      rules:
      - 'jwt.agent_role == "tester"'
"""
    return write_rules(path, [llm.port, mcp.port], hosts=["api.openai.com:443"],
                       top=llm_rules_extra(llm.port) + mcp_top + approvals_top(hold, window))


@pytest.fixture
def start(make_gateway: GatewayFactory, tmp_path: Path, llm: Upstream, mcp_server: McpUpstream,
          webhook: Webhook):  # type: ignore[no-untyped-def]
    users = tmp_path / "operators.yaml"
    users.write_text(json.dumps({"operators": [
        {"name": n, "groups": g, "tokenSha256": hashlib.sha256(op_token(n).encode()).hexdigest()}
        for n, g in OPERATORS.items()]}))
    secret = tmp_path / "webhook.secret"
    secret.write_bytes(WEBHOOK_SECRET)
    state = tmp_path / "state"

    def make(hold: str = "10s", window: str = "24h", **options: str) -> Gateway:
        path = rules(tmp_path / "rules.yaml", llm, mcp_server, hold, window)
        return make_gateway(path, fleetgate_admin_users_file=str(users),
                            fleetgate_state_dir=str(state),
                            fleetgate_approval_webhook=f"http://127.0.0.1:{webhook.port}/hook",
                            fleetgate_approval_webhook_secret_file=str(secret),
                            fleetgate_approval_sweep="0.5", **options)
    return make


_open: list[openai.OpenAI | httpx.Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def agent_http(gw: Gateway, sub: str = "writer-1") -> httpx.Client:
    client = httpx.Client(proxy=gw.proxy_url(token(sub)), verify=ssl_context(gw.ca_cert),
                          timeout=30)
    _open.append(client)
    return client


def agent_openai(gw: Gateway, sub: str = "writer-1") -> openai.OpenAI:
    client = openai.OpenAI(api_key="sk-test", max_retries=0, http_client=agent_http(gw, sub))
    _open.append(client)
    return client


def chat(client: openai.OpenAI, model: str = "gpt-4o") -> Any:
    return client.chat.completions.create(model=model, max_tokens=5,
                                          messages=[{"role": "user", "content": "deploy it"}])


def pending(gw: Gateway, n: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def ready() -> bool:
        found[:] = gw.admin("/v1/approvals?status=pending").json()["approvals"]
        return len(found) >= n
    assert wait_until(ready, timeout), f"no {n} pending approvals: {found}"
    return found


def act(gw: Gateway, who: str, verb: str, approval_id: str, **body: Any) -> httpx.Response:
    return gw.admin(f"/v1/approvals/{verb}", {"id": approval_id, **body}, token=op_token(who))


def cli(gw: Gateway, who: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetgate.cli", "approvals", *args, "--admin", gw.admin_url],
        env={**os.environ, "FLEETGATE_ADMIN_TOKEN": op_token(who)},
        capture_output=True, text=True, timeout=60)


def chat_calls(llm: Upstream) -> int:
    return sum(1 for s in llm.seen if s.path.endswith("/chat/completions"))


def in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_an_openai_call_is_held_approved_from_the_cli_and_completes(start, llm: Upstream) -> None:
    gw = start(hold="20s")
    client = agent_openai(gw)
    t, out = in_thread(lambda: chat(client))
    [a] = pending(gw)
    assert a["tier"] == "llm-big-model" and a["agent"] == "writer-1"
    assert a["action"]["model"] == "gpt-4o" and a["action"]["kind"] == "llm"
    assert chat_calls(llm) == 0  # held: not forwarded
    shown = cli(gw, "alice", "list")
    assert a["id"] in shown.stdout and "llm-big-model" in shown.stdout, shown
    # bob is not in group oncall: refused, the call stays held
    refused = cli(gw, "bob", "approve", a["id"])
    assert refused.returncode != 0 and "may not approve" in refused.stderr
    done = cli(gw, "alice", "approve", a["id"], "--note", "looks fine")
    assert done.returncode == 0 and "approved" in done.stdout, done
    t.join(20)
    assert "error" not in out, out
    assert out["value"].choices[0].message.content
    assert chat_calls(llm) == 1
    rec = gw.wait_for_decision(lambda d: d.get("approval", {}).get("id") == a["id"]
                               and d.get("status") == 200)
    assert rec["approval"]["status"] == "approved" and rec["approval"]["by"] == ["alice"]
    events = [d.get("event") for d in gw.decisions() if d.get("approval_id") == a["id"]]
    assert events[:3] == ["approval.requested", "approval.approved", "approval.consumed"]
    assert wait_until(lambda: "approval.outcome" in [
        d.get("event") for d in gw.decisions() if d.get("approval_id") == a["id"]])


def test_a_call_not_decided_in_time_is_queued_and_its_retry_passes_exactly_once(
        start, llm: Upstream) -> None:
    gw = start(hold="1s")
    client = agent_openai(gw)
    with pytest.raises(openai.PermissionDeniedError) as exc:
        chat(client)
    approval_id = exc.value.response.headers["fleetgate-approval-id"]
    body = exc.value.response.json()["fleetgate"]
    assert body["approval_id"] == approval_id and body["tier"] == "llm-big-model"
    assert body["rule"] == "approvals.pending" and body["retry_after"] >= 1
    assert "needs human approval" in str(exc.value) and approval_id in str(exc.value)
    assert exc.value.response.headers["retry-after"]
    assert chat_calls(llm) == 0
    # asking again before anyone decided joins the same approval (no second request)
    with pytest.raises(openai.PermissionDeniedError) as again:
        chat(client)
    assert again.value.response.headers["fleetgate-approval-id"] == approval_id
    assert len(pending(gw)) == 1
    assert act(gw, "carol", "approve", approval_id).json()["status"] == "approved"
    assert chat(client).choices  # the retry: forwarded, once
    assert chat_calls(llm) == 1
    with pytest.raises(openai.PermissionDeniedError) as third:  # used: a new approval
        chat(client)
    assert third.value.response.headers["fleetgate-approval-id"] != approval_id
    assert chat_calls(llm) == 1


def test_an_mcp_tool_call_needs_two_distinct_people(start, mcp_server: McpUpstream) -> None:
    gw = start(hold="20s")
    agent = {"proxy": gw.proxy_url(token("ops-1")), "ca": gw.ca_cert}
    t, out = in_thread(lambda: call_tool(mcp_server.url, "streamable-json", "terraform_apply",
                                         {"workspace": "prod"}, list_first=False,
                                         timeout=30, **agent))
    [a] = pending(gw)
    assert a["action"]["tool"] == "terraform_apply" and a["action"]["arguments"] == {
        "workspace": "prod"}
    assert a["needed"] == 2
    first = cli(gw, "alice", "approve", a["id"])  # from the CLI, while the call is held
    assert first.returncode == 0 and "1 of 2" in first.stdout and "another person" in first.stdout
    twice = cli(gw, "alice", "approve", a["id"])
    assert twice.returncode != 0 and "distinct" in twice.stderr
    wrong = act(gw, "carol", "approve", a["id"])  # oncall, not the secondary (security)
    assert wrong.status_code == 400 and "secondary" in wrong.json()["error"]
    time.sleep(0.5)
    assert mcp_server.call_names() == []  # one approval is not enough
    second = cli(gw, "bob", "approve", a["id"])
    assert second.returncode == 0 and "approved (alice, bob)" in second.stdout, second
    t.join(30)
    assert "error" not in out, out
    assert not out["value"].is_error
    assert mcp_server.call_names() == ["terraform_apply"]


def test_a_denial_is_final_and_says_who_and_why(start, mcp_server: McpUpstream) -> None:
    gw = start(hold="1s")
    agent = {"proxy": gw.proxy_url(token("ops-1")), "ca": gw.ca_cert}

    def attempt() -> MCPError:
        with pytest.raises(BaseException) as exc:
            call_tool(mcp_server.url, "streamable-json", "terraform_apply", {"workspace": "prod"},
                      list_first=False, timeout=30, **agent)
        err = exc.value
        while isinstance(err, BaseExceptionGroup):
            err = err.exceptions[0]
        assert isinstance(err, MCPError), repr(err)
        return err

    held = attempt()
    assert "needs human approval" in str(held) and "infrastructure" in str(held)
    [a] = pending(gw)
    denied = act(gw, "alice", "deny", a["id"], reason="no prod changes on Friday")
    assert denied.json()["status"] == "denied"
    final = attempt()
    assert "alice denied" in str(final) and "no prod changes on Friday" in str(final)
    assert act(gw, "bob", "approve", a["id"]).status_code == 400  # nothing to approve any more
    assert attempt().error.data["rule"] == "approvals.denied"
    assert mcp_server.call_names() == []


def test_the_queue_survives_a_restart(start, llm: Upstream) -> None:
    gw = start(hold="1s")
    with pytest.raises(openai.PermissionDeniedError) as exc:
        chat(agent_openai(gw))
    approval_id = exc.value.response.headers["fleetgate-approval-id"]
    gw.stop()
    gw2 = start(hold="1s")
    assert [a["id"] for a in pending(gw2)] == [approval_id]
    act(gw2, "alice", "approve", approval_id)
    assert chat(agent_openai(gw2)).choices
    assert chat_calls(llm) == 1


def test_an_approval_id_for_another_action_is_refused(start, llm: Upstream) -> None:
    gw = start(hold="1s")
    client = agent_openai(gw)
    with pytest.raises(openai.PermissionDeniedError) as exc:
        chat(client)
    approval_id = exc.value.response.headers["fleetgate-approval-id"]
    act(gw, "alice", "approve", approval_id)
    other = agent_http(gw)
    r = other.post("https://api.openai.com/v1/chat/completions",
                   headers={"Fleetgate-Approval": approval_id, "Authorization": "Bearer sk-test"},
                   json={"model": "gpt-4o", "max_tokens": 5000,
                         "messages": [{"role": "user", "content": "something else"}]})
    assert r.status_code == 403 and r.json()["fleetgate"]["rule"] == "approvals.mismatch"
    assert chat_calls(llm) == 0
    r = other.post(f"https://{upstream_name(llm.port)}:{llm.port}/send", json={"to": "x"})
    assert r.status_code == 403 and r.json()["fleetgate"]["rule"] == "approvals.pending"


def test_webhook_events_are_signed_retried_and_escalate(start, webhook: Webhook) -> None:
    gw = start(hold="0s", window="2s")
    client = agent_openai(gw)
    with pytest.raises(openai.PermissionDeniedError):
        chat(client)
    assert wait_until(lambda: webhook.of("approval.requested"), 10)
    [body] = webhook.of("approval.requested")
    assert body["text"].startswith("[fleetgate] writer-1") and body["blocks"]
    assert body["fleetgate"]["approval"]["tier"] == "llm-big-model"
    for headers, raw in webhook.events:
        t, _, mac = headers["x-fleetgate-signature"].partition(",v1=")
        ts = int(t.removeprefix("t="))
        expect = hmac.new(WEBHOOK_SECRET, f"{ts}.".encode() + raw, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(mac, expect)
        assert abs(time.time() - ts) < 60
    assert int(webhook.events[0][0]["x-fleetgate-attempt"]) == 2  # the first one got a 500
    # nobody answers within the 2 s window: escalated (notified again), still queued
    assert wait_until(lambda: webhook.of("approval.escalated"), 15)
    [a] = pending(gw)
    assert a["escalations"] >= 1 and a["status"] == "pending"
    # after the escalation, escalateTo (group leads) may decide the infrastructure tier; for
    # this tier (no escalateTo) only oncall may
    assert act(gw, "dave", "approve", a["id"]).status_code == 400
    assert act(gw, "alice", "approve", a["id"]).json()["status"] == "approved"
    assert wait_until(lambda: webhook.of("approval.approved"), 10)
    assert 'fleetgate_approvals_total{event="escalated",tier="llm-big-model"}' in gw.metrics()


def test_replicas_share_one_queue_and_an_approval_passes_once_fleet_wide(
        start, llm: Upstream, redis_server) -> None:  # type: ignore[no-untyped-def]
    a = start(hold="1s", fleetgate_state=redis_server.url)
    b = start(hold="1s", fleetgate_state=redis_server.url)
    with pytest.raises(openai.PermissionDeniedError) as exc:
        chat(agent_openai(a))
    approval_id = exc.value.response.headers["fleetgate-approval-id"]
    # the other replica knows it: the same action through b joins the same approval
    with pytest.raises(openai.PermissionDeniedError) as via_b:
        chat(agent_openai(b))
    assert via_b.value.response.headers["fleetgate-approval-id"] == approval_id
    assert [x["id"] for x in pending(b)] == [approval_id]
    act(b, "alice", "approve", approval_id)
    # two retries at once, one per replica: exactly one is forwarded
    results = [in_thread(lambda gw=gw: chat(agent_openai(gw))) for gw in (a, b)]
    for t, _ in results:
        t.join(30)
    outcomes = sorted("ok" if "value" in out else type(out["error"]).__name__
                      for _, out in results)
    assert outcomes == ["PermissionDeniedError", "ok"], outcomes
    assert chat_calls(llm) == 1
    record = a.admin(f"/v1/approvals/{approval_id}").json()
    assert record["status"] == "consumed" and record["consumed_by_decision"]


def test_stopping_an_agent_ends_its_held_request_and_keeps_the_action_queued(
        start, llm: Upstream) -> None:
    gw = start(hold="30s")
    client = agent_openai(gw, sub="rogue-1")
    t, out = in_thread(lambda: chat(client))
    [a] = pending(gw)
    started = time.monotonic()
    r = gw.admin("/v1/actions", {"verb": "stop", "scope": "agent:rogue-1",
                                 "reason": "went rogue while waiting"})
    assert r.status_code == 200, r.text
    t.join(10)
    assert time.monotonic() - started < 5  # not at the end of the 30 s hold
    err = out.get("error")
    # the stop cuts the agent's connections (its held request with them), or, when the hold
    # saw the stop first, refuses it: either way at once, never forwarded
    assert isinstance(err, openai.APIConnectionError) or (
        isinstance(err, openai.InternalServerError) and "killswitch.stop" in str(err)), err
    assert chat_calls(llm) == 0
    assert [x["id"] for x in pending(gw)] == [a["id"]]  # still queued for people


def test_a_body_too_large_to_hold_is_refused_not_approved_blind(start, llm: Upstream) -> None:
    gw = start(hold="1s")
    r = agent_http(gw).post(f"https://{upstream_name(llm.port)}:{llm.port}/send",
                            content=b"x" * (2 << 20))
    assert r.status_code == 413 and r.json()["fleetgate"]["rule"] == "approvals.body", r.text
    assert not [s for s in llm.seen if s.path == "/send"]
    assert gw.admin("/v1/approvals?status=all").json()["approvals"] == []
    small = agent_http(gw).post(f"https://{upstream_name(llm.port)}:{llm.port}/send",
                                content=b"x" * 1000)
    assert small.status_code == 403 and small.json()["fleetgate"]["rule"] == "approvals.pending"
