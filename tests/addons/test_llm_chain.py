"""LLM calls through the whole chain under taddons: metering, budgets, streaming.

Covered end to end in tests/e2e/test_llm.py and test_limits.py; here the same behaviour is
pinned at the addon level, through ``pipeline()`` and mitmproxy's hooks only: what the agent
receives, the decision and usage recorded on the flow, and the ledger as ``GET /usage`` shows
it to operators.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from chain import basic, free_port, request_flow, respond, run_request, running_chain, started, tok

from fleetgate.addons.state import decision_of, llm_usage_of

RULES = """apiVersion: fleetgate/v1
llm:
  providers:
  - name: openai
    api: openai
    hosts: ["api.openai.com:443"]
  - name: anthropic
    api: anthropic
    hosts: ["api.anthropic.com:443"]
  pricing:
    models:
      gpt-4o: {input: 2.50, output: 10.00, cacheRead: 1.25}
      claude-sonnet-4-5: {input: 3.00, output: 15.00}
budgets:
- {id: daily-tokens, per: agent, period: day, tokens: {hard: 1000}}
mcp:
  servers:
  - name: tools
    hosts: ["mcp.example.com:443"]
    mcpAuthorization:
      rules:
      - 'mcp.tool.name == "nmap_scan"'
agents:
- name: tester
  match: 'jwt.agent_role == "tester"'
  egress:
    hosts: [api.openai.com, api.anthropic.com, api.example.com, mcp.example.com]
  authorization:
    rules:
    - allow: 'true'
"""

OPENAI_JSON = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-2024-08-06",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 100, "completion_tokens": 850, "total_tokens": 950}}).encode()

ANTHROPIC_SSE = b"".join(
    f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in (
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [], "usage": {"input_tokens": 30, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "hello"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"output_tokens": 12}}),
        ("message_stop", {"type": "message_stop"})))


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[tuple[Any, list[Any]]]:
    with running_chain(tmp_path, RULES) as running:
        yield running


def llm_call(host: str = "api.openai.com", path: str = "/v1/chat/completions",
             sub: str = "agent-7", **body: Any) -> Any:
    f = request_flow(path=path, host=host, method="POST", auth=basic(tok(sub=sub)))
    f.request.headers["Content-Type"] = "application/json"
    f.request.content = json.dumps(body).encode()
    return f


def chat(sub: str = "agent-7", max_tokens: int = 50) -> Any:
    return llm_call(sub=sub, model="gpt-4o", max_tokens=max_tokens,
                    messages=[{"role": "user", "content": "say hi"}])


def usage_of(port: int) -> dict[str, Any]:
    """``GET /usage`` from the chain's metrics listener, as an operator reads the ledger."""
    return dict(httpx.get(f"http://127.0.0.1:{port}/usage", timeout=5).json())


def test_openai_json_usage_is_metered_on_the_flow_and_in_the_ledger(
        chain: tuple[Any, list[Any]]) -> None:
    tctx, addons = chain
    port = free_port()
    tctx.options.update(fleetgate_metrics_listen=f"127.0.0.1:{port}", fleetgate_admin_listen="")
    with started(addons):
        f = chat()
        run_request(addons, f)
        assert f.response is None
        got = respond(addons, f, OPENAI_JSON, {"content-type": "application/json",
                                                "content-length": str(len(OPENAI_JSON))})
        assert got == OPENAI_JSON  # metering never changes the agent's bytes
        usage = llm_usage_of(f)
        assert usage is not None
        assert usage["tokens"]["input"] == 100 and usage["tokens"]["output"] == 850
        assert usage["estimated"] is False
        assert usage["cost_usd"] == pytest.approx((100 * 2.5 + 850 * 10.0) / 1e6)
        mine = usage_of(port)["agents"]["agent-7"]  # the ledger, per agent
        assert (mine["calls"], mine["input"], mine["output"]) == (1, 100, 850)
        assert mine["cost_usd"] == pytest.approx(usage["cost_usd"], abs=1e-6)


