"""A stand-in LLM provider speaking the OpenAI and Anthropic wire formats, with usage.

``/v1/chat/completions`` (OpenAI) and ``/v1/messages`` (Anthropic), JSON and streaming (SSE,
chunked), each answer carrying the usage fields the real APIs send, so that everything the
gateway meters (tokens, dollars, budgets, cuts) can be seen without a network or an API key.

One code base for the offline demo (:class:`LlmProvider`, a small threaded HTTPS server) and
the end-to-end tests (which mount the same handlers on their own recording server with
:func:`install`). The handlers only need what :class:`SeenRequest` and :class:`Routes`
describe, so any server that records requests that way can serve them.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

OPENAI_USAGE: dict[str, Any] = {
    "prompt_tokens": 23, "completion_tokens": 7, "total_tokens": 30,
    "prompt_tokens_details": {"cached_tokens": 10, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 2, "audio_tokens": 0,
                                  "accepted_prediction_tokens": 0,
                                  "rejected_prediction_tokens": 0}}
ANTHROPIC_USAGE: dict[str, Any] = {"input_tokens": 12, "output_tokens": 15,
                                   "cache_creation_input_tokens": 3,
                                   "cache_read_input_tokens": 100}
WORDS = ["Hello", " from", " the", " fake", " model", "."]

# errors a handler sees when the client (or the gateway, cutting a flow) goes away mid-answer
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError)


class SeenRequest(Protocol):
    """What a handler reads about the request (the e2e harness's ``Seen`` is one)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Handler = Callable[[BaseHTTPRequestHandler, SeenRequest], None]


class Routes(Protocol):
    """A server handlers can be mounted on (the e2e harness's ``Upstream`` is one)."""

    def route(self, path: str, handler: Handler) -> None: ...


class Control:
    """Knobs a test or the demo turns: hold the stream after the first event, cut it mid-way,
    report other usage. Times are ``time.monotonic()``."""

    def __init__(self) -> None:
        self.release_after_first = threading.Event()
        self.hold_after_first = False
        self.hold_timeout = 10.0
        self.cut_after: int | None = None
        self.finished_at: float | None = None
        self.first_sent_at: float | None = None
        self.openai_usage: dict[str, Any] | None = None  # None: OPENAI_USAGE
        self.anthropic_usage: dict[str, Any] | None = None  # None: ANTHROPIC_USAGE
        self.client_gone = 0  # streams whose reader went away before the end


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
    try:
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
                    ctl.release_after_first.wait(ctl.hold_timeout)
            time.sleep(0.005)
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()
    except CLIENT_GONE:
        ctl.client_gone += 1
        h.close_connection = True
        return
    ctl.finished_at = time.monotonic()


def openai_chat(ctl: Control) -> Handler:
    """``POST /v1/chat/completions``; streams send the usage chunk only when asked for it
    (``stream_options.include_usage``), as OpenAI does."""

    def handler(h: BaseHTTPRequestHandler, seen: SeenRequest) -> None:
        req = json.loads(seen.body)
        usage = ctl.openai_usage or OPENAI_USAGE
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
                           "usage": usage})
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
            events.append(data([], usage=usage))
        events.append("data: [DONE]\n\n")
        _events(h, ctl, events)

    return handler


def anthropic_messages(ctl: Control) -> Handler:
    """``POST /v1/messages``; streams report input usage in ``message_start`` and the output
    in ``message_delta``, as Anthropic does."""

    def handler(h: BaseHTTPRequestHandler, seen: SeenRequest) -> None:
        req = json.loads(seen.body)
        usage = ctl.anthropic_usage or ANTHROPIC_USAGE
        model = req.get("model", "claude-sonnet-4-5-20250929")
        if not req.get("stream"):
            _json(h, 200, {"id": "msg_fg1", "type": "message", "role": "assistant",
                           "model": model, "content": [{"type": "text", "text": "".join(WORDS)}],
                           "stop_reason": "end_turn", "stop_sequence": None,
                           "usage": usage})
            return

        def ev(name: str, obj: dict[str, Any]) -> str:
            return f"event: {name}\ndata: {json.dumps(obj)}\n\n"

        start_usage = {**usage, "output_tokens": 1}
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
                                        "usage": {"output_tokens": usage["output_tokens"]}}),
                   ev("message_stop", {"type": "message_stop"})]
        _events(h, ctl, events)

    return handler


def install(server: Routes, ctl: Control | None = None) -> Control:
    """Mount both APIs on ``server``; the returned :class:`Control` steers them."""
    ctl = ctl or Control()
    server.route("/v1/chat/completions", openai_chat(ctl))
    server.route("/v1/messages", anthropic_messages(ctl))
    return ctl


# -- a server of its own (the demo) -----------------------------------------------------


class _Seen:
    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        self.method, self.path, self.headers, self.body = method, path, headers, body


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        seen = _Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        self.server.owner.record(seen)
        handler = self.server.owner.routes.get(self.path.partition("?")[0])
        if handler is None:
            _json(self, 404, {"error": {"type": "not_found_error", "message": f"no route {self.path}"}})
            return
        handler(self, seen)

    do_GET = do_POST = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: LlmProvider

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up is part of the show (the kill switch cuts streams)


class LlmProvider:
    """The mock provider on ``127.0.0.1:<port>``, over TLS with ``context`` (or plain HTTP).

    Use as a context manager; :attr:`control` steers the answers, :attr:`seen` holds every
    request that reached it (what the provider would have received).
    """

    def __init__(self, context: ssl.SSLContext | None, host: str = "127.0.0.1") -> None:
        self.routes: dict[str, Handler] = {}
        self.seen: list[SeenRequest] = []
        self._lock = threading.Lock()
        self._server = _Server((host, 0), _RequestHandler)
        self._server.owner = self
        if context is not None:
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port: int = self._server.server_address[1]
        self.control = install(self)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        kwargs={"poll_interval": 0.05}, name="mock-llm-provider")
        self._thread.start()

    def route(self, path: str, handler: Handler) -> None:
        self.routes[path] = handler

    def record(self, seen: SeenRequest) -> None:
        with self._lock:
            self.seen.append(seen)

    def stop(self) -> None:
        self.control.release_after_first.set()  # let a held stream end
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LlmProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
