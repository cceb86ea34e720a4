"""The gateway's two HTTP listeners, never the proxy port: health/metrics and the admin API.

The health listener serves ``/metrics``, ``/healthz/*`` and read-only JSON views to anyone who
can reach its port (Prometheus, probes). The admin listener serves operator views (GET) and
actions (POST) and nothing else; every request needs ``Authorization: Bearer <admin token>``,
or, when no token is configured, a loopback client. Each is a small threaded WSGI server: it
answers without touching the proxy's event loop. Services register their views and actions on
a :class:`Routes` table handed to them by ``pipeline()``; nothing pokes at a server's dicts.
HttpAuthorization refuses to proxy to either address, so agents cannot reach them through the
gateway.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from fleetgate.approvals.operators import ADMIN, LOCAL, Operator, OperatorTable
from fleetgate.errors import NotFound, StateError
from fleetgate.metrics import GatewayMetrics

__all__ = ["HttpListener", "Routes"]

View = Callable[..., dict[str, Any]]
Action = Callable[..., dict[str, Any]]
App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class Routes:
    """A listener's JSON views (GET, query parameters as keyword arguments) and actions
    (POST, a JSON object body; a ``ValueError``/``TypeError`` from one answers 400, a
    :class:`~fleetgate.errors.NotFound` 404).

    A view path may end in one ``{name}`` segment (``/v1/trace/{session}``): the rest of the
    request path, decoded, is passed as the keyword ``name``."""

    def __init__(self) -> None:
        self.views: dict[str, View] = {}
        self.actions: dict[str, Action] = {}
        self.with_operator: set[str] = set()  # actions called as action(args, operator)
        self.apps: dict[str, App] = {}  # path prefix -> WSGI app doing its own auth (console)
        self._prefixed: dict[str, tuple[str, View]] = {}  # "/v1/trace/" -> ("session", view)

    def get(self, path: str, view: View) -> None:
        if path in self.views:
            raise ValueError(f"two views for {path}")
        self.views[path] = view
        head, _, last = path.rpartition("/")
        if last.startswith("{") and last.endswith("}"):
            self._prefixed[head + "/"] = (last[1:-1], view)

    def view_for(self, path: str) -> tuple[View, dict[str, str]] | None:
        """The view for ``path`` and the keyword its ``{name}`` segment binds, if any."""
        if path in self.views:
            return self.views[path], {}
        for prefix, (name, view) in self._prefixed.items():
            if path.startswith(prefix) and len(path) > len(prefix):
                # PEP 3333: PATH_INFO is the decoded bytes as latin-1; ids may be UTF-8
                raw = path[len(prefix):].encode("latin-1", "replace")
                return view, {name: raw.decode("utf-8", "replace")}
        return None

    def post(self, path: str, action: Action, *, operator: bool = False) -> None:
        """``operator=True``: the action is told who asked (``action(args, operator)``), for
        decisions people sign (approvals)."""
        if path in self.actions:
            raise ValueError(f"two actions for {path}")
        self.actions[path] = action
        if operator:
            self.with_operator.add(path)

    def call(self, path: str, args: dict[str, Any], operator: Operator) -> dict[str, Any]:
        """Run the action at ``path`` as ``operator`` (the admin API and the console)."""
        action = self.actions[path]
        if path in self.with_operator:
            return action(args, operator)
        return action(args)

    def mount(self, prefix: str, app: App) -> None:
        """Serve ``prefix`` (and below) with a WSGI ``app`` that authenticates on its own
        (with :meth:`HttpListener.authenticate`): the console's HTML pages."""
        self.apps[prefix] = app

    def paths(self) -> list[str]:
        return sorted({*self.views, *self.actions})