def test_anthropic_sse_stream_is_metered_as_it_passes(chain: tuple[Any, list[Any]]) -> None:
    tctx, addons = chain
    port = free_port()
    tctx.options.update(fleetgate_metrics_listen=f"127.0.0.1:{port}", fleetgate_admin_listen="")
    with started(addons):
        f = llm_call(host="api.anthropic.com", path="/v1/messages", sub="agent-sse",
                     model="claude-sonnet-4-5", max_tokens=64, stream=True,
                     messages=[{"role": "user", "content": "hello"}])
        run_request(addons, f)
        assert f.response is None
        got = respond(addons, f, ANTHROPIC_SSE, {"content-type": "text/event-stream",
                                                  "transfer-encoding": "chunked"})
        assert got == ANTHROPIC_SSE  # every event reached the agent, unchanged
        assert f.response.stream  # streamed, never buffered
        usage = llm_usage_of(f)
        assert usage is not None
        assert usage["tokens"]["input"] == 30 and usage["tokens"]["output"] == 12
        assert usage["estimated"] is False
        mine = usage_of(port)["agents"]["agent-sse"]
        assert (mine["calls"], mine["input"], mine["output"]) == (1, 30, 12)


def test_a_budget_records_metered_spend_then_refuses_with_429(
        chain: tuple[Any, list[Any]]) -> None:
    _, addons = chain
    first = chat()
    run_request(addons, first)
    assert first.response is None  # well within 1000 tokens
    respond(addons, first, OPENAI_JSON, {"content-type": "application/json",
                                         "content-length": str(len(OPENAI_JSON))})
    # 950 tokens spent: another call reserving its input + 50 no longer fits
    second = chat()
    run_request(addons, second)
    assert second.response is not None and second.response.status_code == 429
    body = json.loads(second.response.content)
    assert body["fleetgate"]["rule"] == "daily-tokens"
    decision = decision_of(second)
    assert decision is not None
    reason = decision["reason"]
    assert "daily-tokens" in reason and "950" in reason and "refills at" in reason
    assert int(second.response.headers["Retry-After"]) > 0
    # per agent: another agent has its own budget
    other = chat(sub="agent-8")
    run_request(addons, other)
    assert other.response is None


def test_a_budget_without_metered_spend_lets_the_same_calls_through(
        chain: tuple[Any, list[Any]]) -> None:
    """The counterpart: the refusal above comes from the spend recorded, not the call."""
    _, addons = chain
    for _ in range(3):
        f = chat()
        run_request(addons, f)
        assert f.response is None
        small = json.loads(OPENAI_JSON)
        small["usage"] = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        raw = json.dumps(small).encode()
        respond(addons, f, raw, {"content-type": "application/json",
                                 "content-length": str(len(raw))})


def test_an_event_stream_is_streamed_from_responseheaders(chain: tuple[Any, list[Any]]) -> None:
    _, addons = chain
    f = request_flow(path="/events", auth=basic(tok()))
    run_request(addons, f)
    assert f.response is None
    events = b"data: one\n\ndata: two\n\n"
    got = respond(addons, f, events, {"content-type": "text/event-stream",
                                       "transfer-encoding": "chunked"})
    assert f.response.stream  # set in responseheaders, before any byte was read
    assert got == events


def test_a_small_plain_answer_stays_buffered(chain: tuple[Any, list[Any]]) -> None:
    _, addons = chain
    f = request_flow(path="/small", auth=basic(tok()))
    run_request(addons, f)
    body = b'{"ok": true}'
    got = respond(addons, f, body, {"content-type": "application/json",
                                     "content-length": str(len(body))})
    assert not f.response.stream
    assert got == body


def test_an_answer_an_addon_must_read_stays_buffered(chain: tuple[Any, list[Any]]) -> None:
    """An MCP tools/list answer is read whole and filtered, even when it is larger than what
    the streaming addon would otherwise stream."""
    tctx, addons = chain
    tctx.options.update(fleetgate_stream_min_bytes=16)
    f = request_flow(path="/mcp", host="mcp.example.com", method="POST", auth=basic(tok()))
    f.request.headers["Content-Type"] = "application/json"
    f.request.headers["Accept"] = "application/json, text/event-stream"
    f.request.content = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).encode()
    run_request(addons, f)
    assert f.response is None
    tools = [{"name": n, "description": f"{n} does its job", "inputSchema": {"type": "object"}}
             for n in ("nmap_scan", "terraform_apply")]
    answer = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"tools": tools}}).encode()
    got = respond(addons, f, answer, {"content-type": "application/json",
                                      "content-length": str(len(answer))})
    assert not f.response.stream
    listed = [t["name"] for t in json.loads(got)["result"]["tools"]]
    assert listed == ["nmap_scan"]  # read and filtered, not streamed past the guard
