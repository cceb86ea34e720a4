"""The benchmark's upstream: a TLS server on 127.0.0.1 (reached as ``localhost``) that plays an
LLM API, an MCP server and a file server. Runs in its own process (uvicorn + httptools + uvloop,
one raw ASGI app) so its work never shares the load generator's GIL.

    python bench/upstream.py --cert CERT.pem --key KEY.pem [--port 0]

prints one JSON line ``{"port": N, "stats_port": M, ...}`` on stdout once it accepts connections.

Counters: every TLS connection accepted and every request served are counted; a plain TCP
listener on ``stats_port`` (127.0.0.1) answers each connection with one JSON line
``{"connections": C, "requests": R}`` and closes it. It is a separate listener so that reading
the counters never adds a connection to them; the bench reads them between slices to see that
every agent's keep-alive connection is reused (``connections`` grows by one per client, not
per request).

Endpoints
* ``POST /v1/chat/completions`` — OpenAI-style. ``"stream": false``: a ``chat.completion`` JSON
  with ``usage``. ``"stream": true``: ``text/event-stream`` of ``chat.completion.chunk`` events,
  then a final chunk carrying ``usage`` (as with ``stream_options.include_usage``) and
  ``data: [DONE]``. Query parameters ``events`` (default 20) and ``interval_ms`` (default 10)
  shape the stream; it stops as soon as the client goes away (scenario (d) cuts long ones).
* ``POST /mcp`` — JSON-RPC 2.0 MCP server (stateless streamable HTTP): ``initialize``,
  ``tools/list`` (1,000 tools in 25 families such as ``nmap_*``, ``kubectl_*``, each with a
  one-sentence description and a small input schema, ~385 KB) and ``tools/call`` (a small JSON
  answer). Answers are ``application/json`` with Content-Length; ``?sse=1``: one ``message``
  event of ``text/event-stream`` instead. Scenario (c) and the soak.
* ``GET /download/<bytes>`` — that many bytes in 64 KiB chunks, ``application/octet-stream``,
  with ``Content-Length`` (``?chunked=1``: without, so the body has unknown length).
* ``GET /healthz`` — ``ok``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from typing import Any
from urllib.parse import parse_qs

Scope = dict[str, Any]

MCP_TOOLS = 1000
CONNECTIONS = 0  # TLS connections accepted (handshake done), see counting_protocol()
DOWNLOAD_CHUNK = 64 * 1024
_ZEROS = b"\0" * DOWNLOAD_CHUNK


def completion(stream_id: str, prompt_tokens: int) -> bytes:
    body = {
        "id": stream_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "bench-model",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 10,
                  "total_tokens": prompt_tokens + 10},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def chunk_event(stream_id: str, created: int, i: int) -> bytes:
    body = {"id": stream_id, "object": "chat.completion.chunk", "created": created,
            "model": "bench-model",
            "choices": [{"index": 0, "delta": {"content": f" token{i}"}, "finish_reason": None}]}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def usage_event(stream_id: str, created: int, events: int) -> bytes:
    body = {"id": stream_id, "object": "chat.completion.chunk", "created": created,
            "model": "bench-model",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": events, "total_tokens": 12 + events}}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


# The MCP server's catalogue: 25 tool families (a CLI or service each) x 10 verbs x 4 objects =
# 1,000 tools, named like "trivy_describe_image". Descriptions are plain and clean: nothing a
# tool-poisoning scanner should flag (no URLs, no instructions, no file paths, no credentials).
MCP_FAMILIES: list[tuple[str, str, tuple[str, str, str, str]]] = [
    ("nmap", "network scanner", ("host", "port", "service", "script")),
    ("trivy", "vulnerability scanner", ("image", "filesystem", "repository", "sbom")),
    ("falco", "runtime security monitor", ("rule", "alert", "event", "output")),
    ("terraform", "infrastructure-as-code tool", ("plan", "state", "module", "workspace")),
    ("kubectl", "Kubernetes command line", ("pod", "deployment", "service", "namespace")),
    ("helm", "Kubernetes package manager", ("release", "chart", "repository", "value")),
    ("istioctl", "service mesh command line", ("proxy", "gateway", "route", "policy")),
    ("dig", "DNS lookup tool", ("record", "zone", "resolver", "delegation")),
    ("traceroute", "network path tracer", ("path", "hop", "probe", "route")),
    ("tcpdump", "packet capture tool", ("capture", "filter", "interface", "packet")),
    ("github", "code hosting service", ("repository", "issue", "pull_request", "workflow")),
    ("jira", "issue tracker", ("issue", "project", "sprint", "board")),
    ("slack", "team chat service", ("channel", "message", "thread", "reminder")),
    ("postgres", "relational database", ("table", "index", "query", "role")),
    ("s3", "object storage service", ("bucket", "object", "lifecycle", "inventory")),
    ("grafana", "dashboard service", ("dashboard", "panel", "folder", "annotation")),
    ("prometheus", "metrics database", ("metric", "target", "rule", "series")),
    ("pagerduty", "on-call service", ("incident", "schedule", "service", "escalation")),
    ("docker", "container engine", ("container", "image", "volume", "network")),
    ("argocd", "GitOps deployment tool", ("application", "project", "sync", "cluster")),
    ("sentry", "error tracking service", ("issue", "event", "release", "project")),
    ("elastic", "search engine", ("index", "document", "mapping", "alias")),
    ("confluence", "team wiki", ("page", "space", "comment", "attachment")),
    ("jenkins", "build server", ("job", "build", "node", "pipeline")),
    ("redis", "key-value store", ("key", "stream", "channel", "slowlog")),
]
MCP_VERBS: dict[str, str] = {
    "list": "List the {o}s known to the {w}, newest first, with a one-line status for each.",
    "get": "Fetch one {o} from the {w} by name and return its fields as a JSON object.",
    "describe": "Describe a {o} of the {w} in detail, including recent changes and its owner.",
    "create": "Create a {o} in the {w} from the given fields. Fails if it already exists.",
    "update": "Change the fields of an existing {o} in the {w}; fields not given are kept.",
    "delete": "Remove a {o} from the {w}. Returns what was removed so it can be restored.",
    "search": "Search the {o}s of the {w} for a phrase and return the best matches.",
    "export": "Export the {o}s of the {w} as JSON lines, for offline analysis.",
    "validate": "Check a {o} of the {w} for mistakes without changing anything.",
    "watch": "Wait up to the given number of seconds for a {o} of the {w} to change.",
}


def mcp_tools() -> list[dict[str, Any]]:
    """The 1,000 tool definitions of ``tools/list`` (~385 KB of JSON)."""
    tools = []
    for family, what, objects in MCP_FAMILIES:
        for verb, text in MCP_VERBS.items():
            for obj in objects:
                noun = obj.replace("_", " ")
                tools.append({
                    "name": f"{family}_{verb}_{obj}",
                    "description": text.format(o=noun, w=what),
                    "inputSchema": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "description": f"which {noun}"},
                            "scope": {"type": "string", "description": "project, namespace or account"},
                            "limit": {"type": "integer", "minimum": 1, "maximum": 500},
                        },
                        "required": ["name"] if verb not in ("list", "search", "export") else [],
                    },
                })
    assert len(tools) == MCP_TOOLS
    return tools


def counting_protocol(base: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class, counting the connections it is made for (one instance per
    connection; with TLS, ``connection_made`` runs once the handshake is done). An integer
    increment per connection: nothing a request pays for."""

    class Counting(base):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: Any) -> None:
            global CONNECTIONS
            CONNECTIONS += 1
            super().connection_made(transport)

    return Counting


