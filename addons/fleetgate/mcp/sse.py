"""Server-sent events, re-framed one event at a time.

MCP servers answer on event streams (streamable HTTP POST and GET streams, the older HTTP+SSE
transport). The gateway must rewrite some events (a ``tools/list`` result filtered for the
agent, a denied call's placeholder turned into its error) without ever holding more than the
event being read: :class:`SseRewriter` is fed raw chunks, returns at once every complete
event (unchanged bytes when the transform leaves it alone) and keeps only the incomplete tail.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from fleetgate.errors import RequestError

__all__ = ["Event", "SseError", "SseRewriter"]


class SseError(RequestError):
    """The stream cannot be re-framed safely (an event beyond the size limit)."""


@dataclass(frozen=True)
class Event:
    """One parsed event: its type (``message`` by default), data lines joined by ``\\n``,
    and its ``id`` if any."""

    type: str
    data: str
    id: str | None


# transform(event) -> replacement data for the event (str), or None to keep it as it was
Transform = Callable[[Event], str | None]


# A blank line: two line ends in a row, where a line end is CRLF, a CR not followed by LF, or
# LF (the SSE spec; what httpx-sse and browsers split on). ``\n\r`` + ``data`` is a blank line
# too: a fixed list of separators missed it and glued two events into one.
_BLANK_LINE = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")


def _boundary(buf: bytes | bytearray, start: int) -> tuple[int, int] | None:
    """(end of event, start of next) for the first blank line at or after ``start``.

    The pattern is tried only where a line end is (found at memchr speed): searching it
    byte by byte through a 385 kB ``tools/list`` event cost ~7 ms, more than judging it."""
    m = None
    # the next LF / CR at or after ``start`` (-1: none left), each looked up again only once
    # passed, so a run of lone CRs costs linear time, not quadratic
    lf, cr = buf.find(b"\n", start), buf.find(b"\r", start)
    while True:
        if 0 <= lf < start:
            lf = buf.find(b"\n", start)
        if 0 <= cr < start:
            cr = buf.find(b"\r", start)
        at = lf if cr < 0 else cr if lf < 0 else min(lf, cr)
        if at < 0:
            return None
        m = _BLANK_LINE.match(buf, at)
        if m is not None:
            break
        start = at + 1
    if m is None or (m.end() == len(buf) and buf[-1:] == b"\r"):
        return None  # a CR last: it may be the first half of a CRLF still on its way
    return m.start(), m.end()


def parse_event(raw: bytes) -> Event | None:
    """Parse one event's lines (no trailing blank line); ``None`` for comment-only blocks."""
    etype, eid, data, seen = "message", None, [], False
    # a byte order mark is skipped by spec-following clients: never let it hide a field
    text = raw.decode("utf-8", errors="replace").removeprefix("\ufeff")
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line or line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
            seen = True
        elif field == "event":
            etype = value or "message"
            seen = True
        elif field == "id":
            eid = value
            seen = True
    if not seen:
        return None
    return Event(etype, "\n".join(data), eid)


def render_event(event: Event, data: str) -> bytes:
    """An event with new data, in canonical framing (``\\n`` line ends, blank line after)."""
    lines = []
    if event.type != "message":
        lines.append(f"event: {event.type}")
    if event.id is not None:
        lines.append(f"id: {event.id}")
    lines.extend(f"data: {part}" for part in data.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


class SseRewriter:
    """Feed chunks in, get complete (possibly rewritten) events out.

    ``max_event`` bounds the bytes held for one event; a larger event raises
    :class:`SseError` (the caller cuts the stream: it cannot be judged).
    """

    def __init__(self, transform: Transform, max_event: int) -> None:
        self.transform = transform
        self.max_event = max_event
        self._buf = bytearray()
        self._scan = 0  # where the search for the next blank line resumes
        self.events = 0
        self.rewritten = 0

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        self._buf += chunk
        out = bytearray()
        pos = 0
        while True:
            found = _boundary(self._buf, max(pos, self._scan))
            if found is None:
                break
            end, nxt = found
            raw = bytes(self._buf[pos:end])
            out += self._one(raw, bytes(self._buf[pos:nxt]))
            pos = nxt
        del self._buf[:pos]
        # a separator may straddle this chunk's end: resume a few bytes before it
        self._scan = max(0, len(self._buf) - 3)
        if len(self._buf) > self.max_event:
            raise SseError(f"an event exceeds {self.max_event} bytes")
        return bytes(out)

    def _one(self, raw: bytes, original: bytes) -> bytes:
        event = parse_event(raw)
        if event is None:
            return original  # comment / keep-alive
        self.events += 1
        new = self.transform(event)
        if new is None:
            return original
        self.rewritten += 1
        return render_event(event, new)

    def drain(self) -> bytes:
        """Hand back what is held, unjudged: for a stream found not to need judging."""
        out = bytes(self._buf)
        self._buf.clear()
        self._scan = 0
        return out

    def finish(self) -> bytes:
        """End of stream: an unterminated last event is judged too, never passed unread."""
        if not self._buf:
            return b""
        raw = bytes(self._buf)
        self._buf.clear()
        self._scan = 0
        return self._one(raw, raw)
