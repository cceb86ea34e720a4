"""Usage parsing over real-format provider payloads: JSON bodies and SSE streams.

The fixtures under ``fixtures/llm/`` follow each provider's documented wire format (OpenAI
Chat Completions / Completions / Embeddings / Responses, Anthropic Messages, Gemini
generateContent / streamGenerateContent). Every stream must give the same answer however the
network chunks it, and a stream that ends without its usage event must be estimated from the
text that actually streamed.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetgate.llm.tokenizer import count_tokens
from fleetgate.llm.usage import SseParser, StreamAccountant, Usage, usage_from_json

FIXTURES = Path(__file__).parent / "fixtures" / "llm"


def raw(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def load(name: str) -> object:
    return json.loads(raw(name))


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def crlf(data: bytes) -> bytes:
    return lf(data).replace(b"\n", b"\r\n")


def split_random(data: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 60))))
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def chunkings(data: bytes) -> Iterator[tuple[str, list[bytes]]]:
    yield "whole", [data]
    yield "bytewise", [data[i : i + 1] for i in range(len(data))]
    for seed in range(5):
        yield f"random{seed}", split_random(data, seed)


def account(api: str, chunks: list[bytes], model: str | None = None,
            estimated_input: int = 0) -> tuple[Usage, StreamAccountant]:
    acc = StreamAccountant(api, model)
    for c in chunks:
        acc.feed(c)
    return acc.finish(estimated_input), acc


def cut_at(data: bytes, marker: bytes, extra: int = 0) -> bytes:
    """``data`` up to the start of the SSE event containing ``marker`` (plus ``extra`` bytes)."""
    at = data.index(marker)
    end_of_previous = data.rfind(b"\n\n", 0, at)
    start = 0 if end_of_previous < 0 else end_of_previous + 2
    return data[: start + extra]


# -- JSON bodies --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("api", "fixture", "expected"),
    [
        # OpenAI: prompt_tokens already includes the cached part; completion includes reasoning
        ("openai", "openai_chat.json",
         Usage(input=2006, output=300, cache_read=1920, reasoning=192)),
        ("openai", "openai_completion_legacy.json", Usage(input=5, output=7)),
        ("openai", "openai_embeddings.json", Usage(input=8)),
        ("openai", "openai_responses.json",
         Usage(input=328, output=1024, cache_read=256, reasoning=768)),
        # Anthropic: input = input_tokens + cache_read + cache_creation = 50 + 9000 + 1500
        ("anthropic", "anthropic_messages.json",
         Usage(input=10550, output=250, cache_read=9000, cache_write=1500)),
        # Gemini: output = candidates + thoughts = 89 + 432
        ("gemini", "gemini_generate_content.json",
         Usage(input=4121, output=521, cache_read=4096, reasoning=432)),
        # streamGenerateContent without alt=sse: a JSON array of cumulative chunks
        ("gemini", "gemini_stream_array.json",
         Usage(input=1043, output=227, cache_read=1024, reasoning=211)),
    ],
)
def test_usage_from_json(api: str, fixture: str, expected: Usage) -> None:
    usage = usage_from_json(api, load(fixture))
    assert usage == expected
    assert usage is not None and usage.estimated is False


def test_gemini_array_takes_last_cumulative_chunk_not_a_sum() -> None:
    chunks = load("gemini_stream_array.json")
    assert isinstance(chunks, list) and len(chunks) == 3
    assert usage_from_json("gemini", chunks[:2]) == Usage(
        input=1043, output=9 + 211, cache_read=1024, reasoning=211)


def test_openai_responses_event_body_reads_nested_usage() -> None:
    body = {"type": "response.completed", "response": load("openai_responses.json")}
    assert usage_from_json("openai", body) == Usage(input=328, output=1024, cache_read=256,
                                                    reasoning=768)


def test_anthropic_thinking_tokens_are_reasoning() -> None:
    """The Messages API breaks extended-thinking tokens out in
    ``usage.output_tokens_details.thinking_tokens`` (part of ``output_tokens``); the module's
    normalisation says ``reasoning`` is the part of ``output`` spent thinking."""
    body = load("anthropic_messages.json")
    assert isinstance(body, dict)
    body["usage"]["output_tokens"] = 1890
    body["usage"]["output_tokens_details"] = {"thinking_tokens": 1650}
    usage = usage_from_json("anthropic", body)
    assert usage is not None
    assert (usage.output, usage.reasoning) == (1890, 1650)


@pytest.mark.parametrize(
    ("api", "body"),
    [
        ("openai", {"error": {"message": "Rate limit reached for gpt-4o", "type": "requests",
                              "param": None, "code": "rate_limit_exceeded"}}),
        ("openai", {"id": "chatcmpl-1", "object": "chat.completion", "choices": [], "usage": None}),
        ("anthropic", {"type": "error", "error": {"type": "overloaded_error",
                                                  "message": "Overloaded"}}),
        ("gemini", {"error": {"code": 429, "message": "Resource has been exhausted",
                              "status": "RESOURCE_EXHAUSTED"}}),
        ("gemini", [{"candidates": [{"content": {"parts": [{"text": "x"}]}}]}]),
        ("openai", "not an object"),
        ("anthropic", None),
    ],
)
def test_usage_from_json_without_usage_is_none(api: str, body: object) -> None:
    assert usage_from_json(api, body) is None


def test_usage_as_dict() -> None:
    u = Usage(input=10, output=4, cache_read=3, cache_write=2, reasoning=1, estimated=True)
    assert u.as_dict() == {"input": 10, "output": 4, "cache_read": 3, "cache_write": 2,
                           "reasoning": 1, "estimated": True}


# -- SSE streams ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Stream:
    fixture: str
    api: str
    request_model: str
    usage: Usage
    model: str
    text: str


OPENAI_CHAT_TEXT = "Bonjour! Le café est prêt ☕\nBon appétit."
RESPONSES_TEXT = "The capital of Iceland is Reykjavík."
ANTHROPIC_THINKING = "The user wants a haiku about rain — five, seven, five."
ANTHROPIC_TEXT = "Soft rain on the roof\nwhispers to the sleeping town—\npuddles hold the sky."
GEMINI_TEXT = "Rain taps on the window,\nsoft drums for a sleepy town — ☔"

STREAMS = {
    "openai-chat": Stream("openai_chat_stream.sse", "openai", "o4-mini",
                          Usage(input=1931, output=417, cache_read=1792, reasoning=384),
                          "o4-mini-2025-04-16", OPENAI_CHAT_TEXT),
    "openai-responses": Stream("openai_responses_stream.sse", "openai", "gpt-5",
                               Usage(input=58, output=342, reasoning=320),
                               "gpt-5-2025-08-07", RESPONSES_TEXT),
    "anthropic": Stream("anthropic_messages_stream.sse", "anthropic", "claude-sonnet-4-5",
                        Usage(input=21 + 2048 + 312, output=187, cache_read=2048, cache_write=312),
                        "claude-sonnet-4-5-20250929", ANTHROPIC_THINKING + ANTHROPIC_TEXT),
    "gemini": Stream("gemini_stream.sse", "gemini", "gemini-2.5-flash",
                     Usage(input=1043, output=16 + 211, cache_read=1024, reasoning=211),
                     "gemini-2.5-flash", GEMINI_TEXT),
}


def _stream_cases() -> Iterator[object]:
    for name, s in STREAMS.items():
        for ending, conv in (("lf", lf), ("crlf", crlf)):
            for label, chunks in chunkings(conv(raw(s.fixture))):
                yield pytest.param(s, chunks, id=f"{name}-{ending}-{label}")


@pytest.mark.parametrize(("stream", "chunks"), list(_stream_cases()))
def test_stream_usage_in_every_chunking(stream: Stream, chunks: list[bytes]) -> None:
    usage, acc = account(stream.api, chunks, stream.request_model, estimated_input=999_999)
    assert usage == stream.usage
    assert usage.estimated is False
    assert acc.complete is True
    assert acc.malformed == 0
    assert acc.model == stream.model
    assert "".join(acc.text) == stream.text


@pytest.mark.parametrize("name", list(STREAMS))
def test_stream_chunkings_agree_exactly(name: str) -> None:
    s = STREAMS[name]
    seen = set()
    for conv in (lf, crlf):
        for _label, chunks in chunkings(conv(raw(s.fixture))):
            usage, acc = account(s.api, chunks, s.request_model)
            seen.add((usage, acc.events, acc.malformed, acc.model, tuple(acc.text)))
    assert len(seen) == 1


def test_event_counts() -> None:
    _, acc = account("openai", [raw("openai_chat_stream.sse")])
    assert acc.events == 15  # role + 11 deltas + finish + usage + [DONE]
    _, acc = account("anthropic", [raw("anthropic_messages_stream.sse")])
    assert acc.events == 18  # 4 message/ping, 6 thinking-block, 8 text-block events


MALFORMED = (b'data: {"id":"chatcmpl-broken","object":"chat.completion.chunk","choi\n\n'
             b"data: <html><body>502 Bad Gateway</body></html>\n\n")


@pytest.mark.parametrize(
    ("name", "before"),
    [
        ("openai-chat", b'"choices":[],"usage":{'),
        ("openai-responses", b"event: response.completed"),
        ("anthropic", b"event: message_delta"),
        ("gemini", b'"finishReason":"STOP"'),
    ],
)
def test_malformed_events_are_skipped_and_counted(name: str, before: bytes) -> None:
    s = STREAMS[name]
    data = lf(raw(s.fixture))
    head = cut_at(data, before)
    corrupted = head + MALFORMED + data[len(head):]
    for _label, chunks in chunkings(corrupted):
        usage, acc = account(s.api, chunks, s.request_model)
        assert usage == s.usage
        assert acc.malformed == 2
        assert "".join(acc.text) == s.text


def test_comments_and_blank_data_are_not_malformed() -> None:
    data = (b": OPENROUTER PROCESSING\n\n" + lf(raw("openai_chat_stream.sse"))
            + b": keep-alive\n\ndata: \n\n")
    usage, acc = account("openai", [data])
    assert usage == STREAMS["openai-chat"].usage
    assert acc.malformed == 0


# -- truncated streams --------------------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "marker", "extra", "streamed"),
    [
        # OpenAI chat: cut before the final usage chunk, and in the middle of it
        ("openai-chat", b'"choices":[],"usage":{', 0, OPENAI_CHAT_TEXT),
        ("openai-chat", b'"choices":[],"usage":{', 200, OPENAI_CHAT_TEXT),
        # ... and in the middle of a content delta: only the complete deltas streamed
        ("openai-chat", b'"content":" caf', 120, "Bonjour! Le"),
        # Responses API: cut before response.completed and inside it
        ("openai-responses", b"event: response.completed", 0, RESPONSES_TEXT),
        ("openai-responses", b"event: response.completed", 300, RESPONSES_TEXT),
        ("openai-responses", b'"delta":" Reykjav', 40, "The capital of Iceland is"),
    ],
)
def test_truncated_stream_without_usage_is_estimated(name: str, marker: bytes, extra: int,
                                                     streamed: str) -> None:
    s = STREAMS[name]
    data = cut_at(lf(raw(s.fixture)), marker, extra)
    for label, chunks in chunkings(data):
        if label == "bytewise":
            continue
        usage, acc = account(s.api, chunks, s.request_model, estimated_input=1234)
        assert usage.estimated is True
        assert acc.complete is False
        assert "".join(acc.text) == streamed
        model = acc.model or s.request_model
        assert usage == Usage(input=1234, output=count_tokens(streamed, model), estimated=True)
        assert usage.output > 0


def test_openai_stream_without_include_usage_is_estimated() -> None:
    """A client that did not ask for ``include_usage`` gets no usage chunk, only [DONE]."""
    data = lf(raw("openai_chat_stream.sse"))
    start = cut_at(data, b'"choices":[],"usage":{')
    without = start + data[data.index(b"data: [DONE]"):]
    usage, acc = account("openai", [without], "o4-mini", estimated_input=40)
    assert acc.complete is False and acc.events == 14
    assert usage == Usage(input=40, output=count_tokens(OPENAI_CHAT_TEXT, "o4-mini-2025-04-16"),
                          estimated=True)


ANTHROPIC_IN = {"input": 21 + 2048 + 312, "cache_read": 2048, "cache_write": 312}


@pytest.mark.parametrize(
    ("marker", "extra", "streamed"),
    [
        # after message_start, the thinking block and two text deltas
        (b'"text":"whispers to"', 0, ANTHROPIC_THINKING + "Soft rain on the roof\n"),
        # in the middle of a text delta
        (b'"text":" the sleeping"', 60, ANTHROPIC_THINKING + "Soft rain on the roof\nwhispers to"),
        # in the middle of message_delta: all text streamed, final output count lost
        (b"event: message_delta", 50, ANTHROPIC_THINKING + ANTHROPIC_TEXT),
    ],
)
def test_anthropic_cut_after_message_start_keeps_input(marker: bytes, extra: int,
                                                       streamed: str) -> None:
    s = STREAMS["anthropic"]
    data = cut_at(lf(raw(s.fixture)), marker, extra)
    for label, chunks in chunkings(data):
        if label == "bytewise":
            continue
        usage, acc = account("anthropic", chunks, s.request_model, estimated_input=5)
        assert "".join(acc.text) == streamed
        assert usage == Usage(**ANTHROPIC_IN, output=count_tokens(streamed, s.model),
                              estimated=True)


def test_anthropic_cut_right_after_message_start() -> None:
    data = cut_at(lf(raw("anthropic_messages_stream.sse")), b"event: content_block_start")
    usage, _ = account("anthropic", [data], "claude-sonnet-4-5", estimated_input=5)
    # nothing streamed: output is what message_start already reported, never less
    assert usage == Usage(**ANTHROPIC_IN, output=1, estimated=True)


def test_anthropic_error_event_mid_stream_is_estimated() -> None:
    data = lf(raw("anthropic_messages_stream.sse"))
    head = cut_at(data, b'"text":"whispers to"')
    errored = head + (b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
                      b'"message":"Overloaded"}}\n\n')
    usage, acc = account("anthropic", [errored], "claude-sonnet-4-5")
    streamed = ANTHROPIC_THINKING + "Soft rain on the roof\n"
    assert acc.malformed == 0
    assert usage == Usage(**ANTHROPIC_IN, output=count_tokens(streamed, "claude-sonnet-4-5"),
                          estimated=True)


def test_anthropic_message_delta_with_cumulative_input_fields() -> None:
    """Newer API versions repeat (cumulative) input and cache counts in message_delta; they
    supersede message_start's (e.g. server tools add input tokens)."""
    data = lf(raw("anthropic_messages_stream.sse")).replace(
        b'"usage":{"output_tokens":187}',
        b'"usage":{"input_tokens":1530,"cache_creation_input_tokens":312,'
        b'"cache_read_input_tokens":2048,"output_tokens":187,'
        b'"server_tool_use":{"web_search_requests":1}}')
    usage, acc = account("anthropic", [data])
    assert acc.complete
    assert usage == Usage(input=1530 + 2048 + 312, output=187, cache_read=2048, cache_write=312)


