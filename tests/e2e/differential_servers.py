"""Two real servers that record what they *read* of a request, for the differential test.

The gateway judges a request by its own reading of the bytes (mitmproxy's parser, then
:mod:`fleetgate.normalize`); the servers behind it read the same bytes with their own
parsers. The fleet runs two of those, so both are here, unmodified, on 127.0.0.1 over TLS:

* :class:`StarletteServer` — uvicorn (with httptools when installed, as ``uvicorn.run`` picks it,
  which is how the MCP SDK serves) and one Starlette catch-all route reading the request the
  way an app does: ``request.url.path``, ``request.headers.get``/``getlist``,
  ``request.query_params.get``/``getlist`` (Starlette's ``get`` is the *last* value).
* :class:`H11Server` — a bare h11 connection (h11 is what uvicorn's pure-Python protocol and
  httpx build on): the request target and header list exactly as h11 hands them over; the
  query read with ``parse_qs`` (the *first* value), the path decoded once with ``unquote`` as
  uvicorn's h11 protocol does (``#`` is not cut), an absolute-form target's authority taken
  as the host as RFC 9112 requires.

Both record a :class:`Reading` per request and answer with a JSON-RPC result for a JSON body
with an ``id`` (so MCP answers pass the gateway's strict parser) or ``{"ok": true}``.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote

import h11
import trustme
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from harness import register_name, unregister_names, upstream_name

__all__ = ["H11Server", "Reading", "StarletteServer"]


@dataclass(frozen=True)
class Reading:
    """What one server read of one request."""

    server: str
    method: str
    path: str  # the path the application routes on (decoded once)
    raw_path: str  # the request target's path as received
    host: str | None  # the Host header as the framework returns it
    hosts: tuple[str, ...]  # every Host header
    session_header: str | None  # Mcp-Session-Id as the framework's get() returns it
    session_headers: tuple[str, ...]
    session_query: str | None  # session_id as the framework's query get() returns it
    session_queries: tuple[str, ...]
    content_type: str | None
    content_types: tuple[str, ...]
    body_length: int
    case: str | None  # the X-Case header: which request of the corpus this is

    @property
    def session(self) -> str | None:
        """The session the server would act on: the header first, as the MCP SDK reads it."""
        return self.session_header if self.session_header is not None else self.session_query


def _answer(body: bytes) -> bytes:
    try:
        msg = json.loads(body)
    except ValueError:
        msg = None
    if isinstance(msg, dict) and "id" in msg:
        return json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": {}}).encode()
    return b'{"ok": true}'


class _Recorder:
    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.connections = 0
        self._lock = threading.Lock()

    def record(self, reading: Reading) -> None:
        with self._lock:
            self.readings.append(reading)

    def seen(self) -> list[Reading]:
        with self._lock:
            return list(self.readings)

    def clear(self) -> None:
        with self._lock:
            self.readings.clear()


def _cert_file(ca: trustme.CA, name: str, directory: Path) -> Path:
    path = directory / f"{name}.pem"
    ca.issue_cert(name, "127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(
        str(path))
    return path


class StarletteServer(_Recorder):
    """uvicorn + Starlette, one catch-all route, TLS with a certificate for its name."""

    label = "starlette"

    def __init__(self, ca: trustme.CA, directory: Path) -> None:
        super().__init__()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self.name = upstream_name(self.port)
        pem = _cert_file(ca, self.name, directory)
        app = Starlette(routes=[Route("/{path:path}", self._endpoint, methods=[
            "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])])
        config = uvicorn.Config(app, log_level="critical", lifespan="off",
                                ssl_certfile=str(pem), ssl_keyfile=str(pem))
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        register_name(self.name, self.port, self.port)

    async def _endpoint(self, request: Request) -> Response:
        body = await request.body()
        h, q = request.headers, request.query_params
        raw = request.scope.get("raw_path") or b""
        self.record(Reading(
            server=self.label, method=request.method, path=request.url.path,
            raw_path=raw.decode("latin-1").partition("?")[0], host=h.get("host"),
            hosts=tuple(h.getlist("host")), session_header=h.get("mcp-session-id"),
            session_headers=tuple(h.getlist("mcp-session-id")),
            session_query=q.get("session_id"), session_queries=tuple(q.getlist("session_id")),
            content_type=h.get("content-type"), content_types=tuple(h.getlist("content-type")),
            body_length=len(body), case=h.get("x-case")))
        return Response(_answer(body), media_type="application/json")

    def stop(self) -> None:
        unregister_names(self.port)
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()


class H11Server(_Recorder):
    """A TLS server speaking HTTP/1.1 through h11, one thread per connection."""

    label = "h11"

    def __init__(self, ca: trustme.CA, directory: Path) -> None:
        super().__init__()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self.name = upstream_name(self.port)
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ctx.load_cert_chain(str(_cert_file(ca, self.name, directory)))
        self._stopping = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        register_name(self.name, self.port, self.port)

    def _accept(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        try:
            with self._ctx.wrap_socket(raw, server_side=True) as sock:
                self._exchange(sock)
        except (OSError, ssl.SSLError):
            pass

    def _exchange(self, sock: ssl.SSLSocket) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    sock.sendall(conn.send(h11.Response(
                        status_code=400, headers=[("Content-Length", "0"),
                                                  ("Connection", "close")])) or b"")
                return
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.DONE:
                    return
                continue
            if isinstance(event, h11.Request):
                request, body = event, b""
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                self.record(self._reading(request, body))
                out = _answer(body)
                sock.sendall(conn.send(h11.Response(status_code=200, headers=[
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(out)))])) or b"")
                sock.sendall(conn.send(h11.Data(data=out)) or b"")
                sock.sendall(conn.send(h11.EndOfMessage()) or b"")
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
                request = None
            elif isinstance(event, h11.ConnectionClosed):
                return

    def _reading(self, request: h11.Request, body: bytes) -> Reading:
        target = request.target.decode("latin-1")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers]

        def values(name: str) -> tuple[str, ...]:
            return tuple(v for k, v in headers if k == name)  # h11 lower-cases names

        hosts, sids, ctypes = values("host"), values("mcp-session-id"), values("content-type")
        host = hosts[0] if hosts else None
        if "://" in target.partition("?")[0]:
            # absolute-form: RFC 9112 section 3.2.2, the target's authority is the host and
            # Host is ignored (Go's net/http, nginx and most servers do so)
            _, _, rest = target.partition("://")
            host, _, rest = rest.partition("/")
            target = "/" + rest
        raw_path, _, query = target.partition("?")
        params = parse_qs(query, keep_blank_values=True).get("session_id", [])
        return Reading(
            server=self.label, method=request.method.decode("latin-1"), path=unquote(raw_path),
            raw_path=raw_path, host=host, hosts=hosts,
            session_header=sids[0] if sids else None, session_headers=sids,
            session_query=params[0] if params else None, session_queries=tuple(params),
            content_type=ctypes[0] if ctypes else None, content_types=ctypes,
            body_length=len(body), case=next(iter(values("x-case")), None))

    def stop(self) -> None:
        unregister_names(self.port)
        self._stopping = True
        self._listener.close()
        self._thread.join(5)
