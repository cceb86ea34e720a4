"""LlmMeter under taddons: the tee never changes the agent's bytes, and counts what it can."""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path
from typing import Any

from mitmproxy.test import taddons, tflow

from fleetgate.addons.llm import LlmInspector
from fleetgate.addons.llm_meter import LlmMeter
from fleetgate.addons.rules import PolicyStore
from fleetgate.addons.state import CUT, DECISION, IDENTITY, LLM_REQUEST, LLM_USAGE
from fleetgate.limits.bucket import BucketSpec, LimitKind
from fleetgate.llm.ledger import Ledger
from fleetgate.metrics import GatewayMetrics
from fleetgate.policy.model import RateLimit
from fleetgate.runtime.reservations import ReservationBook
from fleetgate.stores.spend import SqliteSpendStore

REPO = Path(__file__).resolve().parents[2]


def llm_flow(content_type: str, encoding: str = "") -> Any:
    f = tflow.tflow(resp=True)
    f.metadata[LLM_REQUEST] = {"is_llm": True, "provider": "openai", "api": "openai",
                               "operation": "chat", "model": "gpt-4o",
                               "estimated_input_tokens": 42}
    f.metadata[DECISION] = {"allow": True, "rule": "x", "reason": "allowed"}
    f.metadata[IDENTITY] = {"agent": "meter-agent", "role": "r", "session": "s1", "jti": None}
    f.response.headers["content-type"] = content_type
    if encoding:
        f.response.headers["content-encoding"] = encoding
    return f


def run(chunks: list[bytes], content_type: str, encoding: str = "") -> tuple[Any, list[bytes],
                                                                          Ledger]:
    metrics = GatewayMetrics()
    store = PolicyStore(metrics)
    ledger = Ledger()
    meter = LlmMeter(store, metrics, ledger, ReservationBook(SqliteSpendStore(None)))
    with taddons.context(store, LlmInspector(store, metrics), meter) as tctx:
        tctx.configure(store, fleetgate_rules=str(REPO / "rules"))
        f = llm_flow(content_type, encoding)
        meter.responseheaders(f)
        assert callable(f.response.stream)
        out = [f.response.stream(c) for c in chunks]
        f.response.stream(b"")
        meter.response(f)
        return f, out, ledger


def test_json_response_counted_from_chunks_passed_unchanged() -> None:
    body = json.dumps({"model": "gpt-4o-2024-08-06", "usage": {
        "prompt_tokens": 100, "completion_tokens": 20,
        "prompt_tokens_details": {"cached_tokens": 40}}}).encode()
    chunks = [body[:7], body[7:30], body[30:]]
    f, out, ledger = run(chunks, "application/json")
    assert out == chunks
    usage = f.metadata[LLM_USAGE]
    assert usage["tokens"]["input"] == 100 and usage["tokens"]["cache_read"] == 40
    assert usage["estimated"] is False and usage["priced"] is True
    assert usage["cost_usd"] == (60 * 2.5 + 40 * 1.25 + 20 * 10) / 1e6
    assert f.comment == "meter-agent / r / s1 \u00b7 openai gpt-4o: 100 in / 20 out tokens, $0.000400"
    totals = ledger.agent("meter-agent")
    assert totals is not None and totals.calls == 1 and totals.output == 20


def test_gzip_sse_is_decoded_for_counting_only() -> None:
    sse = (b'data: {"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
           b'data: {"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":5,'
           b'"completion_tokens":1}}\n\ndata: [DONE]\n\n')
    z = gzip.compress(sse)
    chunks = [z[i:i + 5] for i in range(0, len(z), 5)]
    f, out, _ = run(chunks, "text/event-stream", "gzip")
    assert out == chunks  # the agent gets the compressed bytes untouched
    assert f.metadata[LLM_USAGE]["tokens"]["input"] == 5
    assert f.metadata[LLM_USAGE]["estimated"] is False


def test_undecodable_stream_passes_unchanged_and_is_marked_estimated() -> None:
    chunks = [b"this is not gzip at all", b"more"]
    f, out, _ = run(chunks, "text/event-stream", "gzip")
    assert out == chunks
    usage = f.metadata[LLM_USAGE]
    assert usage["estimated"] is True and usage["tokens"]["input"] == 42


def test_denied_or_non_llm_flows_are_not_metered() -> None:
    metrics = GatewayMetrics()
    store = PolicyStore(metrics)
    meter = LlmMeter(store, metrics, Ledger(), ReservationBook(SqliteSpendStore(None)))
    with taddons.context(store, meter):
        f = llm_flow("application/json")
        f.metadata[DECISION] = {"allow": False, "rule": "x", "reason": "no"}
        meter.responseheaders(f)
        assert not callable(f.response.stream)
        g = tflow.tflow(resp=True)
        meter.responseheaders(g)
        assert not callable(g.response.stream)


def test_a_stream_past_its_token_bucket_ends_with_an_error_event() -> None:
    """The reservation book says when a watched stream's output has emptied its token
    bucket: the meter sends the chunk, then an SSE error event, and marks the flow cut."""
    metrics = GatewayMetrics()
    store = PolicyStore(metrics)
    book = ReservationBook(SqliteSpendStore(None))
    meter = LlmMeter(store, metrics, Ledger(), book)
    words = [f"word{i} " for i in range(40)]
    chunks = [b'data: {"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"'
              + w.encode() + b'"}}]}\n\n' for w in words]

    async def stream(f: Any) -> list[Any]:
        return [f.response.stream(c) for c in chunks]

    with taddons.context(store, LlmInspector(store, metrics), meter) as tctx:
        tctx.configure(store, fleetgate_rules=str(REPO / "rules"))
        f = llm_flow("text/event-stream")
        tight = RateLimit("tight", BucketSpec(50, 50, 60.0, LimitKind.TOKENS))
        assert book.rates.reserve(f.id, [tight], agent="meter-agent", llm_tokens=45,
                                  act=None).failed is None
        meter.responseheaders(f)
        out = asyncio.run(stream(f))
    cut = next(i for i, o in enumerate(out) if isinstance(o, list) and len(o) == 2)
    assert 0 < cut < len(chunks) - 1  # ended where the bucket ran dry, not at the end
    assert out[cut][0] == chunks[cut] and b"fleetgate ended this stream (tight)" in out[cut][1]
    assert all(o == [] for o in out[cut + 1:])  # nothing after the error event
    assert f.metadata[CUT]["rule"] == "tight"
    assert metrics.ratelimit_rejections.labels(limit="tight")._value.get() == 1
