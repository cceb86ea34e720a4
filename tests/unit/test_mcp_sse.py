"""The SSE re-framer: events out as soon as they are complete, rewritten or byte-identical."""

from __future__ import annotations

import json

import hypothesis
import pytest
from hypothesis import strategies as st

from fleetgate.mcp.sse import Event, SseError, SseRewriter, parse_event


def upper(event: Event) -> str | None:
    return event.data.upper() if event.data.startswith("x") else None


STREAM = (b": keep-alive\n\n"
          b"event: endpoint\ndata: /messages/?session_id=abc\n\n"
          b"id: 7\r\ndata: xyz\r\n\r\n"
          b"data: {\"jsonrpc\":\"2.0\"}\n\n")


def test_events_pass_unchanged_unless_rewritten() -> None:
    seen: list[Event] = []

    def record(e: Event) -> str | None:
        seen.append(e)
        return upper(e)

    rw = SseRewriter(record, 1000)
    out = rw.feed(STREAM) + rw.finish()
    assert [(e.type, e.data, e.id) for e in seen] == [
        ("endpoint", "/messages/?session_id=abc", None), ("message", "xyz", "7"),
        ("message", '{"jsonrpc":"2.0"}', None)]
    assert out == (b": keep-alive\n\nevent: endpoint\ndata: /messages/?session_id=abc\n\n"
                   b"id: 7\ndata: XYZ\n\n" b"data: {\"jsonrpc\":\"2.0\"}\n\n")
    assert (rw.events, rw.rewritten) == (3, 1)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64])
def test_any_chunking_gives_the_same_output(size: int) -> None:
    whole = SseRewriter(upper, 1000)
    expected = whole.feed(STREAM) + whole.finish()
    rw = SseRewriter(upper, 1000)
    out = b"".join(rw.feed(STREAM[i:i + size]) for i in range(0, len(STREAM), size)) + rw.finish()
    assert out == expected


def test_an_event_is_released_as_soon_as_it_is_complete() -> None:
    rw = SseRewriter(upper, 1000)
    assert rw.feed(b"data: x1\n") == b""
    assert rw.feed(b"\n") == b"data: X1\n\n"
    assert rw.feed(b"data: a") == b""
    assert rw.finish() == b"data: a"  # unterminated tail: judged, kept as it was


def test_unterminated_tail_is_still_judged() -> None:
    rw = SseRewriter(upper, 1000)
    rw.feed(b"data: xtail")
    assert rw.finish() == b"data: XTAIL\n\n"


def test_oversized_event_is_an_error() -> None:
    rw = SseRewriter(upper, 16)
    with pytest.raises(SseError):
        rw.feed(b"data: " + b"a" * 40)


def test_multiline_data_and_json() -> None:
    e = parse_event(b"event: message\ndata: {\"a\":\ndata: 1}")
    assert e is not None and json.loads(e.data) == {"a": 1}
    assert parse_event(b": only a comment") is None


def test_drain_hands_back_the_held_tail() -> None:
    rw = SseRewriter(upper, 1000)
    assert rw.feed(b"data: x1\n\ndata: partial") == b"data: X1\n\n"
    assert rw.drain() == b"data: partial" and rw.finish() == b""


@pytest.mark.parametrize("sep", [b"\n\r", b"\r\r", b"\n\n", b"\r\n\r\n", b"\r\n\n", b"\n\r\n",
                                 b"\r\n\r"])
def test_every_blank_line_the_spec_knows_ends_an_event(sep: bytes) -> None:
    """A client (httpx-sse, browsers) ends an event at any two line ends in a row; reading
    ``\\n\\r`` as one line glued two events into one the gateway judged as a whole."""
    seen: list[str] = []

    def record(e: Event) -> None:
        seen.append(e.data)

    stream = b"data: first" + sep + b"data: second\n\n"
    for size in (1, 2, len(stream)):
        seen.clear()
        rw = SseRewriter(record, 1000)
        out = b"".join(rw.feed(stream[i:i + size]) for i in range(0, len(stream), size))
        out += rw.finish()
        assert seen == ["first", "second"]
        assert out == stream


def test_a_cr_at_a_chunk_end_waits_for_its_lf() -> None:
    rw = SseRewriter(upper, 1000)
    assert rw.feed(b"data: x1\r\n\r") == b""
    assert rw.feed(b"\ndata: a\n\n") == b"data: X1\n\ndata: a\n\n"


def test_a_byte_order_mark_does_not_hide_the_first_field() -> None:
    event = parse_event("\ufeffdata: {}".encode())
    assert event is not None and event.data == "{}"


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(st.binary(max_size=40).map(
    lambda b: bytes(b"\r\n\na"[x % 4] if x % 3 else x for x in b)), st.integers(0, 8))
def test_boundary_finds_what_a_plain_search_finds(buf: bytes, start: int) -> None:
    """The memchr-led boundary scan finds the same first blank line as the regex search."""
    from fleetgate.mcp.sse import _BLANK_LINE, _boundary
    m = _BLANK_LINE.search(buf, start)
    want = None if m is None or (m.end() == len(buf) and buf[-1:] == b"\r") else (m.start(),
                                                                                   m.end())
    assert _boundary(buf, start) == want