class _Quiet(WSGIRequestHandler):
    # Buffered: the status line, headers and body leave in one send, not five. Each send
    # gives up the GIL, and getting it back from a busy proxy loop can take a switch
    # interval (5 ms): an answer to a stop under load paid that once per write.
    wbufsize = -1

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class HttpListener:
    """One listener: the health one (``admin=False``) or the admin API (``admin=True``)."""

    def __init__(self, metrics: GatewayMetrics, status: Callable[[], dict[str, Any]],
                 admin: bool = False) -> None:
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._status = status
        self.admin = admin
        self.routes = Routes()
        self.admin_token = ""
        self.operators = OperatorTable()  # personal admin tokens (fleetgate_admin_users_file)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = make_server(host, port, self._app, _ThreadingWSGIServer, _Quiet)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="fleetgate-admin" if self.admin
                                        else "fleetgate-metrics", daemon=True)
        self._thread.start()
        addr = self.address
        assert addr is not None
        return addr

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if self.admin:
            return self._admin(path, environ, start_response)
        if path == "/metrics":
            return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path in ("/healthz/ready", "/healthz/live", "/healthz"):
            status = self._status()
            ok = True if path == "/healthz/live" else bool(status.get("ready"))
            return _answer(start_response, "200 OK" if ok else "503 Service Unavailable", status)
        if path in self.routes.views:
            return _answer(start_response, "200 OK", self.routes.views[path]())
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /healthz/ready\n"]

    def authenticate(self, token: str | None, peer: str = "") -> Operator | None:
        """Who presents ``token``: the shared admin token is ``admin``, a personal token of
        ``fleetgate_admin_users_file`` its operator; with neither configured, a loopback
        client is ``local``. ``None``: not an operator."""
        if token:
            if self.admin_token and hmac.compare_digest(token.encode(),
                                                        self.admin_token.encode()):
                return ADMIN
            found = self.operators.authenticate(token)
            if found is not None:
                return found
            return None
        if not self.admin_token and not len(self.operators) and _is_loopback(peer):
            return LOCAL
        return None

    def _admin(self, path: str, environ: dict[str, Any],
               start_response: Callable[..., Any]) -> Iterable[bytes]:
        for prefix, app in self.routes.apps.items():
            if path == prefix or path.startswith(prefix + "/"):
                return app(environ, start_response)
        auth = environ.get("HTTP_AUTHORIZATION", "")
        peer = environ.get("REMOTE_ADDR", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        operator = self.authenticate(token, peer)
        if operator is None:
            configured = self.admin_token or len(self.operators)
            return _answer(start_response, "401 Unauthorized", {
                "error": "the admin API needs 'Authorization: Bearer <admin token>' (see "
                         "fleetgate_admin_token_file, fleetgate_admin_users_file)" if configured
                         else "no admin token is configured: the admin API answers loopback "
                         "clients only"})
        method = environ.get("REQUEST_METHOD")
        actions = self.routes.actions
        found = self.routes.view_for(path)
        try:
            if method == "GET" and found is not None:
                query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
                return _answer(start_response, "200 OK", found[0](**{**query, **found[1]}))
            if method == "POST" and path in actions:
                size = int(environ.get("CONTENT_LENGTH") or 0)
                raw = environ["wsgi.input"].read(min(size, 1 << 20)) if size else b"{}"
                args = json.loads(raw or b"{}")
                if not isinstance(args, dict):
                    raise ValueError("the body must be a JSON object")
                return _answer(start_response, "200 OK",
                               self.routes.call(path, args, operator))
        except (ValueError, TypeError) as exc:
            return _answer(start_response, "400 Bad Request", {"error": str(exc)})
        except NotFound as exc:
            return _answer(start_response, "404 Not Found", {"error": str(exc)})
        except StateError as exc:  # the state it reports cannot be read now: try again later
            return _answer(start_response, "503 Service Unavailable", {"error": str(exc)})
        except Exception as exc:  # the action failed: say so, never pretend it worked
            return _answer(start_response, "500 Internal Server Error",
                           {"error": f"{type(exc).__name__}: {exc}"})
        if found is not None or path in actions:
            return _answer(start_response, "405 Method Not Allowed",
                           {"error": f"use {'POST' if path in actions else 'GET'} for {path}"})
        return _answer(start_response, "404 Not Found",
                       {"error": f"no admin route {path}", "routes": self.routes.paths()})


def _answer(start_response: Callable[..., Any], status: str, obj: Any) -> list[bytes]:
    body = json.dumps(obj, default=str).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
    return [body]


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False
