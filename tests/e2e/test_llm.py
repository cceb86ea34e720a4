"""End to end: the official openai and anthropic SDKs as agents, through a real mitmdump."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from llm_upstream import ANTHROPIC_USAGE, OPENAI_USAGE, WORDS, Control, install, llm_rules_extra

from fleetgate.llm.tokenizer import count_tokens
from harness import Gateway, Upstream, ssl_context, token, wait_until, write_rules

pytestmark = pytest.mark.e2e


PROVIDERS = ("api.openai.com", "api.anthropic.com")


@pytest.fixture
def upstream(upstream_ca) -> Iterator[Upstream]:
    """The providers' real names: the SDKs run with their default base URLs, as agents do."""
    up = Upstream(upstream_ca, names=PROVIDERS)
    yield up
    up.stop()


@pytest.fixture
def ctl(upstream: Upstream) -> Control:
    return install(upstream)


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def llm_gateway(make_gateway, tmp_path: Path, upstream: Upstream, ctl: Control) -> Gateway:
    """Rules as a directory, as in production: the test policy plus the shipped pricing."""
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(REPO / "rules" / "pricing.yaml", rules / "pricing.yaml")
    write_rules(rules / "llm.yaml", [upstream.port], top=llm_rules_extra(upstream.port),
                hosts=[f"{name}:443" for name in PROVIDERS], extra="""
- name: no-big-gpt
  match: 'jwt.agent_role == "tester"'
  authorization:
    rules:
    - id: no-big-gpt
      deny: 'llm.is_llm && llm.model.startsWith("gpt-4o") && llm.max_tokens > 4000'
      reason: gpt-4o calls are capped at 4000 output tokens
""")
    return make_gateway(rules)


def http_client(gw: Gateway, sub: str) -> httpx.Client:
    return httpx.Client(proxy=gw.proxy_url(token(sub)), verify=ssl_context(gw.ca_cert),
                        timeout=20)


_open: list[openai.OpenAI | anthropic.Anthropic] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def openai_client(gw: Gateway, upstream: Upstream, sub: str = "oa-agent") -> openai.OpenAI:
    # no base_url: https://api.openai.com/v1, which the gateway resolves to the local upstream
    return _track(openai.OpenAI(api_key="sk-test", max_retries=0,
                         http_client=http_client(gw, sub)))


def anthropic_client(gw: Gateway, upstream: Upstream,
                     sub: str = "an-agent") -> anthropic.Anthropic:
    # The anthropic SDK brings its own HTTP stack (httpx2); configure it like an agent pod:
    # the gateway as proxy with the JWT in the URL, the gateway's CA trusted.
    http = anthropic.DefaultHttpxClient(proxy=gw.proxy_url(token(sub)),
                                        verify=ssl_context(gw.ca_cert), timeout=20)
    return _track(anthropic.Anthropic(api_key="sk-ant-test",
                                      max_retries=0, http_client=http))


def _track[C: (openai.OpenAI, anthropic.Anthropic)](client: C) -> C:
    _open.append(client)
    return client


def llm_decision(gw: Gateway, agent: str) -> dict:
    return gw.wait_for_decision(lambda d: d["agent"] == agent and "llm" in d)["llm"]


def metric(gw: Gateway, name: str, **labels: str) -> float:
    text = gw.metrics()
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} with {labels} in\n{text}")


GPT4O_COST = (13 * 2.50 + 10 * 1.25 + 7 * 10.00) / 1e6  # uncached in, cached in, out
OPUS_COST = (12 * 5.00 + 100 * 0.50 + 3 * 6.25 + 15 * 25.00) / 1e6


