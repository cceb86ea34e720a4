"""The end-to-end harness: a real mitmdump running fleetgate, real TLS upstreams, tokens.

Every later feature's e2e tests reuse these pieces:

* :class:`Upstream` — a TLS (or plain) HTTP/1.1 server on 127.0.0.1 that records every
  request it receives and speaks JSON and SSE; extend it with :meth:`Upstream.route`.
  Agents reach it **by name**, as they reach api.openai.com: ``up<port>.fleetgate.test``
  (plus any ``names`` it is given, on port 443), which every :class:`Gateway` started while
  it runs resolves to 127.0.0.1 through ``fleetgate_resolve`` (:func:`resolve_entries`).
* :class:`Gateway` — ``mitmdump -s addons/gateway.py`` on a free port with a rules file,
  a decision log and a metrics port; :meth:`Gateway.client` gives an httpx client that
  goes through it with a JWT in the proxy URL, exactly as an agent pod would.
* :func:`write_rules` — a minimal policy that lets agents reach the local upstreams.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import trustme

from fleetgate.identity.mint import mint_token

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "addons" / "gateway.py"
SECRET = b"e2e-secret-0123456789abcdef0123456789abcdef"


# -- upstream ---------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Handler = Callable[[BaseHTTPRequestHandler, "Seen"], None]


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Content-Encoding", "").lower() == "gzip":
            body = gzip.decompress(body)  # as providers accept gzip request bodies
        seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        self.server.owner.record(seen)
        path = self.path.partition("?")[0]
        handler = self.server.owner.routes.get(path, _echo)
        handler(self, seen)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle


def _echo(h: BaseHTTPRequestHandler, seen: Seen) -> None:
    body = json.dumps({"ok": True, "method": seen.method, "path": seen.path}).encode()
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if seen.method != "HEAD":
        h.wfile.write(body)


def sse_stream(events: int = 100, interval: float = 0.05) -> Handler:
    """A route that streams ``events`` SSE events, one every ``interval`` seconds."""

    def handler(h: BaseHTTPRequestHandler, seen: Seen) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        try:
            for i in range(events):
                chunk = f"data: {json.dumps({'n': i})}\n\n".encode()
                h.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                h.wfile.flush()
                time.sleep(interval)
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            h.server.owner.cut_streams += 1  # type: ignore[attr-defined]
        h.close_connection = True

    return handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: Upstream

    def get_request(self) -> tuple[Any, Any]:
        conn = super().get_request()
        with self.owner._lock:
            self.owner.connections += 1  # TCP connections accepted (reuse shows here)
        return conn


# name -> (port the name is used with, port the server listens on) of every live test server
_NAMES: dict[str, tuple[int, int]] = {}
_NAMES_LOCK = threading.Lock()


def upstream_name(port: int) -> str:
    """The host name agents use for the test server listening on ``port``."""
    return f"up{port}.fleetgate.test"


def register_name(name: str, port: int, listen_port: int) -> None:
    """Make gateways started from now on dial 127.0.0.1:``listen_port`` for ``name:port``."""
    with _NAMES_LOCK:
        _NAMES[name] = (port, listen_port)


def unregister_names(listen_port: int) -> None:
    with _NAMES_LOCK:
        for name in [n for n, (_, lp) in _NAMES.items() if lp == listen_port]:
            del _NAMES[name]


def resolve_entries() -> list[str]:
    """``fleetgate_resolve`` entries for every live test server (curl's ``--connect-to``)."""
    with _NAMES_LOCK:
        return [f"{name}:{port}=127.0.0.1:{listen}" for name, (port, listen) in _NAMES.items()]


class Upstream:
    """An HTTP(S) server on 127.0.0.1 that records what reaches it."""

    def __init__(self, ca: trustme.CA | None, names: tuple[str, ...] = ()) -> None:
        """``names`` (e.g. ``api.openai.com``) are served on port 443 as agents would use them."""
        self.seen: list[Seen] = []
        self.routes: dict[str, Handler] = {"/stream": sse_stream()}
        self.cut_streams = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _RequestHandler)
        self._server.owner = self
        self.tls = ca is not None
        self.port = self._server.server_address[1]
        self.name = upstream_name(self.port)
        self.names = names
        if ca is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert(self.name, *names, "127.0.0.1", "localhost").configure_cert(ctx)
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        register_name(self.name, self.port, self.port)
        for n in names:
            register_name(n, 443 if self.tls else 80, self.port)
        # a short poll: stop() waits for serve_forever to notice (0.5 s by default, per test)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The URL agents use: by name, through the gateway."""
        return f"{'https' if self.tls else 'http'}://{self.name}:{self.port}"

    @property
    def ip_url(self) -> str:
        """The URL for a direct connection (no gateway to resolve the name)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def paths(self) -> list[str]:
        with self._lock:
            return [s.path for s in self.seen]

    def route(self, path: str, handler: Handler) -> None:
        self.routes[path] = handler

    def stop(self) -> None:
        unregister_names(self.port)
        self._server.shutdown()
        self._server.server_close()


# -- rules ------------------------------------------------------------------------------


def write_rules(path: Path, ports: list[int], extra: str = "", revoked: list[str] = (),
                allow_private: str = '["127.0.0.1/32"]', top: str = "",
                revoked_roles: list[str] = (), hosts: list[str] = ()) -> Path:
    """A policy letting role ``tester`` (and ``other``) reach the local upstreams.

    The seed's deny rules are included verbatim; ``extra`` is appended to the ``agents`` list
    (more profiles), ``top`` adds top-level sections (e.g. ``llm:``), ``hosts`` more egress
    entries for the profile.
    """
    names = [f'"{upstream_name(p)}:{p}", "127.0.0.1:{p}", "localhost:{p}"' for p in ports]
    names += [json.dumps(h) for h in hosts]  # more egress entries, e.g. "api.openai.com:443"
    hosts_text = ", ".join(names)
    text = f"""apiVersion: fleetgate/v1
{top}
destinations:
  allowPrivate: {allow_private}
