"""Fake OpenAI and Anthropic APIs for the e2e upstream, speaking their documented wire formats.

Install with :func:`install`; each handler records what it saw so tests can assert on the
request the provider would have received (e.g. the injected ``stream_options``).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

from harness import Seen, Upstream

OPENAI_USAGE = {"prompt_tokens": 23, "completion_tokens": 7, "total_tokens": 30,
                "prompt_tokens_details": {"cached_tokens": 10, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 2, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0,
                                              "rejected_prediction_tokens": 0}}
ANTHROPIC_USAGE = {"input_tokens": 12, "output_tokens": 15, "cache_creation_input_tokens": 3,
                   "cache_read_input_tokens": 100}
WORDS = ["Hello", " from", " the", " fake", " model", "."]


class Control:
    """Knobs a test turns: hold the stream after the first event, cut it mid-way."""

    def __init__(self) -> None:
        self.release_after_first = threading.Event()
        self.hold_after_first = False
        self.cut_after: int | None = None
        self.finished_at: float | None = None
        self.first_sent_at: float | None = None


def _json(h: BaseHTTPRequestHandler, status: int, obj: Any) -> None:
    body = json.dumps(obj).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def _sse_start(h: BaseHTTPRequestHandler) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "text/event-stream; charset=utf-8")
    h.send_header("Cache-Control", "no-cache")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()


def _chunk(h: BaseHTTPRequestHandler, text: str) -> None:
    data = text.encode()
    h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    h.wfile.flush()


def _events(h: BaseHTTPRequestHandler, ctl: Control, events: list[str]) -> None:
    _sse_start(h)
    for i, ev in enumerate(events):
        if ctl.cut_after is not None and i >= ctl.cut_after:
            h.close_connection = True
            h.wfile.flush()
            h.connection.shutdown(2)  # drop the connection mid-stream, no terminator
            return
        _chunk(h, ev)
        if i == 0:
            ctl.first_sent_at = time.monotonic()
            if ctl.hold_after_first:
                ctl.release_after_first.wait(10)
        time.sleep(0.005)
    h.wfile.write(b"0\r\n\r\n")
    h.wfile.flush()
    ctl.finished_at = time.monotonic()


def openai_chat(ctl: Control):
    def handler(h: BaseHTTPRequestHandler, seen: Seen) -> None:
        req = json.loads(seen.body)
        model = req.get("model", "gpt-4o")
        resolved = "gpt-4o-2024-08-06" if model == "gpt-4o" else model
        base = {"id": "chatcmpl-fg1", "created": 1763900000, "model": resolved,
                "system_fingerprint": "fp_fg"}
        if not req.get("stream"):
            _json(h, 200, {**base, "object": "chat.completion", "service_tier": "default",
                           "choices": [{"index": 0, "logprobs": None, "finish_reason": "stop",
                                        "message": {"role": "assistant",
                                                    "content": "".join(WORDS),
                                                    "refusal": None, "annotations": []}}],
                           "usage": OPENAI_USAGE})
            return
        chunk = {**base, "object": "chat.completion.chunk"}

        def data(choices: list[dict[str, Any]], **more: Any) -> str:
            return f"data: {json.dumps({**chunk, 'choices': choices, **more})}\n\n"

        def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

        events = [data(choice({"role": "assistant", "content": ""}))]
        events += [data(choice({"content": w})) for w in WORDS]
        events.append(data(choice({}, "stop")))
        if (req.get("stream_options") or {}).get("include_usage"):
            events.append(data([], usage=OPENAI_USAGE))
        events.append("data: [DONE]\n\n")
        _events(h, ctl, events)

    return handler


def anthropic_messages(ctl: Control):
    def handler(h: BaseHTTPRequestHandler, seen: Seen) -> None:
        req = json.loads(seen.body)
        model = req.get("model", "claude-sonnet-4-5-20250929")
        if not req.get("stream"):
            _json(h, 200, {"id": "msg_fg1", "type": "message", "role": "assistant",
                           "model": model, "content": [{"type": "text", "text": "".join(WORDS)}],
                           "stop_reason": "end_turn", "stop_sequence": None,
                           "usage": ANTHROPIC_USAGE})
            return

        def ev(name: str, obj: dict[str, Any]) -> str:
            return f"event: {name}\ndata: {json.dumps(obj)}\n\n"

        start_usage = {**ANTHROPIC_USAGE, "output_tokens": 1}
        events = [ev("message_start", {"type": "message_start", "message": {
            "id": "msg_fg1", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}}),
            ev("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}}),
            ev("ping", {"type": "ping"})]
        for w in WORDS:
            events.append(ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                     "delta": {"type": "text_delta", "text": w}}))
        events += [ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
                   ev("message_delta", {"type": "message_delta",
                                        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                        "usage": {"output_tokens": ANTHROPIC_USAGE["output_tokens"]}}),
                   ev("message_stop", {"type": "message_stop"})]
        _events(h, ctl, events)

    return handler


def install(upstream: Upstream) -> Control:
    ctl = Control()
    upstream.route("/v1/chat/completions", openai_chat(ctl))
    upstream.route("/v1/messages", anthropic_messages(ctl))
    return ctl


def llm_rules_extra(port: int) -> str:
    """Top-level rules text declaring the local upstream as OpenAI and Anthropic providers."""
    return f"""llm:
  providers:
  - name: openai
    api: openai
    hosts: ["127.0.0.1:{port}"]
  - name: anthropic
    api: anthropic
    hosts: ["127.0.0.1:{port}"]
"""
