"""The running ledger, offline token counting, and incremental Content-Encoding decoding."""

from __future__ import annotations

import gzip
import os
import shutil
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import brotli
import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
import zstandard

from fleetgate.llm import tokenizer
from fleetgate.llm.decoding import StreamDecoder
from fleetgate.llm.ledger import Ledger, Totals
from fleetgate.llm.tokenizer import ENCODINGS_DIR, count_tokens, encoding_for_model
from fleetgate.llm.usage import StreamAccountant, Usage

FIXTURES = Path(__file__).parent / "fixtures" / "llm"

# -- ledger ------------------------------------------------------------------------------------

U1 = Usage(input=1000, output=200, cache_read=800, reasoning=50)
U2 = Usage(input=3520, output=312, cache_read=2048, cache_write=1000)
U3 = Usage(input=40, output=90, estimated=True)


def test_totals_per_agent_session_and_fleet() -> None:
    ledger = Ledger()
    ledger.add("agent-a", "sess-1", U1, 0.0025)
    ledger.add("agent-a", "sess-2", U2, 0.0104604)
    ledger.add("agent-b", "sess-1", U3, None)
    ledger.add(None, None, U1, 0.001)  # unidentified traffic still counts for the fleet

    a = ledger.agent("agent-a")
    assert a == Totals(calls=2, input=4520, output=512, cache_read=2848, cache_write=1000,
                       reasoning=50, cost_usd=pytest.approx(0.0129604), unpriced_calls=0,
                       estimated_calls=0)
    b = ledger.agent("agent-b")
    assert b == Totals(calls=1, input=40, output=90, cost_usd=0.0, unpriced_calls=1,
                       estimated_calls=1)
    assert ledger.agent("agent-c") is None

    s1 = ledger.sessions.items["sess-1"]
    assert (s1.calls, s1.input, s1.output, s1.unpriced_calls) == (2, 1040, 290, 1)
    assert ledger.sessions.items["sess-2"].calls == 1

    f = ledger.fleet
    assert (f.calls, f.input, f.output, f.cache_read, f.cache_write, f.reasoning) == (
        4, 5560, 802, 3648, 1000, 100)
    assert f.cost_usd == pytest.approx(0.0139604)
    assert (f.unpriced_calls, f.estimated_calls) == (1, 1)


def test_unpriced_call_adds_no_dollars_but_is_counted() -> None:
    t = Totals()
    t.add(Usage(input=5, output=5), None)
    t.add(Usage(input=5, output=5), 0.0)
    assert (t.calls, t.cost_usd, t.unpriced_calls) == (2, 0.0, 1)


def test_eviction_is_bounded_and_least_recently_active_first() -> None:
    ledger = Ledger(max_keys=3)
    for agent in ("a", "b", "c"):
        ledger.add(agent, f"s-{agent}", U1, 0.01)
    ledger.add("a", "s-a", U1, 0.01)  # 'a' is active again; 'b' is now the oldest
    ledger.add("d", "s-d", U1, 0.01)
    assert list(ledger.agents.items) == ["c", "a", "d"]
    assert ledger.agents.evicted == 1
    assert ledger.agent("b") is None
    assert list(ledger.sessions.items) == ["s-c", "s-a", "s-d"]
    for i in range(100):
        ledger.add(f"flood-{i}", f"flood-{i}", U3, None)
    assert len(ledger.agents.items) == 3 and len(ledger.sessions.items) == 3
    assert ledger.agents.evicted == 101 and ledger.sessions.evicted == 101
    assert ledger.fleet.calls == 105  # evicted keys' calls stay in the fleet totals


def test_snapshot_orders_by_cost_and_truncates() -> None:
    ledger = Ledger()
    ledger.add("cheap", "s1", U1, 0.001)
    ledger.add("unpriced", "s2", U3, None)
    ledger.add("pricey", "s3", U2, 2.5)
    ledger.add("middle", "s4", U1, 0.3)
    ledger.add("middle", "s4", U1, 0.3)
    snap = ledger.snapshot()
    assert list(snap["agents"]) == ["pricey", "middle", "cheap", "unpriced"]
    assert list(snap["sessions"]) == ["s3", "s4", "s1", "s2"]
    assert snap["agents"]["middle"]["calls"] == 2
    assert snap["agents"]["middle"]["cost_usd"] == 0.6
    assert snap["fleet"]["calls"] == 5
    assert snap["evicted"] == {"agents": 0, "sessions": 0}
    assert list(ledger.snapshot(top=2)["agents"]) == ["pricey", "middle"]


def test_totals_as_dict_rounds_cost() -> None:
    t = Totals()
    t.add(U2, 0.01046041234)
    d = t.as_dict()
    assert d == {"calls": 1, "input": 3520, "output": 312, "cache_read": 2048,
                 "cache_write": 1000, "reasoning": 0, "cost_usd": 0.01046, "unpriced_calls": 0,
                 "estimated_calls": 0}
    assert t.cost_usd == 0.01046041234  # rounding is for display only


def test_ledger_is_thread_safe() -> None:
    ledger = Ledger()

    def work(n: int) -> None:
        for _ in range(500):
            ledger.add(f"agent-{n % 2}", "shared", Usage(input=1, output=2), 0.5)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.fleet.calls == 4000 and ledger.fleet.output == 8000
    assert ledger.sessions.items["shared"].calls == 4000
    assert ledger.fleet.cost_usd == 2000.0
    a0, a1 = ledger.agent("agent-0"), ledger.agent("agent-1")
    assert a0 is not None and a1 is not None and a0.calls == a1.calls == 2000


