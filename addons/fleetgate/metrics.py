"""Prometheus metrics and the health endpoints, on their own port.

The registry is per gateway instance (not prometheus_client's global one) so that a script
reload or a test that builds two pipelines never trips over duplicate collectors. The server
is a small threaded WSGI server: it answers scrapes and probes without touching the proxy's
event loop, and it listens on its own address, never inside the proxy, so agents cannot
reach it through the gateway (``127.0.0.1`` destinations are refused unless allowed, and the
metrics address is refused even then).
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

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

__all__ = ["GatewayMetrics", "HealthServer", "LabelBudget"]


class LabelBudget:
    """Bounded label values: the first ``limit`` distinct values are kept, the rest become
    ``other``. Agent ids and request model names come from clients; unbounded, they would
    let any agent blow up the metrics' memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        v = value or ""
        with self._lock:
            if v in self.seen:
                return v
            if len(self.seen) < self.limit:
                self.seen.add(v)
                return v
        return "other"


class GatewayMetrics:
    """All fleetgate metrics, registered on one private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fleetgate_requests", "Requests judged by fleetgate, by agent, decision and rule.",
            ["agent", "role", "decision", "rule"], registry=r)
        self.decision_seconds = Histogram(
            "fleetgate_decision_seconds", "Time spent deciding one request (policy evaluation).",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05), registry=r)
        self.identity_failures = Counter(
            "fleetgate_identity_failures", "Proxy credentials refused, by reason code.",
            ["code"], registry=r)
        self.reloads = Counter(
            "fleetgate_policy_reloads", "Rules (re)load attempts by result.", ["result"],
            registry=r)
        self.policy_valid = Gauge(
            "fleetgate_policy_last_reload_ok",
            "1 if the last rules load succeeded, 0 if it failed and an older policy runs.",
            registry=r)
        self.policy_loaded = Gauge(
            "fleetgate_policy_loaded", "1 while a valid policy is loaded (readiness).",
            registry=r)
        self.policy_revision = Gauge(
            "fleetgate_policy_revision_info", "The running policy revision (value is always 1).",
            ["revision"], registry=r)
        self.flows_cut = Counter(
            "fleetgate_flows_cut", "In-flight flows cut by fleetgate, by rule.", ["rule"],
            registry=r)
        self.upstream_failures = Counter(
            "fleetgate_upstream_failures", "Allowed requests whose upstream could not be reached "
            "(answered by the gateway in the client's format), by rule.", ["rule"], registry=r)
        self.connections_refused = Counter(
            "fleetgate_connections_refused", "Connections refused before any request, by reason.",
            ["reason"], registry=r)
        self.kill_actions = Counter(
            "fleetgate_kill_actions", "Kill-switch actions applied (stop, pause, throttle) and "
            "lifted, by verb, scope kind, source (operator, rules, trigger) and event.",
            ["verb", "scope", "source", "event"], registry=r)
        self.kill_flows_cut = Counter(
            "fleetgate_kill_flows_cut", "In-flight flows and tunnels a kill-switch stop cut, by "
            "scope kind and source of the stop.", ["scope", "source"], registry=r)
        self.kill_refused = Counter(
            "fleetgate_kill_requests_refused", "Requests refused by the kill switch, by verb "
            "(stop: 503, pause: waited then 503, throttle: 429).", ["verb"], registry=r)
        self.kill_cut_seconds = Histogram(
            "fleetgate_kill_cut_seconds", "Time from a stop being issued to the last affected "
            "flow being cut.", buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                        0.25, 1), registry=r)
        self.kill_in_force = Gauge(
            "fleetgate_kill_actions_in_force", "Kill-switch actions in force, by verb.", ["verb"],
            registry=r)
        self.kill_sessions = Gauge(
            "fleetgate_kill_sessions", "Sessions in the session graph, by state (live, stopped, "
            "paused, throttled).", ["state"], registry=r)
        self.delegations = Counter(
            "fleetgate_delegations", "Child tokens asked for at the delegation endpoint, by "
            "result (issued or the refusal code).", ["result"], registry=r)

        # OpenTelemetry GenAI semantic conventions, as Prometheus names (dots -> underscores).
        genai = ["gen_ai_provider_name", "gen_ai_request_model", "gen_ai_operation_name"]
        self.genai_tokens = Counter(
            "fleetgate_gen_ai_client_token_usage",
            "LLM tokens by type (input includes cached; output includes reasoning), provider, "
            "model, operation, agent and role. 'estimated' is true when the provider reported "
            "no usage and fleetgate counted the streamed text.",
            ["gen_ai_token_type", *genai, "agent", "role", "estimated"], registry=r)
        self.genai_token_histogram = Histogram(
            "gen_ai_client_token_usage", "Tokens per LLM call (OTel gen_ai.client.token.usage).",
            ["gen_ai_token_type", *genai],
            buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304),
            registry=r)
        self.genai_cost = Counter(
            "fleetgate_gen_ai_cost_usd", "LLM spend in USD from the pricing table.",
            [*genai, "agent", "role"], registry=r)
        self.genai_calls = Counter(
            "fleetgate_gen_ai_calls", "LLM calls by outcome, usage source and pricing status.",
            [*genai, "agent", "role", "outcome", "usage", "priced"], registry=r)
        self.genai_duration = Histogram(
            "gen_ai_client_operation_duration_seconds", "LLM call duration, request to last byte.",
            genai, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r)
        self.genai_ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from the end of the request to the first response byte of a streamed call.",
            genai, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.llm_refused = Counter(
            "fleetgate_llm_requests_refused", "LLM request bodies refused before any rule ran.",
            ["reason"], registry=r)

        self.mcp_messages = Counter(
            "fleetgate_mcp_messages",
            "MCP requests and notifications judged, by server, method, tool (or prompt / "
            "resource), decision, rule and agent.",
            ["server", "method", "tool", "decision", "rule", "agent"], registry=r)
        self.mcp_hidden = Counter(
            "fleetgate_mcp_list_entries_hidden",
            "Entries removed from MCP list results, by server, list kind and reason "
            "(policy, poisoning, pin).", ["server", "kind", "reason"], registry=r)
        self.mcp_findings = Counter(
            "fleetgate_mcp_tool_findings",
            "Tool-poisoning findings and unapproved tool definitions, once per definition, by "
            "server, rule and mode.", ["server", "rule", "mode"], registry=r)
        self.mcp_refused = Counter(
            "fleetgate_mcp_refused",
            "MCP bodies and streams refused before any rule ran, by reason.", ["reason"],
            registry=r)
        self.mcp_pending = Gauge(
            "fleetgate_mcp_tools_pending_approval",
            "Tools (new or changed definitions) waiting for an operator's approval.", registry=r)

        self.ratelimit_level = Gauge(
            "fleetgate_ratelimit_bucket_level",
            "Tokens left in a localRateLimit bucket after its last use, by limit and key (key "
            "bounded to 1,000 values).", ["limit", "key"], registry=r)
        self.ratelimit_rejections = Counter(
            "fleetgate_ratelimit_rejections",
            "Requests refused by a localRateLimit, by limit id.", ["limit"], registry=r)

        self.budget_rejections = Counter(
            "fleetgate_budget_rejections", "LLM calls refused by a hard budget, by budget id.",
            ["budget"], registry=r)
        self.budget_soft = Counter(
            "fleetgate_budget_soft_exceeded",
            "Times a soft budget was crossed (once per crossing), by budget id.", ["budget"],
            registry=r)
        self.budget_spend_usd = Gauge(
            "fleetgate_budget_spend_usd", "Spend in the current budget window, by budget and key "
            "(key bounded to 1,000 values).", ["budget", "key"], registry=r)
        self.budget_remaining_usd = Gauge(
            "fleetgate_budget_remaining_usd", "Hard USD limit minus spend in the current window, "
            "by budget and key.", ["budget", "key"], registry=r)
        self.budget_remaining_tokens = Gauge(
            "fleetgate_budget_remaining_tokens", "Hard token limit minus spend in the current "
            "window, by budget and key.", ["budget", "key"], registry=r)
        self.budget_spend_tokens = Gauge(
            "fleetgate_budget_spend_tokens", "Tokens in the current budget window, by budget and "
            "key.", ["budget", "key"], registry=r)

        self.credentials_injected = Counter(
            "fleetgate_credentials_injected", "Requests given an upstream credential by the "
            "gateway, by credentials route id.", ["route"], registry=r)
        self.credentials_unavailable = Counter(
            "fleetgate_credentials_unavailable", "Requests refused (503) because their "
            "credentials route's secret could not be read, by route id.", ["route"], registry=r)

    def set_revision(self, revision: str) -> None:
        self.policy_revision.clear()
        self.policy_revision.labels(revision=revision).set(1)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class HealthServer:
    """A small JSON/metrics server on its own listener.

    The health server (``admin=False``) serves ``/metrics``, ``/healthz/*`` and read-only JSON
    views to anyone who can reach the port (Prometheus, probes). The admin server
    (``admin=True``) serves operator views (GET ``json_routes``) and actions (POST
    ``admin_routes``) and nothing else; every request needs ``Authorization: Bearer
    <admin token>``, or, when no token is configured, a loopback client.
    """

    def __init__(self, metrics: GatewayMetrics, status: Callable[[], dict[str, Any]],
                 admin: bool = False) -> None:
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._status = status
        self.admin = admin
        # GET path -> JSON answer; the callable gets the query string's parameters
        self.json_routes: dict[str, Callable[..., dict[str, Any]]] = {}
        # operator actions (POST, JSON body -> JSON answer); a ValueError is a 400
        self.admin_routes: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}
        self.admin_token = ""
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
                                        name="fleetgate-metrics", daemon=True)
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
        if path in self.json_routes:
            return _answer(start_response, "200 OK", self.json_routes[path]())
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /healthz/ready\n"]

    def _admin(self, path: str, environ: dict[str, Any],
               start_response: Callable[..., Any]) -> Iterable[bytes]:
        auth = environ.get("HTTP_AUTHORIZATION", "")
        peer = environ.get("REMOTE_ADDR", "")
        if self.admin_token:
            ok = hmac.compare_digest(auth.encode(), f"Bearer {self.admin_token}".encode())
        else:
            ok = _is_loopback(peer)
        if not ok:
            return _answer(start_response, "401 Unauthorized", {
                "error": "the admin API needs 'Authorization: Bearer <admin token>' (see "
                         "fleetgate_admin_token_file)" if self.admin_token else
                         "no admin token is configured: the admin API answers loopback "
                         "clients only"})
        method = environ.get("REQUEST_METHOD")
        try:
            if method == "GET" and path in self.json_routes:
                query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
                return _answer(start_response, "200 OK", self.json_routes[path](**query))
            if method == "POST" and path in self.admin_routes:
                size = int(environ.get("CONTENT_LENGTH") or 0)
                raw = environ["wsgi.input"].read(min(size, 1 << 20)) if size else b"{}"
                args = json.loads(raw or b"{}")
                if not isinstance(args, dict):
                    raise ValueError("the body must be a JSON object")
                return _answer(start_response, "200 OK", self.admin_routes[path](args))
        except (ValueError, TypeError) as exc:
            return _answer(start_response, "400 Bad Request", {"error": str(exc)})
        except Exception as exc:  # the action failed: say so, never pretend it worked
            return _answer(start_response, "500 Internal Server Error",
                           {"error": f"{type(exc).__name__}: {exc}"})
        if path in self.json_routes or path in self.admin_routes:
            return _answer(start_response, "405 Method Not Allowed",
                           {"error": f"use {'POST' if path in self.admin_routes else 'GET'} "
                                     f"for {path}"})
        return _answer(start_response, "404 Not Found",
                       {"error": f"no admin route {path}", "routes": sorted(
                           {*self.json_routes, *self.admin_routes})})


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
