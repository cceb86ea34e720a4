"""Rate limits end to end: the seed's ``localRateLimit`` blocks through a real mitmdump, with
the ``openai`` SDK as the agent against a local OpenAI-compatible upstream."""

from __future__ import annotations

import re
import shutil
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import GatewayFactory
from llm_upstream import WORDS, Control, install, llm_rules_extra

from harness import Gateway, Upstream, ssl_context, token, upstream_name, wait_until, write_rules

REPO = Path(__file__).resolve().parents[2]

# seed 000, verbatim: the three routes' limits
SEED = {
    "security": """\
    localRateLimit:
      - maxTokens: 50000
        tokensPerFill: 50000
        fillInterval: 1m
        type: tokens
      - maxTokens: 20
        tokensPerFill: 20
        fillInterval: 1m
        type: requests
""",
    "cloud": """\
    localRateLimit:
      - maxTokens: 100000
        tokensPerFill: 100000
        fillInterval: 1m
        type: tokens
      - maxTokens: 30
        tokensPerFill: 30
        fillInterval: 1m
        type: requests
""",
    "general": """\
    localRateLimit:
      - maxTokens: 20000
        tokensPerFill: 20000
        fillInterval: 1m
        type: tokens
      - maxTokens: 15
        tokensPerFill: 15
        fillInterval: 1m
        type: requests
""",
}


def profiles(port: int, limits: dict[str, str]) -> str:
    out = ""
    for role, block in limits.items():
        out += f"""
- name: {role}
  match: 'jwt.agent_role == "{role}"'
  egress: {{hosts: ["{upstream_name(port)}:{port}", "127.0.0.1:{port}"]}}
  authorization: {{rules: [{{allow: 'true'}}]}}
  policies:
{textwrap.indent(textwrap.dedent(block), "    ")}"""
    return out


@pytest.fixture
def ctl(upstream: Upstream) -> Control:
    return install(upstream)


def limited_gateway(make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream,
                    limits: dict[str, str]) -> Gateway:
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(REPO / "rules" / "pricing.yaml", rules / "pricing.yaml")
    write_rules(rules / "llm.yaml", [upstream.port], top=llm_rules_extra(upstream.port),
                extra=profiles(upstream.port, limits))
    return make_gateway(rules)


_open: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def client(gw: Gateway, upstream: Upstream, sub: str, role: str) -> openai.OpenAI:
    http = httpx.Client(proxy=gw.proxy_url(token(sub, role=role)), verify=ssl_context(gw.ca_cert),
                        timeout=20)
    c = openai.OpenAI(base_url=upstream.url + "/v1", api_key="sk-test", max_retries=0, http_client=http)
    _open.append(c)
    return c


def chat(c: openai.OpenAI, **kw: object) -> object:
    return c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                     **kw)  # type: ignore[call-overload]


def calls_upstream(upstream: Upstream) -> int:
    return sum(1 for s in upstream.seen if s.path.endswith("/chat/completions"))


def test_the_seed_limits_hold_per_agent(make_gateway: GatewayFactory, tmp_path: Path,
                                        upstream: Upstream, ctl: Control) -> None:
    gw = limited_gateway(make_gateway, tmp_path, upstream, SEED)
    for role, allowed in (("security", 20), ("cloud", 30), ("general", 15)):
        c = client(gw, upstream, f"{role}-1", role)
        for _ in range(allowed):
            chat(c, max_tokens=10)
        with pytest.raises(openai.RateLimitError) as info:
            chat(c, max_tokens=10)
        err = info.value
        assert f"{role}.localRateLimit[1]" in str(err.message)
        assert f"0 of {allowed} requests left" in str(err.message)
        h = err.response.headers
        assert h["x-ratelimit-limit"] == str(allowed) and h["x-ratelimit-remaining"] == "0"
        assert 1 <= int(h["retry-after"]) <= 60 and "x-should-retry" not in h
        # keyed per identity: another agent of the same role has its own bucket
        chat(client(gw, upstream, f"{role}-2", role), max_tokens=10)
    assert calls_upstream(upstream) == 20 + 30 + 15 + 3
    rec = gw.wait_for_decision(lambda d: d["result"] == "deny" and d["rule"] == "general.localRateLimit[1]")
    assert rec["status"] == 429
    assert 'fleetgate_ratelimit_rejections_total{limit="general.localRateLimit[1]"} 1.0' in gw.metrics()


def test_fifty_concurrent_requests_against_ten_get_exactly_ten_through(
        make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream, ctl: Control) -> None:
    ten = {"security": """\
        localRateLimit:
          - {maxTokens: 10, tokensPerFill: 10, fillInterval: 1h, type: requests}
    """}
    gw = limited_gateway(make_gateway, tmp_path, upstream, ten)
    outcomes: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(50)

    def agent(i: int) -> None:
        c = client(gw, upstream, "burst-agent", "security")
        start.wait()
        try:
            chat(c, max_tokens=10)
            result = "ok"
        except openai.RateLimitError:
            result = "429"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes).count("ok") == 10 and outcomes.count("429") == 40
    assert calls_upstream(upstream) == 10