def test_openai_sdk_non_streaming_is_counted_exactly(llm_gateway: Gateway,
                                                     upstream: Upstream) -> None:
    with openai_client(llm_gateway, upstream) as client:
        r = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Say hello"}])
    assert r.choices[0].message.content == "".join(WORDS)
    assert r.usage is not None and r.usage.prompt_tokens == OPENAI_USAGE["prompt_tokens"]
    llm = llm_decision(llm_gateway, "oa-agent")
    assert llm["provider"] == "openai" and llm["model"] == "gpt-4o"
    assert llm["tokens"] == {"input": 23, "output": 7, "cache_read": 10, "cache_write": 0,
                             "reasoning": 2, "estimated": False}
    assert llm["cost_usd"] == pytest.approx(GPT4O_COST) and llm["priced"] is True
    labels = {"gen_ai_provider_name": "openai", "gen_ai_request_model": "gpt-4o",
              "agent": "oa-agent"}
    assert metric(llm_gateway, "fleetgate_gen_ai_client_token_usage_total",
                  gen_ai_token_type="input", **labels) == 23
    assert metric(llm_gateway, "fleetgate_gen_ai_client_token_usage_total",
                  gen_ai_token_type="output", **labels) == 7
    assert metric(llm_gateway, "fleetgate_gen_ai_client_token_usage_total",
                  gen_ai_token_type="cache_read", **labels) == 10
    assert metric(llm_gateway, "fleetgate_gen_ai_cost_usd_total",
                  **labels) == pytest.approx(GPT4O_COST)
    usage = httpx.get(f"http://127.0.0.1:{llm_gateway.metrics_port}/usage").json()
    assert usage["agents"]["oa-agent"]["input"] == 23
    assert usage["agents"]["oa-agent"]["cost_usd"] == pytest.approx(GPT4O_COST, abs=1e-6)


