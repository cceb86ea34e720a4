"""Rate limits shared by three gateways on one real Redis (issue 17): a bucket is exact across
replicas, token reservations settle fleet-wide, and a Redis that hangs refuses rate-limited
calls (503 ``ratelimit.state``) while unlimited agents go on, until it answers again."""

from __future__ import annotations

import shutil
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import trustme
from conftest import GatewayFactory
from llm_upstream import Control, install, llm_rules_extra
from redisd import RedisServer, Tls

from harness import Gateway, Upstream, ssl_context, token, upstream_name, wait_until, write_rules

REPO = Path(__file__).resolve().parents[2]
WAIT_MS = 500

_open: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


@pytest.fixture
def ctl(upstream: Upstream) -> Control:
    return install(upstream)


def fleet(make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream,
          redis_server: RedisServer, limits: str, n: int = 3, wait_ms: int = WAIT_MS,
          **state: str) -> list[Gateway]:
    """Three gateways sharing ``redis_server``; role ``limited`` has ``limits``, role
    ``tester`` none."""
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(REPO / "rules" / "pricing.yaml", rules / "pricing.yaml")
    port = upstream.port
    extra = f"""
- name: limited
  match: 'jwt.agent_role == "limited"'
  egress: {{hosts: ["{upstream_name(port)}:{port}", "127.0.0.1:{port}"]}}
  authorization: {{rules: [{{allow: 'true'}}]}}
  policies:
{textwrap.indent(textwrap.dedent(limits), "    ")}"""
    write_rules(rules / "llm.yaml", [port], top=llm_rules_extra(port), extra=extra)
    state = state or {"fleetgate_state": redis_server.url}
    return [make_gateway(rules, fleetgate_state_wait_ms=str(wait_ms), **state)
            for _ in range(n)]


def client(gw: Gateway, upstream: Upstream, sub: str, role: str) -> openai.OpenAI:
    http = httpx.Client(proxy=gw.proxy_url(token(sub, role=role)),
                        verify=ssl_context(gw.ca_cert), timeout=20)
    c = openai.OpenAI(base_url=upstream.url + "/v1", api_key="sk-test", max_retries=0,
                      http_client=http)
    _open.append(c)
    return c


def chat(c: openai.OpenAI, **kw: object) -> object:
    return c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                     **kw)  # type: ignore[call-overload]


def calls_upstream(upstream: Upstream) -> int:
    return sum(1 for s in upstream.seen if s.path.endswith("/chat/completions"))


def levels(gw: Gateway) -> dict[tuple[str, str], float]:
    body = httpx.get(f"http://127.0.0.1:{gw.metrics_port}/limits").json()
    return {(b["limit"], b["key"]): b["level"] for b in body["buckets"]}


def test_fifty_requests_over_three_gateways_against_ten_get_exactly_ten_through(
        make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream, ctl: Control,
        redis_server: RedisServer) -> None:
    # exactness, not latency, is judged here: 50 requests at once on a 2-core machine can keep
    # one Redis round trip past the 500 ms the hanging-Redis test needs (a 503 it was not about)
    gws = fleet(make_gateway, tmp_path, upstream, redis_server, """\
        localRateLimit:
          - {id: ten, maxTokens: 10, tokensPerFill: 10, fillInterval: 1h, type: requests}
    """, wait_ms=3000)
    outcomes: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(50)
    clients = [client(gws[i % 3], upstream, "burst-agent", "limited") for i in range(50)]

    def agent(i: int) -> None:
        start.wait()
        try:
            chat(clients[i], max_tokens=10)
            result = "ok"
        except openai.RateLimitError as exc:
            result = "429 ten" if "ten" in str(exc.message) else f"429 {exc.message}"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert outcomes.count("ok") == 10 and outcomes.count("429 ten") == 40, outcomes
    assert calls_upstream(upstream) == 10
    # every replica sees the fleet's bucket, empty
    for gw in gws:
        assert levels(gw)[("ten", "burst-agent")] == 0


def test_a_token_limit_settles_across_replicas(
        make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream, ctl: Control,
        redis_server: RedisServer) -> None:
    gws = fleet(make_gateway, tmp_path, upstream, redis_server, """\
        localRateLimit:
          - {id: tok, maxTokens: 300, tokensPerFill: 300, fillInterval: 1h, type: tokens}
    """)
    # reserves its estimate + 150 of 300; the answer used 23 + 7 = 30: 270 are left
    chat(client(gws[0], upstream, "tok-agent", "limited"), max_tokens=150)
    assert wait_until(lambda: levels(gws[0]).get(("tok", "tok-agent")) == 270, timeout=5)
    # without the settlement a second reservation of the same size would not fit
    chat(client(gws[1], upstream, "tok-agent", "limited"), max_tokens=150)
    assert wait_until(lambda: levels(gws[1]).get(("tok", "tok-agent")) == 240, timeout=5)
    assert wait_until(lambda: 'fleetgate_ratelimit_bucket_level{key="tok-agent",limit="tok"} '
                      '240.0' in gws[1].metrics(), timeout=5)
    rec = gws[1].wait_for_decision(lambda d: d.get("limits") is not None)
    assert rec["limits"][0]["used"] == 30 and rec["limits"][0]["taken"] > 150
    # a reservation bigger than what is left is refused on the third replica
    with pytest.raises(openai.RateLimitError) as info:
        chat(client(gws[2], upstream, "tok-agent", "limited"), max_tokens=250)
    assert "tok" in str(info.value.message) and "240 of 300 tokens left" in str(info.value.message)
    assert calls_upstream(upstream) == 2