revoked:
  agents: {json.dumps(list(revoked))}
  roles: {json.dumps(list(revoked_roles))}
authorization:
  rules:
  - deny: 'request.path.contains("delete")'
  - deny: 'request.path.contains("destroy")'
  - deny: 'request.path.contains("drop")'
agents:
- name: tester
  match: 'jwt.agent_role in ["tester", "other"]'
  egress:
    hosts: [{hosts_text}]
  authorization:
    rules:
    - id: tester.allow
      allow: 'request.method in ["GET", "POST", "HEAD"]'
{extra}"""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic, like an editor's save or a ConfigMap swap
    return path


# -- gateway ----------------------------------------------------------------------------

_LISTEN = re.compile(r"proxy listening at .*?:(\d+)")
_METRICS = re.compile(r"fleetgate metrics listening at http://[\d.]+:(\d+)")
_ADMIN = re.compile(r"fleetgate admin API listening at http://[\d.]+:(\d+)")
ADMIN_TOKEN = "e2e-admin-token-0123456789"


def mitmproxy_exe(tool: str = "mitmdump") -> str:
    exe = shutil.which(tool, path=str(Path(sys.executable).parent)) or shutil.which(tool)
    assert exe, f"{tool} not installed"
    return exe


@dataclass
class Gateway:
    """A running ``mitmdump -s addons/gateway.py``."""

    rules: Path
    workdir: Path
    confdir: Path
    upstream_ca: Path
    options: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[str] | None = None
    port: int = 0
    metrics_port: int = 0
    admin_port: int = 0
    output: list[str] = field(default_factory=list)
    tool: str = "mitmdump"

    @property
    def ca_cert(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    @property
    def decision_log(self) -> Path:
        return self.workdir / "decisions.log"

    def argv(self) -> list[str]:
        secret = self.workdir / "jwt.secret"
        secret.write_bytes(SECRET)
        opts = {
            "confdir": str(self.confdir),
            "fleetgate_rules": str(self.rules),
            "fleetgate_jwt_secret_file": str(secret),
            "fleetgate_metrics_listen": "127.0.0.1:0",
            "fleetgate_admin_listen": "127.0.0.1:0",
            "fleetgate_admin_token": ADMIN_TOKEN,
            "fleetgate_decision_log": str(self.decision_log),
            "fleetgate_reload_ms": "200",
            "ssl_verify_upstream_trusted_ca": str(self.upstream_ca),
            **self.options,
        }
        argv = [mitmproxy_exe(self.tool), "-s", str(SCRIPT), "--listen-host", "127.0.0.1",
                "--listen-port", "0"]
        if self.tool == "mitmweb":
            argv += ["--web-host", "127.0.0.1", "--web-port", str(free_port()),
                     "--set", "web_open_browser=false"]
        else:
            argv += ["--flow-detail", "0"]
        for k, v in opts.items():
            argv += ["--set", f"{k}={v}"]
        if "fleetgate_resolve" not in opts:
            for entry in resolve_entries():
                argv += ["--set", f"fleetgate_resolve={entry}"]
        return argv

    def start(self, timeout: float = 30.0) -> Gateway:
        self.proc = subprocess.Popen(
            self.argv(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd=self.workdir, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # its log lines as they are written
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = "\n".join(self.output)
            if ((m := _LISTEN.search(text)) and (mm := _METRICS.search(text))
                    and (ma := _ADMIN.search(text))):
                self.port, self.metrics_port = int(m.group(1)), int(mm.group(1))
                self.admin_port = int(ma.group(1))
                return self
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise RuntimeError(f"mitmdump exited {self.proc.returncode}:\n{self.text()}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mitmdump did not start:\n{self.text()}")

    def _pump(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            self.output.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.output)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()

    # -- clients ------------------------------------------------------------------

    def proxy_url(self, token: str | None) -> str:
        auth = f"agent:{token}@" if token else ""
        return f"http://{auth}127.0.0.1:{self.port}"

    def client(self, token: str | None, **kw: Any) -> httpx.Client:
        """An httpx client configured like an agent pod: HTTPS_PROXY with the JWT + our CA."""
        return httpx.Client(proxy=self.proxy_url(token), verify=ssl_context(self.ca_cert),
                            timeout=kw.pop("timeout", 10.0), **kw)

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def admin(self, path: str, body: dict[str, Any] | None = None,
              token: str | None = ADMIN_TOKEN) -> httpx.Response:
        """GET (or POST ``body`` to) the admin API, with the admin token by default."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if body is None:
            return httpx.get(self.admin_url + path, headers=headers, timeout=35)
        return httpx.post(self.admin_url + path, json=body, headers=headers, timeout=35)

    def ready(self) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/healthz/ready", timeout=5)

    def decisions(self) -> list[dict[str, Any]]:
        """The decision log's whole lines. The gateway's writer thread may be in the middle of
        a line when the test reads: a last line without its newline is not there yet."""
        if not self.decision_log.exists():
            return []
        text = self.decision_log.read_text()
        if not text.endswith("\n"):
            text = text[:text.rfind("\n") + 1]
        return [json.loads(line) for line in text.splitlines() if line]

    def wait_for_decision(self, predicate: Callable[[dict[str, Any]], bool],
                          timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for d in self.decisions():
                if predicate(d):
                    return d
            time.sleep(0.05)
        raise AssertionError(f"no matching decision; log: {self.decisions()}")

    def wait_for_output(self, needle: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in gateway output:\n{self.text()}")


def ssl_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def token(sub: str = "agent-1", role: str = "tester", ttl: int = 600, **claims: Any) -> str:
    return mint_token(SECRET, sub, ttl, {"agent_role": role, **claims})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_response(s: socket.socket | ssl.SSLSocket) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1 answer from a raw socket: (status, lower-cased headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def raw_connect(port: int, target: str, proxy_auth: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """Send a bare CONNECT and return (status, headers, body) of the proxy's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        req = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        if proxy_auth:
            req += f"Proxy-Authorization: {proxy_auth}\r\n"
        s.sendall((req + "\r\n").encode())
        return read_response(s)


def wait_until(cond: Callable[[], bool], timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()

