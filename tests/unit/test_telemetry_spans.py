"""The pure span shaping: names, derived ids, attributes, errors, capture, export config."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fleetgate.policy.parse_agents import parse_telemetry
from fleetgate.policy.report import Reporter
from fleetgate.telemetry.capture import answer_text, completion_attributes, mask, prompt_attributes
from fleetgate.telemetry.export import resolve
from fleetgate.telemetry.spans import (
    SessionTally,
    flow_span,
    parse_traceparent,
    session_span,
    session_span_id,
    session_trace_id,
    traceparent,
)


def rec(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "ts": 1000.5, "start_ts": 1000.0, "decision_id": "d1", "result": "allow",
        "rule": "tester.allow", "reason": "", "agent": "a1", "role": "tester",
        "session": "s-1", "user": "alice", "method": "POST", "host": "api.openai.com",
        "port": 443, "path": "/v1/chat/completions", "status": 200, "latency_ms": 500.0}
    base.update(kw)
    return base


def test_an_llm_call_is_named_and_attributed_by_the_genai_conventions() -> None:
    spec = flow_span(rec(llm={"provider": "openai", "operation": "chat", "model": "gpt-4o",
                              "response_model": "gpt-4o-2024-08-06",
                              "tokens": {"input": 12, "output": 30, "cache_read": 4,
                                         "cache_write": 0, "reasoning": 2, "estimated": False},
                              "cost_usd": 0.0004, "ttft_ms": 120.0, "outcome": "ok"}),
                     random_ids=(7, 9))
    a = spec.attributes
    assert spec.name == "chat gpt-4o"
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o"
    assert a["gen_ai.response.model"] == "gpt-4o-2024-08-06"
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (12, 30)
    assert a["gen_ai.usage.cache_read.input_tokens"] == 4
    assert a["gen_ai.usage.reasoning.output_tokens"] == 2
    assert a["fleetgate.cost_usd"] == 0.0004
    assert a["gen_ai.response.time_to_first_chunk"] == pytest.approx(0.12)
    assert a["url.full"] == "https://api.openai.com/v1/chat/completions"
    assert a["fleetgate.agent"] == "a1" and a["user.id"] == "alice"
    assert spec.error is None
    first = next(e for e in spec.events if e.name == "gen_ai.first_chunk")
    assert first.time_ns == spec.start_ns + 120_000_000
    assert (spec.start_ns, spec.end_ns) == (1000_000_000_000, 1000_500_000_000)


def test_a_session_is_a_trace_and_its_calls_hang_under_its_span() -> None:
    spec = flow_span(rec(), random_ids=(7, 9))
    assert spec.trace_id == session_trace_id("s-1")
    assert spec.parent_id == session_span_id("s-1")
    assert spec.span_id == 9
    child = flow_span(rec(session="s-2", parent_session="s-1", root_session="s-1"),
                      random_ids=(7, 10))
    assert child.trace_id == session_trace_id("s-1")  # the family's trace
    assert child.parent_id == session_span_id("s-2")
    lone = flow_span(rec(session=None), random_ids=(7, 11))
    assert (lone.trace_id, lone.parent_id) == (7, None)


def test_session_span_nests_under_the_parent_session_and_carries_totals() -> None:
    tally = SessionTally.first(rec(session="s-2", parent_session="s-1", root_session="s-1",
                                   agent="a1/sec"), 10.0, 11.0)
    tally.add(rec(llm={"tokens": {"input": 5, "output": 7}, "cost_usd": 0.25}), 10.0, 11.0)
    tally.add(rec(result="deny"), 12.0, 13.0)
    spec = session_span(tally)
    assert spec.name == "invoke_agent a1/sec"
    assert spec.span_id == session_span_id("s-2")
    assert spec.parent_id == session_span_id("s-1")
    assert spec.trace_id == session_trace_id("s-1")
    assert (spec.start_ns, spec.end_ns) == (10_000_000_000, 13_000_000_000)
    a = spec.attributes
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (5, 7)
    assert a["fleetgate.cost_usd"] == 0.25
    assert (a["fleetgate.session.calls"], a["fleetgate.session.denied"]) == (2, 1)


def test_derived_ids_differ_per_session_and_are_valid() -> None:
    ids = {session_trace_id(f"s-{i}") for i in range(1000)}
    assert len(ids) == 1000 and all(0 < i < 1 << 128 for i in ids)
    assert session_span_id("s-1") != session_span_id("s-2")
    assert 0 < session_span_id("s-1") < 1 << 64


def test_mcp_calls_follow_the_mcp_conventions() -> None:
    spec = flow_span(rec(path="/mcp", mcp={
        "server": "tools", "transport": "streamable-http", "session": "m-1",
        "calls": [{"method": "tools/call", "target": "nmap_scan", "allow": True,
                   "rule": "r", "reason": ""}], "hidden": [], "hidden_count": 0}),
        random_ids=(1, 2))
    assert spec.name == "tools/call nmap_scan"
    a = spec.attributes
    assert a["mcp.method.name"] == "tools/call" and a["gen_ai.tool.name"] == "nmap_scan"
    assert a["gen_ai.operation.name"] == "execute_tool" and a["mcp.session.id"] == "m-1"
    listing = flow_span(rec(mcp={"calls": [{"method": "tools/list", "target": ""}],
                                 "hidden_count": 3}), random_ids=(1, 2))
    assert listing.name == "tools/list"
    assert listing.attributes["fleetgate.mcp.hidden_count"] == 3


def test_denials_and_cuts_are_errors_naming_the_rule() -> None:
    denied = flow_span(rec(result="deny", rule="no-deletes", reason="needs a human",
                           status=403), random_ids=(1, 2))
    assert denied.error == "denied by no-deletes: needs a human"
    assert denied.attributes["error.type"] == "no-deletes"
    event = next(e for e in denied.events if e.name == "fleetgate.denied")
    assert event.attributes["fleetgate.rule"] == "no-deletes"
    cut = flow_span(rec(result="deny", rule="killswitch.stop", reason="stopped",
                        llm={"operation": "chat", "model": "m", "outcome": "cut"}),
                    random_ids=(1, 2))
    assert cut.error is not None and cut.error.startswith("cut by killswitch.stop")
    upstream = flow_span(rec(status=502), random_ids=(1, 2))
    assert upstream.error == "HTTP 502"
    gone = flow_span(rec(status=200, error="Client disconnected.",
                         llm={"operation": "chat", "outcome": "ok"}), random_ids=(1, 2))
    assert gone.error is None  # an SDK closing a finished stream early
    assert [e.name for e in gone.events] == ["fleetgate.client_disconnected"]
    reset = flow_span(rec(status=200, error="peer reset"), random_ids=(1, 2))
    assert reset.error == "peer reset"
    ok = flow_span(rec(status=404), random_ids=(1, 2))
    assert ok.error is None  # a 404 the agent asked for is not the gateway's error


def test_traceparent_is_continued_and_bad_ones_ignored() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert parse_traceparent(tp) == (0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331, True)
    for bad in ("", "garbage", "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "00-00000000000000000000000000000000-b7ad6b7169203331-01",
                "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01"):
        assert parse_traceparent(bad) is None
    spec = flow_span(rec(), agent_traceparent=tp, random_ids=(1, 2))
    assert spec.trace_id == 0x0af7651916cd43dd8448eb211c80319c
    assert spec.parent_id == 0xb7ad6b7169203331 and spec.remote_parent
    assert spec.links[0].trace_id == session_trace_id("s-1")
    assert traceparent(1, 2) == "00-00000000000000000000000000000001-0000000000000002-01"


def test_capture_masks_secrets_and_cuts_at_max_bytes() -> None:
    body = json.dumps({"model": "gpt-4o", "system": "be brief",
                       "messages": [{"role": "user", "content":
                                     "key sk-proj-abcdefghijklmnopqrstuvwx and "
                                     "AKIAABCDEFGHIJKLMNOP and Bearer abcdefghijklmnopqrstuvwxyz"
                                     + " pad" * 500}]}).encode()
    out = prompt_attributes(body, 200)
    text = out["gen_ai.input.messages"]
    assert "sk-proj" not in text and "AKIA" not in text and "abcdefghijklmnopqrstuvwxyz" not in text
    assert text.count("***") == 3
    assert len(text.split("…[")[0].encode()) <= 200 and "more bytes not captured" in text
    assert out["gen_ai.system_instructions"] == '"be brief"'
    done = completion_attributes("the answer", 1000)
    assert json.loads(done["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "the answer"}]}]
    assert prompt_attributes(None, 10) == {} and completion_attributes("", 10) == {}
    assert mask("eyJhbGciOi.eyJzdWIiOi.sig") == "***"


def test_answer_text_reads_every_provider_shape() -> None:
    assert answer_text({"choices": [{"message": {"content": "hi"}}]}) == "hi"
    assert answer_text({"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}) == "ab"
    assert answer_text({"candidates": [{"content": {"parts": [{"text": "g"}]}}]}) == "g"
    assert answer_text({"output": [{"content": [{"type": "output_text", "text": "r"}]}]}) == "r"
    assert answer_text([1, 2]) == ""


def test_export_config_from_options_and_otel_env() -> None:
    assert resolve(endpoint="", protocol="", service_name="", queue=10, metrics=True,
                   env={}) is None
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://col:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
           "OTEL_SERVICE_NAME": "gw-eu", "OTEL_METRIC_EXPORT_INTERVAL": "5000"}
    cfg = resolve(endpoint="", protocol="", service_name="", queue=10, metrics=True, env=env)
    assert cfg is not None
    assert (cfg.endpoint, cfg.protocol, cfg.service_name, cfg.metric_interval_ms) == (
        "http://col:4317", "grpc", "gw-eu", 5000)
    over = resolve(endpoint="http://other:4318/", protocol="http/protobuf", service_name="x",
                   queue=10, metrics=False, env=env)
    assert over is not None and (over.endpoint, over.protocol, over.metrics) == (
        "http://other:4318", "http/protobuf", False)
    traces_only = resolve(endpoint="", protocol="", service_name="", queue=1, metrics=True,
                          env={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/v1/traces"})
    assert traces_only is not None and traces_only.endpoint == "http://t:4318"
    assert resolve(endpoint="", protocol="", service_name="", queue=1, metrics=True,
                   env={**env, "OTEL_SDK_DISABLED": "true"}) is None
    assert resolve(endpoint="", protocol="", service_name="", queue=1, metrics=True,
                   env={**env, "OTEL_TRACES_EXPORTER": "none"}) is None
    with pytest.raises(ValueError, match="http/json"):
        resolve(endpoint="http://c:4318", protocol="http/json", service_name="", queue=1,
                metrics=True, env={})
    with pytest.raises(ValueError, match="http://"):
        resolve(endpoint="collector:4317", protocol="grpc", service_name="", queue=1,
                metrics=True, env={})


def test_profile_telemetry_key() -> None:
    report = Reporter("rules.yaml")
    cap = parse_telemetry({"capture": ["prompts"], "maxBytes": 100}, "agents[0].telemetry", report)
    assert cap is not None and (cap.prompts, cap.completions, cap.max_bytes) == (True, False, 100)
    both = parse_telemetry({"capture": True}, "t", report)
    assert both is not None and both.prompts and both.completions and both.max_bytes == 4096
    assert parse_telemetry({"capture": False}, "t", report) is None
    assert not report.problems
    for bad in ({"capture": ["secrets"]}, {"capture": True, "maxBytes": 0},
                {"capture": True, "maxBytes": "big"}, {"captures": True}, "yes"):
        r = Reporter("rules.yaml")
        parse_telemetry(bad, "t", r)
        assert r.problems, bad
