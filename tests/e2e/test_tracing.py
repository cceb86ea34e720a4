"""End to end: OpenTelemetry traces of an agent session, received by a real OTLP collector.

A coordinator session goes through a real mitmdump: MCP ``initialize``, ``tools/list``, a
``tools/call``, a streamed LLM call (the official openai SDK), a denied call, a delegated
sub-agent making its own LLM call, then a stop and the refused call after it. The in-process
OTLP receiver (tests/otlp.py, the official protobufs over HTTP and gRPC) must get one trace for
the family, each span named and attributed by the GenAI/MCP conventions, the sub-agent's
session nested under the coordinator's, denials and the stop as error status naming the rule.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trustme
from conftest import GatewayFactory
from helpers import family_policy, mcp_route, rpc
from llm_upstream import OPENAI_USAGE, install
from otlp import OtlpGrpcReceiver, OtlpHttpReceiver

from fleetgate.telemetry.spans import session_span_id, session_trace_id
from harness import Gateway, Upstream, ssl_context, token, wait_until

pytestmark = pytest.mark.e2e

CONTROL = "https://fleetgate.internal"
SECRET_IN_PROMPT = "sk-proj-abcdefghijklmnopqrstuvwx0123"


@pytest.fixture
def upstream(upstream_ca: trustme.CA) -> Iterator[Upstream]:
    up = Upstream(upstream_ca, names=("api.openai.com",))
    install(up)
    up.route("/mcp", mcp_route("json"))
    yield up
    up.stop()


@pytest.fixture
def receiver() -> Iterator[OtlpHttpReceiver]:
    r = OtlpHttpReceiver()
    yield r
    r.stop()


TELEMETRY = """\
  telemetry:
    capture: [prompts, completions]
    maxBytes: 300