# -- tokenizer ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4", "cl100k_base"),
        ("GPT-4", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-4-turbo-2024-04-09", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-2024-08-06", "o200k_base"),
        ("gpt-4o-mini", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4.1-mini", "o200k_base"),
        ("gpt-4.5-preview", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini-2025-04-16", "o200k_base"),
        ("claude-sonnet-4-5-20250929", "o200k_base"),
        ("gemini-2.5-pro", "o200k_base"),
        ("", "o200k_base"),
        (None, "o200k_base"),
    ],
)
def test_encoding_for_model(model: str | None, encoding: str) -> None:
    assert encoding_for_model(model) == encoding


@pytest.fixture
def fresh_tiktoken(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No encoding loaded yet in this process, and any download attempt fails the test."""
    # set-then-delete so that teardown puts the variable back exactly as it was
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "placeholder")
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})

    def no_network(blobpath: str) -> bytes:
        raise AssertionError(f"tiktoken tried to download {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    tokenizer._encoding.cache_clear()
    yield
    tokenizer._encoding.cache_clear()


TEXT = "Résumé de l'incident — très court 🚀"


def test_tokenizer_works_offline_from_shipped_encodings(fresh_tiktoken: None) -> None:
    assert "TIKTOKEN_CACHE_DIR" not in os.environ
    assert count_tokens(TEXT, "gpt-4") == 13
    assert count_tokens(TEXT, "gpt-4o") == 10
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(ENCODINGS_DIR)
    assert set(tiktoken.registry.ENCODINGS) == {"cl100k_base", "o200k_base"}
    # the real encodings, not look-alikes: tiktoken's documented example ids
    cl100k = tiktoken.registry.ENCODINGS["cl100k_base"]
    assert cl100k.encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]


def test_operator_cache_dir_that_does_not_exist_falls_back(fresh_tiktoken: None,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "missing"))
    assert count_tokens(TEXT, "gpt-4o") == 10
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(ENCODINGS_DIR)


def test_operator_cache_dir_wins(fresh_tiktoken: None, monkeypatch: pytest.MonkeyPatch,
                                 tmp_path: Path) -> None:
    for f in ENCODINGS_DIR.iterdir():
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert count_tokens(TEXT, "gpt-4") == 13
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(tmp_path)


def test_count_tokens_edge_cases() -> None:
    assert count_tokens("") == 0
    assert count_tokens("", "gpt-4") == 0
    # special-token text is counted as ordinary text, never raises
    assert count_tokens("<|endoftext|>", "gpt-4o") == 7
    assert count_tokens("hello world") == 2


# -- streaming decoder -------------------------------------------------------------------------

PAYLOAD = (FIXTURES / "anthropic_messages_stream.sse").read_bytes() * 8


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def _zstd_streamed(data: bytes) -> bytes:
    c = zstandard.ZstdCompressor().compressobj()
    return c.compress(data) + c.flush()


def _gzip_sync_flushed(data: bytes) -> bytes:
    """What a streaming server emits: a sync-flushed deflate block every few hundred bytes."""
    c = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    out = b"".join(c.compress(data[i : i + 300]) + c.flush(zlib.Z_SYNC_FLUSH)
                   for i in range(0, len(data), 300))
    return out + c.flush()


ENCODERS: list[tuple[str, Callable[[bytes], bytes]]] = [
    ("gzip", gzip.compress),
    ("x-gzip", gzip.compress),
    ("gzip", _gzip_sync_flushed),
    ("deflate", zlib.compress),
    ("br", brotli.compress),
    ("zstd", zstandard.ZstdCompressor().compress),
    ("zstd", _zstd_streamed),
    ("identity", lambda b: b),
    ("", lambda b: b),
]


@pytest.mark.parametrize(("encoding", "encode"), ENCODERS)
@pytest.mark.parametrize("piece", [1, 7, 4096])
def test_stream_decoder_in_small_pieces(encoding: str, encode: Callable[[bytes], bytes],
                                        piece: int) -> None:
    wire = encode(PAYLOAD)
    if piece == 1:
        wire, expected = encode(PAYLOAD[:3000]), PAYLOAD[:3000]  # keep byte-by-byte fast
    else:
        expected = PAYLOAD
    dec = StreamDecoder(encoding)
    out = b"".join(dec.feed(wire[i : i + piece]) for i in range(0, len(wire), piece))
    assert out == expected


def test_stream_decoder_feeds_the_accountant() -> None:
    """Compressed SSE, cut anywhere by the network, meters the same as plain SSE."""
    sse = (FIXTURES / "anthropic_messages_stream.sse").read_bytes()
    for encoding, encode in ENCODERS:
        wire = encode(sse)
        dec, acc = StreamDecoder(encoding), StreamAccountant("anthropic")
        for i in range(0, len(wire), 5):
            acc.feed(dec.feed(wire[i : i + 5]))
        assert acc.finish() == Usage(input=2381, output=187, cache_read=2048, cache_write=312)


def test_gzip_stream_decodes_each_event_as_it_arrives() -> None:
    """Sync-flushed gzip yields each event's text as soon as its bytes arrive (no buffering
    until the end of the stream)."""
    events = [b'data: {"n":%d}\n\n' % i for i in range(5)]
    c = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    dec = StreamDecoder("gzip")
    for e in events:
        assert dec.feed(c.compress(e) + c.flush(zlib.Z_SYNC_FLUSH)) == e


def test_stream_decoder_identity_and_empty() -> None:
    dec = StreamDecoder("identity")
    assert dec.encodings == []
    assert dec.feed(b"abc") == b"abc"
    assert StreamDecoder("gzip").feed(b"") == b""
    assert StreamDecoder("identity, gzip").encodings == ["gzip"]


@pytest.mark.parametrize("encoding", ["gzip, br", "deflate,gzip", "compress", "snappy"])
def test_stream_decoder_rejects(encoding: str) -> None:
    with pytest.raises(ValueError):
        StreamDecoder(encoding)