def test_token_limit_reserves_then_settles_to_the_real_usage(
        make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream, ctl: Control) -> None:
    tokens = {"security": """\
        localRateLimit:
          - {id: sec-tokens, maxTokens: 200, tokensPerFill: 200, fillInterval: 1h, type: tokens}
    """}
    gw = limited_gateway(make_gateway, tmp_path, upstream, tokens)
    c = client(gw, upstream, "tok-agent", "security")
    chat(c, max_tokens=150)  # reserves estimate + 150; the answer used 23 + 7 = 30
    levels = httpx.get(f"http://127.0.0.1:{gw.metrics_port}/limits").json()["buckets"]
    [bucket] = [b for b in levels if b["limit"] == "sec-tokens" and b["key"] == "tok-agent"]
    assert bucket["level"] == 200 - 30
    assert 'fleetgate_ratelimit_bucket_level{key="tok-agent",limit="sec-tokens"} 170.0' in gw.metrics()
    rec = gw.wait_for_decision(lambda d: d.get("limits") is not None)
    assert rec["limits"][0]["used"] == 30 and rec["limits"][0]["taken"] > 150
    # a request that could never fit is refused for good: the SDK must not retry it
    with pytest.raises(openai.RateLimitError) as info:
        chat(c, max_tokens=500)
    assert info.value.response.headers["x-should-retry"] == "false"
    assert "can never allow this request" in str(info.value.message)
    assert calls_upstream(upstream) == 1


def test_mcp_tool_calls_per_minute_keyed_by_tool(make_gateway: GatewayFactory, tmp_path: Path,
                                                 upstream: Upstream) -> None:
    from helpers import MCP_RULES, call, calls_seen, mcp_route, post

    upstream.route("/mcp", mcp_route("json"))
    top = MCP_RULES.format(name=upstream.name, port=upstream.port) + """
policies:
  localRateLimit:
  - id: tool-calls
    maxTokens: 2
    tokensPerFill: 2
    fillInterval: 1m
    key: 'jwt.agent_role + "/" + mcp.tool.name'
    when: 'mcp.method == "tools/call"'
"""
    gw = make_gateway(write_rules(tmp_path / "rules.yaml", [upstream.port], top=top))
    for i in range(2):
        assert "result" in post(gw, upstream, call(i, "nmap_scan")).json()
    r = post(gw, upstream, call(7, "nmap_scan"))
    assert r.status_code == 429 and r.headers["retry-after"]
    err = r.json()
    assert err["id"] == 7 and err["error"]["code"] == -32005
    assert "tool-calls" in err["error"]["message"] and err["error"]["data"]["rule"] == "tool-calls"
    # another tool has its own bucket; protocol messages are not limited by this one
    assert "result" in post(gw, upstream, call(8, "trivy_image")).json()
    assert "result" in post(gw, upstream, {"jsonrpc": "2.0", "id": 9, "method": "tools/list"}).json()
    assert calls_seen(upstream).count(("tools/call", "nmap_scan")) == 2


# -- budgets ----------------------------------------------------------------------------


def budget_gateway(make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream, budgets: str,
                   **options: str) -> tuple[Gateway, Path]:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    shutil.copy(REPO / "rules" / "pricing.yaml", rules / "pricing.yaml")
    path = write_rules(rules / "llm.yaml", [upstream.port],
                       top=llm_rules_extra(upstream.port) + budgets)
    return make_gateway(rules, **options), path


def test_fifty_concurrent_calls_cannot_overspend_a_budget(
        make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream, ctl: Control) -> None:
    # how many tokens one call reserves (estimate + max_tokens), measured through the gateway
    gw, rules = budget_gateway(make_gateway, tmp_path, upstream, """
budgets:
- {id: probe, per: fleet, period: day, tokens: {hard: 100000000}}
""")
    c = client(gw, upstream, "probe-agent", "tester")
    chat(c, max_tokens=100)
    reserved = gw.wait_for_decision(lambda d: d.get("budgets") is not None)["budgets"][0]
    one = reserved["reserved_tokens"]
    assert one > 100
    # room for 10 reservations, not 11; every call is held open until all 50 were judged
    revision = gw.ready().json()["revision"]
    write_rules(rules, [upstream.port], top=llm_rules_extra(upstream.port) + f"""
budgets:
- {{id: ten, per: fleet, period: day, tokens: {{hard: {10 * one + one // 2}}}}}
""")
    assert wait_until(lambda: gw.ready().json()["revision"] != revision, timeout=10)
    ctl.hold_after_first = True
    outcomes: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(50)

    def agent(i: int) -> None:
        cl = client(gw, upstream, f"agent-{i}", "tester")
        start.wait()
        try:
            stream = cl.chat.completions.create(
                model="gpt-4o", stream=True, max_tokens=100,
                messages=[{"role": "user", "content": "hi"}])
            with lock:
                outcomes.append("ok")
            for _ in stream:  # held after the first event until every call was judged
                pass
        except openai.RateLimitError:
            with lock:
                outcomes.append("429")

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    assert wait_until(lambda: len(outcomes) == 50, timeout=30)
    ctl.release_after_first.set()
    for t in threads:
        t.join(30)
    assert outcomes.count("ok") == 10 and outcomes.count("429") == 40

    def ten_spend() -> Any:
        spend = httpx.get(f"http://127.0.0.1:{gw.metrics_port}/budgets").json()["budgets"]
        return next(b for b in spend if b["budget"] == "ten")["spend"]
    # settles are written by the spend store's writer thread: the report follows within moments
    expected = [{"key": "fleet", "usd": pytest.approx(10 * 0.000115, rel=0.01), "tokens": 10 * 30}]
    wait_until(lambda: ten_spend() == expected, timeout=5)
    assert ten_spend() == expected