class App:
    """The raw ASGI app. Counters are for sanity checks only."""

    def __init__(self) -> None:
        self.requests = 0
        self.tools = mcp_tools()
        self.tools_list_cache: dict[str, bytes] = {}  # JSON-RPC id -> answer

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        self.requests += 1
        method, path = scope["method"], scope["path"]
        query = {k: v[-1] for k, v in parse_qs(scope["query_string"].decode()).items()}
        if method == "POST" and path == "/v1/chat/completions":
            body = await read_body(receive)
            await self.chat(body, query, receive, send)
        elif method == "POST" and path == "/mcp":
            body = await read_body(receive)
            await self.mcp(body, query, send)
        elif method == "GET" and path.startswith("/download/"):
            await self.download(path, query, send)
        elif path == "/healthz":
            await respond(send, 200, b"ok", b"text/plain")
        else:
            await respond(send, 404, b'{"error":"not found"}')

    async def chat(self, body: bytes, query: dict[str, str], receive: Any, send: Any) -> None:
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            await respond(send, 400, b'{"error":"bad json"}')
            return
        stream_id = f"chatcmpl-{self.requests}"
        if not req.get("stream"):
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in req.get("messages", []))
            await respond(send, 200, completion(stream_id, prompt_tokens))
            return
        events = int(query.get("events", 20))
        interval = float(query.get("interval_ms", 10)) / 1000
        created = int(time.time())
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        # The body has been read, so the next receive() returns only when the client has gone
        # (http.disconnect). uvicorn drops writes after a disconnect without an error, so
        # without this a stream cut by the proxy (scenario (d): minutes long, 110 at a time)
        # would keep producing events nobody reads and steal the CPU the proxy is measured on.
        gone = asyncio.ensure_future(receive())
        try:
            for i in range(events):
                if gone.done():
                    return
                await send({"type": "http.response.body", "body": chunk_event(stream_id, created, i),
                            "more_body": True})
                if interval > 0:
                    await asyncio.sleep(interval)
            await send({"type": "http.response.body",
                        "body": usage_event(stream_id, created, events) + b"data: [DONE]\n\n",
                        "more_body": False})
        finally:
            gone.cancel()

    async def mcp(self, body: bytes, query: dict[str, str], send: Any) -> None:
        """JSON-RPC over HTTP POST (MCP streamable HTTP, stateless: no session id). The answer is
        ``application/json`` with a Content-Length, or with ``?sse=1`` one ``message`` event of
        ``text/event-stream`` (chunked), as a streamable-HTTP server may choose either."""
        sse = query.get("sse") == "1"
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            await respond(send, 400, b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700}}')
            return
        rid, method = req.get("id"), req.get("method")
        if method == "tools/list":
            key = json.dumps(rid)
            cached = self.tools_list_cache.get(key)
            if cached is None:
                cached = json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"tools": self.tools}},
                                    separators=(",", ":")).encode()
                if len(self.tools_list_cache) < 64:
                    self.tools_list_cache[key] = cached
            await self.mcp_answer(send, cached, sse)
            return
        if method == "initialize":
            result: dict[str, Any] = {"protocolVersion": "2025-06-18",
                                      "capabilities": {"tools": {"listChanged": False}},
                                      "serverInfo": {"name": "bench-mcp", "version": "1.0"}}
        elif method == "tools/call":
            params = req.get("params") or {}
            name = params.get("name", "")
            args = params.get("arguments") or {}
            summary = {"tool": name, "name": args.get("name"), "matches": 3,
                       "findings": [{"id": "CVE-2024-0001", "severity": "medium"},
                                    {"id": "CVE-2024-0002", "severity": "low"}]}
            result = {"content": [{"type": "text", "text": json.dumps(summary)}], "isError": False}
        else:
            out = {"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "method not found"}}
            await self.mcp_answer(send, json.dumps(out).encode(), sse)
            return
        await self.mcp_answer(send, json.dumps({"jsonrpc": "2.0", "id": rid, "result": result}).encode(),
                              sse)

    @staticmethod
    async def mcp_answer(send: Any, payload: bytes, sse: bool) -> None:
        if not sse:
            await respond(send, 200, payload)
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        await send({"type": "http.response.body", "body": b"event: message\ndata: " + payload + b"\n\n",
                    "more_body": False})

    async def download(self, path: str, query: dict[str, str], send: Any) -> None:
        try:
            total = int(path.rsplit("/", 1)[1])
        except ValueError:
            await respond(send, 400, b'{"error":"bad size"}')
            return
        headers = [(b"content-type", b"application/octet-stream")]
        if query.get("chunked") != "1":
            headers.append((b"content-length", str(total).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        left = total
        while left > 0:
            n = min(left, DOWNLOAD_CHUNK)
            left -= n
            await send({"type": "http.response.body",
                        "body": _ZEROS if n == DOWNLOAD_CHUNK else _ZEROS[:n], "more_body": left > 0})
        if total == 0:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def read_body(receive: Any) -> bytes:
    parts = []
    while True:
        msg = await receive()
        parts.append(msg.get("body", b""))
        if not msg.get("more_body"):
            return b"".join(parts)


async def respond(send: Any, status: int, body: bytes, ctype: bytes = b"application/json") -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", ctype), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cert", required=True, help="PEM certificate chain for 127.0.0.1")
    ap.add_argument("--key", required=True, help="PEM private key")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(4096)
    port = sock.getsockname()[1]
    loop = "uvloop"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        loop = "asyncio"
    http = "httptools"
    try:
        import httptools  # noqa: F401
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Proto
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Proto  # type: ignore[assignment]
        http = "h11"
    app = App()
    config = uvicorn.Config(app, loop=loop, http=counting_protocol(Proto), log_level="warning",
                            access_log=False, lifespan="on", ssl_certfile=args.cert, ssl_keyfile=args.key,
                            timeout_keep_alive=900, backlog=4096)
    server = uvicorn.Server(config)

    async def stats(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps({"connections": CONNECTIONS, "requests": app.requests}).encode() + b"\n")
        try:
            await writer.drain()
        finally:
            writer.close()

    async def serve() -> None:
        stats_server = await asyncio.start_server(stats, "127.0.0.1", 0)
        stats_port = stats_server.sockets[0].getsockname()[1]
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
                return
            await asyncio.sleep(0.01)
        print(json.dumps({"port": port, "stats_port": stats_port, "loop": loop, "http": http}), flush=True)
        await task
        stats_server.close()

    factory = config.get_loop_factory() if hasattr(config, "get_loop_factory") else None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve())
    sys.exit(0)


if __name__ == "__main__":
    main()
