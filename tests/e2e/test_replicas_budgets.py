"""Budgets shared by three gateways through one Redis (issue 17): concurrent calls spread over
the replicas cannot together pass a hard budget; a replica killed mid-call has its
reservation charged once, by another replica's sweep, after it expires; Redis down refuses
budgeted calls (503 budget.state naming the budget) and lets unbudgeted ones through, and
Redis back admits again without a restart."""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from conftest import GatewayFactory
from llm_upstream import Control, install, llm_rules_extra
from redisd import RedisServer

from harness import Gateway, Upstream, ssl_context, token, wait_until, write_rules

REPO = Path(__file__).resolve().parents[2]
RESPONSE_BOUND = 3  # fleetgate_upstream_response_timeout: a reservation expires 5 s after it
COST = 0.000115  # one call's metered cost (30 tokens of gpt-4o at list price)
USED = 30  # one call's metered tokens

_open: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


@pytest.fixture
def ctl(upstream: Upstream) -> Control:
    return install(upstream)


def client(gw: Gateway, upstream: Upstream, sub: str, role: str) -> openai.OpenAI:
    http = httpx.Client(proxy=gw.proxy_url(token(sub, role=role)), verify=ssl_context(gw.ca_cert),
                        timeout=30)
    c = openai.OpenAI(base_url=upstream.url + "/v1", api_key="sk-test", max_retries=0,
                      http_client=http)
    _open.append(c)
    return c


def chat(c: openai.OpenAI) -> object:
    return c.chat.completions.create(model="gpt-4o", max_tokens=100,
                                     messages=[{"role": "user", "content": "hi"}])


def rules_text(upstream: Upstream, budgets: str) -> str:
    return llm_rules_extra(upstream.port) + budgets


def replicas(make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream,
             redis_server: RedisServer, budgets: str, n: int = 3) -> tuple[list[Gateway], Path]:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    shutil.copy(REPO / "rules" / "pricing.yaml", rules / "pricing.yaml")
    path = write_rules(rules / "llm.yaml", [upstream.port], top=rules_text(upstream, budgets))
    gws = [make_gateway(rules, fleetgate_state=redis_server.url,
                        fleetgate_upstream_response_timeout=str(RESPONSE_BOUND)) for _ in range(n)]
    return gws, path


def reload(gws: list[Gateway], path: Path, upstream: Upstream, budgets: str) -> None:
    revisions = [gw.ready().json()["revision"] for gw in gws]
    write_rules(path, [upstream.port], top=rules_text(upstream, budgets))
    for gw, rev in zip(gws, revisions, strict=True):
        assert wait_until(lambda gw=gw, rev=rev: gw.ready().json()["revision"] != rev, timeout=10)


def spend(gw: Gateway, budget: str) -> list[dict[str, Any]]:
    report = httpx.get(f"http://127.0.0.1:{gw.metrics_port}/budgets", timeout=5).json()
    return next(b for b in report["budgets"] if b["budget"] == budget)["spend"]  # type: ignore[no-any-return]


def metric(gw: Gateway, pattern: str) -> float:
    m = re.search(pattern + r" (\S+)", gw.metrics())
    return float(m.group(1)) if m else 0.0


def one_reservation(gw: Gateway, upstream: Upstream) -> int:
    """Tokens one call reserves (estimate + max_tokens), measured through the gateway."""
    chat(client(gw, upstream, "probe-agent", "tester"))
    return int(gw.wait_for_decision(lambda d: d.get("budgets") is not None)["budgets"][0][
        "reserved_tokens"])


PROBE = """
budgets:
- {id: probe, per: fleet, period: day, tokens: {hard: 100000000}, when: 'jwt.sub == "probe-agent"'}
"""