def test_a_hard_budget_holds_across_a_restart_and_soft_limits_warn(
        make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream, ctl: Control) -> None:
    budgets = """
budgets:
- id: daily-usd
  per: agent
  period: day
  usd: {soft: 0.0001, hard: 0.0003}
"""
    state = tmp_path / "state"
    gw, _ = budget_gateway(make_gateway, tmp_path, upstream, budgets, fleetgate_state_dir=str(state))
    c = client(gw, upstream, "spender", "tester")
    chat(c, max_tokens=10)  # ~$0.000115 each (gpt-4o list price)
    gw.wait_for_output("soft budget daily-usd crossed for 'spender'")
    chat(c, max_tokens=10)
    with pytest.raises(openai.RateLimitError) as info:
        chat(c, max_tokens=10)
    msg = str(info.value.message)
    assert "budget daily-usd ($0.0003 per day (UTC)) for 'spender' would be exceeded" in msg
    assert "refills at" in msg and info.value.response.headers["x-should-retry"] == "false"
    metrics = gw.metrics()
    assert 'fleetgate_budget_soft_exceeded_total{budget="daily-usd"} 1.0' in metrics
    remaining = re.search(r'fleetgate_budget_remaining_usd\{budget="daily-usd",key="spender"\} (\S+)',
                          metrics)
    assert remaining and float(remaining.group(1)) == pytest.approx(0.0003 - 2 * 0.000115)
    assert calls_upstream(upstream) == 2
    # another agent has its own budget
    chat(client(gw, upstream, "saver", "tester"), max_tokens=10)
    gw.stop()
    gw2, _ = budget_gateway(make_gateway, tmp_path, upstream, budgets, fleetgate_state_dir=str(state))
    with pytest.raises(openai.RateLimitError):
        chat(client(gw2, upstream, "spender", "tester"), max_tokens=10)
    assert calls_upstream(upstream) == 3
    report = httpx.get(f"http://127.0.0.1:{gw2.metrics_port}/budgets").json()["budgets"][0]
    assert {s["key"] for s in report["spend"]} == {"spender", "saver"}


def test_a_stream_is_cut_where_it_crosses_its_budget(
        make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream, ctl: Control) -> None:
    """The upstream ignores max_tokens (a looping model would): the answer outgrows the
    call's reservation and is ended, with an error event the SDK raises, where the budget's
    hard limit is reached."""
    gw, rules = budget_gateway(make_gateway, tmp_path, upstream, """
budgets:
- {id: probe, per: fleet, period: day, tokens: {hard: 100000000}}
""")
    c = client(gw, upstream, "looper", "tester")
    chat(c, max_tokens=1)
    est_in = gw.wait_for_decision(lambda d: d.get("budgets") is not None)["budgets"][0][
        "reserved_tokens"] - 1
    revision = gw.ready().json()["revision"]
    write_rules(rules, [upstream.port], top=llm_rules_extra(upstream.port) + f"""
budgets:
- {{id: tight, per: agent, period: day, tokens: {{hard: {est_in + 2}}}}}
""")
    assert wait_until(lambda: gw.ready().json()["revision"] != revision, timeout=10)
    received: list[str] = []
    stream = c.chat.completions.create(model="gpt-4o", stream=True, max_tokens=1,
                                       messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.extend(ch.delta.content or "" for ch in chunk.choices)
    assert "fleetgate ended this stream (tight)" in str(info.value.message)
    assert "was reached after 3 output tokens" in str(info.value.message)
    assert 0 < len(received) < len(WORDS)  # cut where it crossed, not at the end
    rec = gw.wait_for_decision(lambda d: d.get("rule") == "tight")
    assert rec["result"] == "deny" and rec["llm"]["outcome"] == "cut"
    assert 'fleetgate_flows_cut_total{rule="tight"} 1.0' in gw.metrics()