def test_openai_sdk_stream_gets_usage_injected_and_counted(llm_gateway: Gateway,
                                                          upstream: Upstream) -> None:
    client = openai_client(llm_gateway, upstream, "oa-stream")
    stream = client.chat.completions.create(
        model="gpt-4o", stream=True, messages=[{"role": "user", "content": "Say hello"}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "".join(WORDS)
    seen = json.loads(upstream.seen[-1].body)
    assert seen["stream_options"] == {"include_usage": True}  # asked for on the agent's behalf
    llm = llm_decision(llm_gateway, "oa-stream")
    assert llm["tokens"]["input"] == 23 and llm["tokens"]["output"] == 7
    assert llm["estimated"] is False


def test_anthropic_sdk_both_modes_counted_with_cache_tokens(llm_gateway: Gateway,
                                                           upstream: Upstream) -> None:
    client = anthropic_client(llm_gateway, upstream)
    msg = client.messages.create(model="claude-opus-4-5-20251101", max_tokens=256,
                                 messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text == "".join(WORDS)
    with client.messages.stream(model="claude-opus-4-5-20251101", max_tokens=256,
                                messages=[{"role": "user", "content": "hi"}]) as s:
        streamed = "".join(s.text_stream)
    assert streamed == "".join(WORDS)
    expected = {"input": 115, "output": 15, "cache_read": 100, "cache_write": 3,
                "reasoning": 0, "estimated": False}
    both = [d["llm"] for d in llm_gateway.decisions() if d["agent"] == "an-agent" and "llm" in d]
    assert wait_until(lambda: len([d for d in llm_gateway.decisions()
                                   if d["agent"] == "an-agent" and "llm" in d]) == 2)
    both = [d["llm"] for d in llm_gateway.decisions() if d["agent"] == "an-agent" and "llm" in d]
    assert [b["tokens"] for b in both] == [expected, expected]
    assert all(b["cost_usd"] == pytest.approx(OPUS_COST) for b in both)
    assert ANTHROPIC_USAGE["cache_read_input_tokens"] == expected["cache_read"]


def test_stream_cut_midway_is_counted_as_estimated(llm_gateway: Gateway, upstream: Upstream,
                                                   ctl: Control) -> None:
    ctl.cut_after = 4  # message_start, block start, ping, one delta, then the upstream drops
    client = anthropic_client(llm_gateway, upstream, "cut-agent")
    with pytest.raises(Exception) as err, \
            client.messages.stream(model="claude-opus-4-5-20251101", max_tokens=256,
                                   messages=[{"role": "user", "content": "hi"}]) as s:
        for _ in s.text_stream:
            pass
    assert "incomplete" in str(err.value).lower() or "closed" in str(err.value).lower() \
        or isinstance(err.value, anthropic.APIError), repr(err.value)
    llm = llm_decision(llm_gateway, "cut-agent")
    assert llm["estimated"] is True and llm["outcome"] == "cut"
    assert llm["tokens"]["input"] == 115  # reported in message_start before the cut
    assert llm["tokens"]["output"] == max(1, count_tokens(WORDS[0]))


def test_first_event_reaches_the_agent_before_the_upstream_finishes(
        llm_gateway: Gateway, upstream: Upstream, ctl: Control) -> None:
    ctl.hold_after_first = True  # the upstream sends nothing more until we release it
    client = openai_client(llm_gateway, upstream, "ttft-agent")
    first_seen: list[float] = []

    def release_later() -> None:
        if not wait_until(lambda: bool(first_seen), 8):
            ctl.release_after_first.set()

    t = threading.Thread(target=release_later)
    t.start()
    stream = client.chat.completions.create(model="gpt-4o", stream=True,
                                            messages=[{"role": "user", "content": "x"}])
    for _chunk in stream:
        if not first_seen:
            first_seen.append(time.monotonic())
            assert ctl.finished_at is None  # the upstream is still holding the rest back
            ctl.release_after_first.set()
    t.join()
    assert ctl.first_sent_at is not None and first_seen[0] - ctl.first_sent_at < 1.0


def test_llm_rules_see_the_request_facts(llm_gateway: Gateway, upstream: Upstream) -> None:
    with openai_client(llm_gateway, upstream, "big-agent") as client:
        with pytest.raises(openai.PermissionDeniedError) as err:
            client.chat.completions.create(model="gpt-4o", max_tokens=8000,
                                           messages=[{"role": "user", "content": "x"}])
        small = client.chat.completions.create(model="gpt-4o", max_tokens=100,
                                               messages=[{"role": "user", "content": "x"}])
    assert "capped at 4000" in str(err.value)
    assert all(json.loads(s.body or b"{}").get("max_tokens") != 8000 for s in upstream.seen)
    assert small.choices


def test_unreadable_llm_bodies_are_refused_not_forwarded(llm_gateway: Gateway,
                                                         upstream: Upstream) -> None:
    url = upstream.url + "/v1/chat/completions"
    with http_client(llm_gateway, "body-agent") as c:
        dup = c.post(url, content=b'{"model": "gpt-4o", "model": "gpt-4o-mini", "messages": []}',
                     headers={"content-type": "application/json"})
        not_json = c.post(url, content=b"model=gpt-4o", headers={"content-type": "text/plain"})
        bomb = c.post(url, content=gzip.compress(b" " * (20 * 1024 * 1024)),
                      headers={"content-type": "application/json", "content-encoding": "gzip"})
        ok = c.post(url, content=gzip.compress(json.dumps(
            {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()),
            headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert dup.status_code == 400 and "duplicate JSON key" in dup.json()["error"]["message"]
    assert not_json.status_code == 400
    assert bomb.status_code == 413
    assert ok.status_code == 200
    assert len(upstream.seen) == 1  # only the readable gzip body reached the provider


def test_unknown_model_is_counted_as_unpriced_not_free(llm_gateway: Gateway,
                                                       upstream: Upstream) -> None:
    client = anthropic_client(llm_gateway, upstream, "new-model-agent")
    client.messages.create(model="claude-nobody-prices-9", max_tokens=64,
                           messages=[{"role": "user", "content": "hi"}])
    llm = llm_decision(llm_gateway, "new-model-agent")
    assert llm["tokens"]["input"] == 115 and llm["cost_usd"] is None and llm["priced"] is False
    assert metric(llm_gateway, "fleetgate_gen_ai_calls_total", agent="new-model-agent",
                  priced="false", usage="reported") == 1


def test_model_newer_than_the_rules_is_priced_by_the_shipped_list(llm_gateway: Gateway,
                                                                  upstream: Upstream) -> None:
    """rules/pricing.yaml names no claude-opus-4-6; llm.pricing.source: litellm prices it."""
    client = anthropic_client(llm_gateway, upstream, "listed-model-agent")
    client.messages.create(model="claude-opus-4-6", max_tokens=64,
                           messages=[{"role": "user", "content": "hi"}])
    llm = llm_decision(llm_gateway, "listed-model-agent")
    # ANTHROPIC_USAGE at the list's 5 / 25 / 0.50 (cache read) / 6.25 (cache write) per MTok
    assert llm["priced"] is True
    assert llm["cost_usd"] == pytest.approx((12 * 5 + 100 * 0.5 + 3 * 6.25 + 15 * 25) / 1e6)