def test_three_replicas_admit_exactly_what_fits_and_a_killed_ones_call_is_charged_once(
        make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream, ctl: Control,
        redis_server: RedisServer) -> None:
    gws, path = replicas(make_gateway, tmp_path, upstream, redis_server, PROBE)
    one = one_reservation(gws[0], upstream)
    assert one > 100
    n = 4
    hard = n * one + one // 2  # room for N reservations, not N + 1
    reload(gws, path, upstream, PROBE + f"""
- {{id: cap, per: fleet, period: day, tokens: {{hard: {hard}}}, when: 'jwt.sub.startsWith("agent-")'}}
- {{id: roomy, per: fleet, period: day, tokens: {{hard: 100000000}}, when: 'jwt.sub == "crasher"'}}
""")
    # 3N concurrent calls over the three replicas, each held open until all were judged
    ctl.hold_after_first = True
    ctl.hold_timeout = 60
    outcomes: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(3 * n)

    def agent(i: int) -> None:
        cl = client(gws[i % 3], upstream, f"agent-{i}", "tester")
        start.wait()
        try:
            stream = cl.chat.completions.create(model="gpt-4o", stream=True, max_tokens=100,
                                                messages=[{"role": "user", "content": "hi"}])
            with lock:
                outcomes.append("ok")
            for _ in stream:
                pass
        except openai.RateLimitError as exc:
            with lock:
                outcomes.append("429" if "budget cap" in str(exc.message) else str(exc))

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(3 * n)]
    for t in threads:
        t.start()
    assert wait_until(lambda: len(outcomes) == 3 * n, timeout=30)
    ctl.release_after_first.set()
    for t in threads:
        t.join(30)
    assert outcomes.count("ok") == n and outcomes.count("429") == 2 * n, outcomes
    # refusals came from more than one replica: they saw each other's reservations
    assert sum(metric(gw, r'fleetgate_budget_rejections_total\{budget="cap"\}') > 0
               for gw in gws) >= 2
    expected = [{"key": "fleet", "usd": pytest.approx(n * COST, rel=0.01), "tokens": n * USED}]
    assert wait_until(lambda: all(spend(gw, "cap") == expected for gw in gws), timeout=10)
    assert n * USED <= hard
    sync = redis.Redis.from_url(redis_server.url)
    expiry = "{fleetgate}:budget:expiry"
    assert sync.zcard(expiry) == 0  # every reservation settled

    # a replica killed while its call streams: another replica charges the reservation once
    ctl.release_after_first.clear()
    chat(client(gws[0], upstream, "crasher", "tester"))  # settled normally: USED tokens
    assert wait_until(lambda: spend(gws[1], "roomy") == [
        {"key": "fleet", "usd": pytest.approx(COST, rel=0.01), "tokens": USED}], timeout=10)
    errors: list[BaseException] = []

    def doomed() -> None:
        try:
            for _ in client(gws[0], upstream, "crasher", "tester").chat.completions.create(
                    model="gpt-4o", stream=True, max_tokens=100,
                    messages=[{"role": "user", "content": "hi"}]):
                pass
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=doomed)
    t.start()
    assert wait_until(lambda: sync.zcard(expiry) == 1, timeout=10)
    # alive: its replica renews it past the expiry it was given
    time.sleep(RESPONSE_BOUND + 5 + 2)
    assert sync.zcard(expiry) == 1
    assert all(metric(gw, r'fleetgate_budget_lost_in_crash_total\{budget="roomy"\}') == 0
               for gw in gws)
    assert gws[0].proc is not None
    gws[0].proc.kill()
    gws[0].proc.wait(10)
    ctl.release_after_first.set()
    t.join(30)
    assert errors  # the agent saw its connection die
    assert wait_until(lambda: sync.zcard(expiry) == 0, timeout=RESPONSE_BOUND + 5 + 10)
    lost = [metric(gw, r'fleetgate_budget_lost_in_crash_total\{budget="roomy"\}')
            for gw in gws[1:]]
    assert sorted(lost) == [0.0, 1.0]
    sweeper = gws[1 + lost.index(1.0)]
    sweeper.wait_for_output("outcome=lost-in-crash")
    # spend == the settled call + what the lost one reserved, on every survivor, and once:
    time.sleep(2 * 2)  # more sweeps ran, nothing is charged again
    for gw in gws[1:]:
        assert spend(gw, "roomy")[0]["tokens"] == USED + one
    sync.close()


def test_redis_down_refuses_budgeted_calls_and_recovers_without_restart(
        make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream, ctl: Control,
        redis_server: RedisServer) -> None:
    gws, _ = replicas(make_gateway, tmp_path, upstream, redis_server, """
budgets:
- {id: cap, per: agent, period: day, tokens: {hard: 100000000}, when: 'jwt.agent_role == "tester"'}
""", n=2)
    for gw in gws:
        chat(client(gw, upstream, "budgeted", "tester"))
    redis_server.stop()
    for gw in gws:
        with pytest.raises(openai.APIStatusError) as info:
            chat(client(gw, upstream, "budgeted", "tester"))
        assert info.value.status_code == 503
        msg = str(info.value.message)
        assert "budget cap cannot be enforced" in msg and "shared budget state" in msg
        chat(client(gw, upstream, "free", "other"))  # no budget governs it: it passes
    redis_server.start()

    def admitted(gw: Gateway) -> bool:
        try:
            chat(client(gw, upstream, "budgeted", "tester"))
        except openai.APIStatusError:
            return False
        return True
    for gw in gws:
        assert wait_until(lambda gw=gw: admitted(gw), timeout=15)
    # a call is settled in Redis after its answer reached the agent: wait for the last one
    wait_until(lambda: sum(s["tokens"] for s in spend(gws[1], "cap")) >= 4 * USED, timeout=5)
    assert spend(gws[1], "cap") == [{"key": "budgeted", "usd": pytest.approx(4 * COST, rel=0.01),
                                     "tokens": 4 * USED}]
    # /usage on any replica is the fleet's: the agent's calls through both gateways

    def budgeted_calls(gw: Gateway) -> object:
        usage = httpx.get(f"http://127.0.0.1:{gw.metrics_port}/usage", timeout=5).json()
        return usage["agents"].get("budgeted", {}).get("calls")
    assert wait_until(lambda: all(budgeted_calls(gw) == 4 for gw in gws), timeout=5), [
        budgeted_calls(gw) for gw in gws]
