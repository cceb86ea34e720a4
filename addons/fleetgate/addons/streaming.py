"""StreamPassthrough: event streams and large bodies flow chunk by chunk, never buffered.

mitmproxy buffers a whole response unless ``flow.response.stream`` is set in
``responseheaders`` (measured: first SSE event after 2.0 s buffered, 8 ms streamed). LLM
and MCP answers are event streams, so they are streamed; a download of unknown or large
size is streamed too, so a 50 MB body costs the gateway one chunk of memory, not 50 MB.
Later addons that need to read a body (token counting) wrap the stream with a callable
instead of buffering it.
"""

from __future__ import annotations

from typing import Any

from mitmproxy import ctx, exceptions, http

from fleetgate.addons.flowtools import fail_closed
from fleetgate.addons.state import body_needed

STREAMED = "fleetgate.streamed"
STREAM_TYPES = ("text/event-stream", "application/x-ndjson", "application/jsonl")


def is_event_stream(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() in STREAM_TYPES


def should_stream(content_type: str, content_length: str | None, min_bytes: int) -> bool:
    """Event streams always; other bodies when larger than ``min_bytes`` or of unknown size."""
    if is_event_stream(content_type):
        return True
    if min_bytes <= 0:
        return False
    if content_length is None or not content_length.strip().isdigit():
        return True
    return int(content_length) >= min_bytes


class StreamPassthrough:
    def load(self, loader: Any) -> None:
        loader.add_option(
            "fleetgate_stream_min_bytes", int, 1024 * 1024,
            "Stream (never buffer) response bodies of at least this many bytes, or of unknown "
            "length; event streams are always streamed. 0 streams only event streams.")

    def configure(self, updated: set[str]) -> None:
        if "fleetgate_stream_min_bytes" in updated and ctx.options.fleetgate_stream_min_bytes < 0:
            raise exceptions.OptionsError("fleetgate_stream_min_bytes must be >= 0")

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if (flow.error or not flow.live or flow.response is None or flow.response.stream
                or body_needed(flow)):
            return
        headers = flow.response.headers
        if should_stream(headers.get("content-type", ""), headers.get("content-length"),
                         ctx.options.fleetgate_stream_min_bytes):
            flow.response.stream = True
            flow.metadata[STREAMED] = True