def test_a_hanging_redis_refuses_limited_calls_until_it_answers_again(
        make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream, ctl: Control,
        redis_server: RedisServer) -> None:
    gws = fleet(make_gateway, tmp_path, upstream, redis_server, """\
        localRateLimit:
          - {id: many, maxTokens: 1000, tokensPerFill: 1000, fillInterval: 1h, type: requests}
    """)
    limited = [client(gw, upstream, "limited-agent", "limited") for gw in gws]
    free = [client(gw, upstream, "free-agent", "tester") for gw in gws]
    for c in limited:
        chat(c, max_tokens=5)
    redis_server.pause()
    try:
        for gw, c in zip(gws, limited, strict=True):
            began = time.monotonic()
            with pytest.raises(openai.InternalServerError) as info:
                chat(c, max_tokens=5)
            took = time.monotonic() - began
            err = info.value
            assert err.status_code == 503 and err.response.headers["retry-after"] == "5"
            body = err.response.json()
            assert body["fleetgate"]["rule"] == "ratelimit.state"
            assert "rate limit many cannot be enforced" in body["fleetgate"]["reason"]
            assert took < WAIT_MS / 1000 + 1.5  # the bound, not a hang
            assert 'fleetgate_ratelimit_state_refusals_total{limit="many"}' in gw.metrics()
        # an agent no limit governs does not touch Redis: it goes on
        for c in free:
            chat(c, max_tokens=5)
        assert gws[0].ready().json()["state"]["redis"]["ok"] is False
    finally:
        redis_server.resume()
    before = calls_upstream(upstream)

    def passes() -> bool:
        try:
            chat(limited[1], max_tokens=5)
        except openai.APIStatusError:
            return False
        return True
    assert wait_until(passes, timeout=10)  # no restart
    for c in limited:
        chat(c, max_tokens=5)
    assert calls_upstream(upstream) == before + 4
    # 3 before, 4 after; the 3 refused while Redis hung may have been taken when it resumed
    # (the command had reached Redis): a refused call errs strict, never generous
    assert 1000 - 3 - 4 - 3 <= levels(gws[2])[("many", "limited-agent")] <= 1000 - 3 - 4


def test_tls_and_a_password_file(make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream,
                                 ctl: Control, upstream_ca: trustme.CA) -> None:
    """``rediss://`` verified against a private CA (``ssl_ca_certs``), the password from
    ``fleetgate_state_password_file`` (never in the URL): two gateways share one bucket; a
    wrong password keeps a gateway from starting, saying why."""
    cert = upstream_ca.issue_cert("localhost")
    files = tmp_path / "redis-tls"
    files.mkdir()
    tls = Tls(files / "cert.pem", files / "key.pem", files / "ca.pem")
    cert.cert_chain_pems[0].write_to_path(str(tls.cert))
    cert.private_key_pem.write_to_path(str(tls.key))
    upstream_ca.cert_pem.write_to_path(str(tls.ca))
    server = RedisServer(tmp_path / "redis", password="s3cret-tls-pass", tls=tls).start()
    try:
        secret = tmp_path / "redis-password"
        secret.write_text("s3cret-tls-pass\n")
        url = f"rediss://localhost:{server.port}/0?ssl_ca_certs={tls.ca}"
        gws = fleet(make_gateway, tmp_path, upstream, server, """\
            localRateLimit:
              - {id: three, maxTokens: 3, tokensPerFill: 3, fillInterval: 1h, type: requests}
        """, n=2, fleetgate_state=url, fleetgate_state_password_file=str(secret))
        outcomes = []
        for i in range(6):
            try:
                chat(client(gws[i % 2], upstream, "tls-agent", "limited"), max_tokens=10)
                outcomes.append("ok")
            except openai.RateLimitError:
                outcomes.append("429")
        assert outcomes.count("ok") == 3 and outcomes.count("429") == 3, outcomes
        ready = gws[1].ready().json()
        assert ready["state"]["redis"]["ok"] is True, ready
        assert "s3cret" not in str(ready)

        secret.write_text("wrong-password\n")
        bad = make_gateway(tmp_path / "rules", start=False, fleetgate_state=url,
                           fleetgate_state_password_file=str(secret))
        with pytest.raises(Exception, match=r"(?i)password|auth"):
            bad.start()
    finally:
        server.stop()