"""


def rules(path: Path, port: int) -> Path:
    path.write_text(family_policy(port, TELEMETRY))
    return path


def by_name(spans: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["name"] == name]


def test_a_session_family_is_one_trace_with_conventional_spans(
        make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream,
        receiver: OtlpHttpReceiver) -> None:
    gw = make_gateway(rules(tmp_path / "rules.yaml", upstream.port),
                      fleetgate_otel_endpoint=receiver.endpoint,
                      fleetgate_otel_session_idle="1", fleetgate_otel_service_name="fleet-gw")
    coord = token("coord-1", role="coordinator", session_id="s-coord", user="alice")
    with gw.client(coord) as c:
        init = rpc(c, upstream, 1, "initialize", {"protocolVersion": "2025-06-18"})
        assert init.status_code == 200
        sid = init.headers["Mcp-Session-Id"]
        assert rpc(c, upstream, 2, "tools/list", session=sid).status_code == 200
        assert rpc(c, upstream, 3, "tools/call", {"name": "nmap_scan", "arguments": {
            "target": "10.0.0.1"}}, session=sid).status_code == 200
        assert c.get(upstream.url + "/delete-everything").status_code == 403
        r = c.post(CONTROL + "/v1/delegate", json={"role": "security"})
        assert r.status_code == 200, r.text
        child = r.json()["token"]
    http = httpx.Client(proxy=gw.proxy_url(coord), verify=ssl_context(gw.ca_cert), timeout=20)
    with openai.OpenAI(api_key="sk-test", max_retries=0, http_client=http) as client:
        stream = client.chat.completions.create(
            model="gpt-4o", stream=True,
            messages=[{"role": "user", "content": f"scan it; my key is {SECRET_IN_PROMPT}"}])
        answer = "".join(ev.choices[0].delta.content or "" for ev in stream if ev.choices)
    http = httpx.Client(proxy=gw.proxy_url(child), verify=ssl_context(gw.ca_cert), timeout=20)
    with openai.OpenAI(api_key="sk-test", max_retries=0, http_client=http) as client:
        client.chat.completions.create(model="gpt-4o",
                                       messages=[{"role": "user", "content": "triage"}])
    stop = gw.admin("/v1/actions", {"verb": "stop", "scope": {"kind": "session",
                                                              "value": "s-coord"},
                                    "reason": "e2e stop", "by": "e2e"})
    assert stop.status_code == 200, stop.text
    with gw.client(coord) as c:
        assert c.get(upstream.url + "/after-stop").status_code >= 400

    spans = receiver.received.wait_spans(
        lambda ss: len([s for s in ss if s["name"] == "invoke_agent coord-1"]) == 1
        and any(s["name"] == "invoke_agent coord-1/security" or
                s["name"].startswith("invoke_agent coord-1/") for s in ss)
        and any(s["attributes"].get("url.path") == "/after-stop" for s in ss), timeout=20)

    trace = f"{session_trace_id('s-coord'):032x}"
    coord_span = f"{session_span_id('s-coord'):016x}"
    family = [s for s in spans if s["trace_id"] == trace]
    names = [s["name"] for s in sorted(family, key=lambda s: s["start"])]
    # one trace for the family: the coordinator's calls, its session span, the child's
    for expected in ("initialize", "tools/list", "tools/call nmap_scan", "GET",
                     "fleetgate delegate", "chat gpt-4o", "invoke_agent coord-1"):
        assert expected in names, (expected, names)
    assert all(s["resource"]["service.name"] == "fleet-gw" for s in spans)

    session = by_name(family, "invoke_agent coord-1")[0]
    assert session["span_id"] == coord_span and session["parent_id"] is None
    assert session["attributes"]["gen_ai.conversation.id"] == "s-coord"
    assert session["attributes"]["fleetgate.session.denied"] >= 1

    tool = by_name(family, "tools/call nmap_scan")[0]
    assert tool["parent_id"] == coord_span
    assert tool["attributes"]["mcp.method.name"] == "tools/call"
    assert tool["attributes"]["gen_ai.tool.name"] == "nmap_scan"
    assert tool["attributes"]["gen_ai.operation.name"] == "execute_tool"
    assert tool["attributes"]["mcp.session.id"] == "sess-1"
    assert tool["attributes"]["fleetgate.agent"] == "coord-1"
    assert tool["attributes"]["fleetgate.role"] == "coordinator"
    assert tool["attributes"]["fleetgate.user"] == "alice"
    assert tool["status"]["code"] != 2  # not an error

    denied = next(s for s in family if s["attributes"].get("url.path") == "/delete-everything")
    assert denied["status"]["code"] == 2  # STATUS_CODE_ERROR
    assert "no-deletes" in denied["status"]["message"]
    assert denied["attributes"]["error.type"] == "no-deletes"
    assert denied["attributes"]["http.response.status_code"] == 403
    assert any(e["name"] == "fleetgate.denied" and e["attributes"]["fleetgate.rule"] == "no-deletes"
               for e in denied["events"])

    # the streamed LLM call: GenAI attributes, usage as the provider reported it, TTFT
    llm = next(s for s in family if s["name"] == "chat gpt-4o"
           and s["attributes"].get("fleetgate.agent") == "coord-1")
    a = llm["attributes"]
    # the SDK leaves after the last event, before the final chunk: not a failure, not a cut
    assert llm["status"]["code"] != 2, (llm["status"], a.get("fleetgate.llm.outcome"))
    assert a["fleetgate.llm.outcome"] == "ok"
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o"
    assert a["gen_ai.usage.input_tokens"] == OPENAI_USAGE["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == OPENAI_USAGE["completion_tokens"]
    assert a.get("fleetgate.cost_usd.unpriced") is True  # no pricing in these rules: said so
    assert 0 <= a["gen_ai.response.time_to_first_chunk"] < llm["end"] - llm["start"] + 0.001
    assert any(e["name"] == "gen_ai.first_chunk" for e in llm["events"])
    assert a["url.full"].startswith("https://api.openai.com")
    # the profile captures contents: masked, capped
    assert "scan it" in a["gen_ai.input.messages"]
    assert SECRET_IN_PROMPT not in a["gen_ai.input.messages"]
    assert answer and answer[:20] in json.loads(a["gen_ai.output.messages"])[0]["parts"][0]["content"]

    # the sub-agent: its session span nests under the coordinator's, its call under it
    child_session = next(s for s in family if s["name"].startswith("invoke_agent coord-1/"))
    assert child_session["parent_id"] == coord_span
    assert child_session["attributes"]["fleetgate.parent_session"] == "s-coord"
    child_llm = next(s for s in family if s["name"] == "chat gpt-4o"
                 and s["attributes"].get("fleetgate.role") == "security")
    assert child_llm["parent_id"] == child_session["span_id"]

    # the stop: the refused call after it names the kill switch
    after = next(s for s in family if s["attributes"].get("url.path") == "/after-stop")
    assert after["status"]["code"] == 2
    assert after["attributes"]["fleetgate.rule"].startswith("killswitch")

    # nothing dropped or failed; OTLP metrics arrive under semconv names at shutdown
    assert "fleetgate_otel_spans_total{result=\"dropped\"}" not in gw.metrics() or \
        'fleetgate_otel_spans_total{result="dropped"} 0.0' in gw.metrics()
    gw.stop()
    wait_until(lambda: "gen_ai.client.token.usage" in receiver.received.metrics, timeout=10)
    metrics = receiver.received.metrics
    assert {"gen_ai.client.token.usage", "gen_ai.client.operation.duration",
            "gen_ai.client.operation.time_to_first_chunk", "mcp.client.operation.duration",
            "fleetgate.requests"} <= set(metrics)
    usage = metrics["gen_ai.client.token.usage"]
    assert {p["attributes"]["gen_ai.token.type"] for p in usage} == {"input", "output"}
    assert all(p["attributes"]["gen_ai.provider.name"] == "openai" for p in usage)


def test_an_agents_traceparent_is_continued_and_propagated_upstream(
        make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream,
        receiver: OtlpHttpReceiver) -> None:
    gw = make_gateway(rules(tmp_path / "rules.yaml", upstream.port),
                      fleetgate_otel_endpoint=receiver.endpoint, fleetgate_otel_propagate="true")
    theirs = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with gw.client(token("coord-1", role="coordinator", session_id="s-tp")) as c:
        assert c.get(upstream.url + "/with-tp", headers={"traceparent": theirs}).status_code == 200
        assert c.get(upstream.url + "/without-tp").status_code == 200
    spans = receiver.received.wait_spans(lambda ss: len(ss) >= 2)
    with_tp = next(s for s in spans if s["attributes"].get("url.path") == "/with-tp")
    assert with_tp["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert with_tp["parent_id"] == "b7ad6b7169203331"
    assert with_tp["links"][0]["trace_id"] == f"{session_trace_id('s-tp'):032x}"
    seen = {s.path: s.headers for s in upstream.seen}
    sent = {k.lower(): v for k, v in seen["/with-tp"].items()}["traceparent"]
    # the upstream got the gateway's span as parent, in the agent's trace
    assert sent == f"00-0af7651916cd43dd8448eb211c80319c-{with_tp['span_id']}-01"
    without = next(s for s in spans if s["attributes"].get("url.path") == "/without-tp")
    sent = {k.lower(): v for k, v in seen["/without-tp"].items()}["traceparent"]
    assert sent == f"00-{session_trace_id('s-tp'):032x}-{without['span_id']}-01"
    assert without["parent_id"] == f"{session_span_id('s-tp'):016x}"


def test_grpc_export(make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream) -> None:
    grpc_receiver = OtlpGrpcReceiver()
    try:
        gw = make_gateway(rules(tmp_path / "rules.yaml", upstream.port),
                          fleetgate_otel_endpoint=grpc_receiver.endpoint,
                          fleetgate_otel_protocol="grpc")
        with gw.client(token("coord-1", role="coordinator", session_id="s-grpc")) as c:
            assert c.get(upstream.url + "/over-grpc").status_code == 200
        spans = grpc_receiver.received.wait_spans(
            lambda ss: any(s["attributes"].get("url.path") == "/over-grpc" for s in ss))
        span = next(s for s in spans if s["attributes"].get("url.path") == "/over-grpc")
        assert span["trace_id"] == f"{session_trace_id('s-grpc'):032x}"
        assert span["attributes"]["http.request.method"] == "GET"
    finally:
        grpc_receiver.stop()


def test_a_dead_collector_drops_and_counts_and_never_blocks(
        make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream) -> None:
    """A collector that accepts connections and never answers: spans pile up to the queue
    bound, the rest are dropped and counted, every agent call still answers."""
    import socket
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(100)
    try:
        gw = make_gateway(rules(tmp_path / "rules.yaml", upstream.port),
                          fleetgate_otel_endpoint=f"http://127.0.0.1:{hole.getsockname()[1]}",
                          fleetgate_otel_queue="5")
        with gw.client(token("coord-1", role="coordinator", session_id="s-dead")) as c:
            for i in range(40):
                assert c.get(upstream.url + f"/dead-{i}").status_code == 200
        wait_until(lambda: _dropped(gw) >= 40 - 5 - 1, timeout=10)
        assert _dropped(gw) <= 40
        status = gw.ready().json()
        assert status["state"]["telemetry"]["exporting"] is True
        assert status["state"]["telemetry"]["failing"] is True or status["state"]["telemetry"]["queued"] >= 1
        assert status["ready"] is True  # a dead collector is not a reason to refuse agents
    finally:
        hole.close()


def _dropped(gw: Gateway) -> float:
    for line in gw.metrics().splitlines():
        if line.startswith('fleetgate_otel_spans_total{result="dropped"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_no_endpoint_no_export_and_a_bad_protocol_refuses_to_start(
        make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream) -> None:
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in os.environ
    gw = make_gateway(rules(tmp_path / "rules.yaml", upstream.port))
    assert "fleetgate_otel_export_enabled 0.0" in gw.metrics()
    bad = make_gateway(rules(tmp_path / "rules2.yaml", upstream.port), start=False,
                       fleetgate_otel_endpoint="http://127.0.0.1:1", fleetgate_otel_protocol="http/json")
    with pytest.raises(RuntimeError, match="http/json"):
        bad.start(timeout=20)