def test_gemini_cut_mid_final_chunk_keeps_last_cumulative_usage() -> None:
    s = STREAMS["gemini"]
    data = cut_at(lf(raw(s.fixture)), b'"finishReason":"STOP"', 80)
    for label, chunks in chunkings(data):
        if label == "bytewise":
            continue
        usage, acc = account("gemini", chunks, s.request_model, estimated_input=7)
        streamed = "Rain taps on the window,\nsoft"
        assert "".join(acc.text) == streamed
        assert acc.complete is False
        # the second chunk reported candidates 9 + thoughts 211; more than the streamed text
        assert usage == Usage(input=1043, output=max(220, count_tokens(streamed, s.model)),
                              cache_read=1024, reasoning=211, estimated=True)


def test_gemini_cut_inside_first_chunk_is_estimated_from_request() -> None:
    data = lf(raw("gemini_stream.sse"))[:60]
    usage, acc = account("gemini", [data], "gemini-2.5-flash", estimated_input=77)
    assert usage == Usage(input=77, output=0, estimated=True)
    assert acc.events == 0


def test_empty_stream_is_estimated_from_request() -> None:
    usage, _ = account("openai", [], "gpt-4o", estimated_input=12)
    assert usage == Usage(input=12, estimated=True)


# -- the SSE parser itself ------------------------------------------------------------------

def test_sse_parser_fields() -> None:
    p = SseParser()
    out = p.feed(b'event: message_start\ndata: {"a":\ndata: 1}\n\n')
    out += p.feed(b": comment\n\ndata:no-space\n\nid: 7\nretry: 100\ndata: x\n\n")
    assert out == [("message_start", '{"a":\n1}'), ("message", "no-space"), ("message", "x")]


def test_sse_parser_holds_incomplete_event() -> None:
    p = SseParser()
    assert p.feed(b"event: ping\r\ndata: {}\r\n") == []
    assert p.feed(b"\r") == []
    assert p.feed(b"\n") == [("ping", "{}")]


def test_sse_parser_multiline_json_event_is_parsed() -> None:
    data = (b'data: {"type":"content_block_delta","index":0,\n'
            b'data: "delta":{"type":"text_delta","text":"hi"}}\n\n')
    acc = StreamAccountant("anthropic")
    acc.feed(data)
    assert acc.text == ["hi"] and acc.malformed == 0
