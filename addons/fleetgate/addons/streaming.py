"""StreamPassthrough: event streams flow to the agent chunk by chunk, never buffered.

mitmproxy buffers a whole response unless ``flow.response.stream`` is set in
``responseheaders`` (measured: first SSE event after 2.0 s buffered, 8 ms streamed). LLM
and MCP answers are event streams, so they are streamed; later addons that count tokens
wrap the stream with a callable instead of buffering it.
"""

from __future__ import annotations

from mitmproxy import http

from fleetgate.addons.flowtools import fail_closed

STREAMED = "fleetgate.streamed"
STREAM_TYPES = ("text/event-stream", "application/x-ndjson", "application/jsonl")


def is_event_stream(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() in STREAM_TYPES


class StreamPassthrough:
    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.error or not flow.live or flow.response is None:
            return
        if is_event_stream(flow.response.headers.get("content-type", "")):
            if not flow.response.stream:
                flow.response.stream = True
            flow.metadata[STREAMED] = True
