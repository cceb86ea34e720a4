"""The fail-closed census: every hook of every addon in ``pipeline()``, and what a crash in it does.

mitmproxy logs an exception raised in a hook and carries on with the flow: for a gateway that
is failing open. So every hook that can let a flow (or a connection) through must turn a crash
into a denial or a cut; today that is ``fleetgate.addons.flowtools.fail_closed``. This census

* lists every hook the chain implements (the universe is mitmproxy's own list of event hooks,
  so a hook added to any addon later must be classified here before the suite passes);
* for each enforcing hook, drives a flow that reaches it through the real chain, with
  mitmproxy's own dispatch (``AddonManager.handle_lifecycle``), makes the hook crash, and
  asserts the flow is denied (500 ``internal-error``) or cut (killed), never passed;
* names the hooks that are not enforcing (logging, counting and settling after the
  decision, connection bookkeeping) with the reason.

The crash is injected without knowing the addon's internals (they are being reshaped): the
first Python function the hook's own body calls raises, as if that callee had a bug (see
:class:`crash_in`). Hooks whose body calls no Python function crash on their first line.
A hook that is enforcing but not fail-closed is an ``xfail(strict=True)`` case with the reason.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from chain import basic, request_flow, running_chain, tok
from mitmproxy import hooks, http, tls
from mitmproxy.addonmanager import traverse
from mitmproxy.proxy import context, server_hooks
from mitmproxy.proxy.layers import dns, quic, tcp, udp, websocket  # noqa: F401  (their hooks)
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers import tls as tls_layer
from mitmproxy.test import tflow

from fleetgate.addons.pipeline import pipeline

RULES = """apiVersion: fleetgate/v1
llm:
  providers:
  - name: openai
    api: openai
    hosts: ["api.openai.com:443"]
  pricing:
    models:
      gpt-4o: {{input: 2.50, output: 10.00}}
a2a:
  agents:
  - {{name: ceo, url: "https://a2a.example.com/a2a"}}
approvals:  # the gate's hook runs on every allowed flow; this tier holds none of the census'
- {{id: census, when: 'request.path == "/held-for-approval"', approvers: 1}}
budgets:
- {{id: roomy, per: agent, period: day, tokens: {{hard: 100000000}}}}
mcp:
  servers:
  - name: tools
    hosts: ["mcp.example.com:443"]
    mcpAuthorization:
      rules:
      - 'true'
credentials:
- id: example-key
  hosts: [api.example.com]
  pathPrefix: /v1/
  secretFile: {key_file}
agents:
- name: tester
  match: 'jwt.agent_role == "tester"'
  egress:
    hosts: [api.openai.com, api.example.com, mcp.example.com, a2a.example.com]
  authorization:
    rules:
    - allow: 'true'
  policies:
    localRateLimit:
    - maxTokens: 1000
      tokensPerFill: 1000
      fillInterval: 1m
      type: requests
"""

# mitmproxy's per-connection and per-flow event hooks: everything but the addon lifecycle
LIFECYCLE = {"load", "configure", "running", "done", "update", "add_log"}
EVENT_HOOKS = sorted(set(hooks.all_hooks) - LIFECYCLE)


# -- the census ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    scenario: str  # which flow reaches the hook: see SCENARIOS
    xfail: str = ""  # enforcing but not fail-closed today: why, and where
    at_line: bool = False  # the body calls no Python function: crash on its first line


ENFORCING: dict[tuple[str, str], Case] = {
    ("HeaderBounds", "requestheaders"): Case("plain"),
    ("AmbiguityGuard", "requestheaders"): Case("plain"),
    ("AgentIdentity", "http_connect"): Case("connect"),
    ("AgentIdentity", "requestheaders"): Case("plain"),
    ("KillSwitch", "http_connect"): Case("connect"),
    ("KillSwitch", "request"): Case("plain"),
    ("ControlEndpoint", "request"): Case("control"),
    ("RequestBodies", "requestheaders"): Case("llm"),
    ("LlmInspector", "request"): Case("llm"),
    ("A2aGuard", "request"): Case("a2a"),  # strict body, counted depth, before the rules
    ("A2aForward", "request"): Case("a2a"),  # records the hop later messages are counted from
    ("HttpAuthorization", "request"): Case("plain"),
    # an action in an approval tier waits for people: a crash must not forward it unapproved
    ("ApprovalGate", "request"): Case("plain"),
    ("HttpAuthorization", "server_connect"): Case("server_connect"),
    ("McpGuard", "request"): Case("mcp"),
    ("McpAnswers", "responseheaders"): Case("mcp"),
    ("McpAnswers", "response"): Case("mcp"),
    # shared state: the session's owner across gateways (embedded: returns at once)
    ("McpSharedState", "request"): Case("mcp", at_line=True),
    ("McpSharedState", "responseheaders"): Case("mcp", at_line=True),
    ("LlmMeter", "responseheaders"): Case("llm"),  # wraps the stream its guards end
    ("BudgetGuard", "request"): Case("llm"),
    ("RateLimiter", "request"): Case("llm"),  # async: awaits Redis when shared
    ("CredentialInjector", "request"): Case("credential"),
    # the injected key is replaced in the flow once sent; a crash must not leave it
    ("CredentialInjector", "responseheaders"): Case("credential"),
    ("CredentialInjector", "response"): Case("credential"),
    # rewrites the forwarded traceparent and arms capture: a crash must not forward
    ("Tracing", "request"): Case("plain", at_line=True),
    ("StreamPassthrough", "responseheaders"): Case("plain"),
    ("KillWatch", "request"): Case("plain"),  # registers the flow a later stop must cut
    ("Timeouts", "request"): Case("plain"),  # arms the upstream response bound
    ("Timeouts", "responseheaders"): Case("plain"),  # arms the upstream idle bound
    ("ConnectionGuard", "tcp_start"): Case("tcp"),  # raw TCP is killed, never carried
    ("ConnectionGuard", "udp_start"): Case("udp"),  # raw UDP likewise
    # interception may not be turned off for a connection (ignore_hosts would, via this hook)
    ("ConnectionGuard", "tls_clienthello"): Case("clienthello", at_line=True),
    # fleetgate_audit_required: the request's decision line is written before it is forwarded
    ("DecisionLog", "request"): Case("plain", at_line=True),
}

NOT_ENFORCING: dict[tuple[str, str], str] = {
    ("HttpAuthorization", "server_connected"):
        "gives an open, already checked connection back its name for mitmproxy's reuse",
    ("HttpAuthorization", "server_connect_error"): "drops bookkeeping of a failed dial",
    ("HttpAuthorization", "error"): "records a refused dial as a denial (logging)",
    ("LlmMeter", "response"): "counts usage after the answer was delivered",
    ("LlmMeter", "error"): "estimates usage of a flow that already failed",
    ("BudgetGuard", "response"): "settles spend after the answer (counting after the decision)",
    ("BudgetGuard", "error"): "settles or gives back a reservation of a failed flow",
    ("RateLimiter", "response"): "settles tokens after the answer (counting after the decision)",
    ("RateLimiter", "error"): "gives back a reservation of a failed flow",
    ("CredentialInjector", "error"): "hides the injected key in a flow that already failed",
    ("KillWatch", "responseheaders"):
        "counts delivered bytes for the kill log; the flow is registered for a stop in request",
    ("KillWatch", "response"): "unregisters a finished flow and feeds the triggers (counting)",
    ("KillWatch", "error"): "unregisters a failed flow and feeds the triggers (counting)",
    ("KillWatch", "websocket_end"): "unregisters an ended websocket (counting)",
    ("Timeouts", "client_connected"): "arms the client-header bound of a new connection; "
                                      "no flow exists yet to let through",
    ("Timeouts", "client_disconnected"): "disarms the bounds of a closed connection",
    ("Timeouts", "server_connected"): "records the upstream connect time",
    ("Timeouts", "http_connect"): "re-arms the client-header bound for the tunnel's first "
                                  "request; the CONNECT is judged by identity and kill switch",
    ("Timeouts", "requestheaders"): "disarms the client-header bound once a request head is "
                                    "complete; a crash leaves the bound armed (stricter)",
    ("Timeouts", "response"): "disarms the bounds of a finished flow",
    ("Timeouts", "error"): "disarms the bounds of a failed flow",
    ("Timeouts", "websocket_end"): "disarms the bounds of an ended websocket",
    ("A2aForward", "response"): "ends the hop's in-flight entry (a crash leaves it: stricter) "
                                "and puts a refusal already made in JSON-RPC form",
    ("A2aForward", "error"): "ends the in-flight entry of a failed flow; refusal format only",
    ("ApprovalGate", "response"): "records the outcome of an approved action already forwarded",
    ("ApprovalGate", "error"): "records the failure of an approved action already forwarded",
    ("UpstreamErrors", "error"): "answers an upstream failure of a flow already allowed",
    ("DecisionLog", "http_connect"): "logging",
    ("DecisionLog", "responseheaders"): "logging",
    ("DecisionLog", "response"): "logging",
    ("DecisionLog", "error"): "logging",
    ("FlowRecorder", "response"): "writes a masked copy of a finished flow (recording)",
    ("FlowRecorder", "error"): "writes a masked copy of a failed flow (recording)",
    ("DecisionLog", "tcp_start"): "logging (ConnectionGuard refuses raw TCP)",
    ("DecisionLog", "udp_start"): "logging (ConnectionGuard refuses raw UDP)",
}


def chain_hooks() -> set[tuple[str, str]]:
    """(addon class, hook) for every event hook an addon of ``pipeline()`` implements."""
    found = set()
    for addon in traverse(pipeline()):
        for hook in EVENT_HOOKS:
            if callable(getattr(addon, hook, None)):
                found.add((type(addon).__name__, hook))
    return found


def test_every_hook_of_the_chain_is_in_the_census() -> None:
    found = chain_hooks()
    assert not set(ENFORCING) & set(NOT_ENFORCING)
    assert found - set(ENFORCING) - set(NOT_ENFORCING) == set(), \
        "hooks nobody classified: add them to ENFORCING (with a scenario) or NOT_ENFORCING"
    assert set(ENFORCING) | set(NOT_ENFORCING) <= found, "census entries the chain no longer has"


# -- crash injection ----------------------------------------------------------------------

class InjectedCrash(RuntimeError):
    """The bug the census plants in a hook."""


class crash_in:
    """Make ``fn``'s body crash: the first Python function it calls raises
    :class:`InjectedCrash` (``at_line``: its first line does). A trace function that raises
    makes the traced frame raise; CPython then removes the tracer, so it fires once."""

    def __init__(self, fn: Callable[..., Any], at_line: bool = False) -> None:
        self.code = inspect.unwrap(fn).__code__  # the hook's own body, inside any wrapper
        self.at_line = at_line
        self.fired = False
        self._previous: Any = None

    def _global(self, frame: types.FrameType, event: str, arg: Any) -> Any:
        if self.fired or event != "call":
            return None
        if self.at_line and frame.f_code is self.code:
            return self._local
        if not self.at_line and frame.f_back is not None and frame.f_back.f_code is self.code:
            self.fired = True
            raise InjectedCrash(f"injected into {self.code.co_qualname}")
        return None

    def _local(self, frame: types.FrameType, event: str, arg: Any) -> Any:
        if event == "line" and not self.fired:
            self.fired = True
            raise InjectedCrash(f"injected into {self.code.co_qualname}")
        return None

    def __enter__(self) -> crash_in:
        self._previous = sys.gettrace()
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self._previous)


# -- scenarios: a flow that reaches the hook, through mitmproxy's own dispatch ------------

def dispatch(tctx: Any, event: hooks.Hook) -> None:
    """Run one event through the chain as mitmproxy does: an exception in a hook is logged
    and the next addon runs (``safecall``)."""
    asyncio.run(tctx.master.addons.handle_lifecycle(event))


def http_flow(kind: str) -> http.HTTPFlow:
    auth = basic(tok())
    if kind == "connect":
        return request_flow(method="CONNECT", path="", auth=auth)
    if kind == "control":
        return request_flow(path="/v1/whoami", host="fleetgate.internal", auth=auth)
    if kind == "llm":
        f = request_flow(path="/v1/chat/completions", host="api.openai.com", method="POST",
                         auth=auth)
        f.request.headers["Content-Type"] = "application/json"
        f.request.content = json.dumps({"model": "gpt-4o", "max_tokens": 20, "messages": [
            {"role": "user", "content": "hi"}]}).encode()
        return f
    if kind == "mcp":
        f = request_flow(path="/mcp", host="mcp.example.com", method="POST", auth=auth)
        f.request.headers["Content-Type"] = "application/json"
        f.request.headers["Accept"] = "application/json, text/event-stream"
        f.request.content = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                        "params": {"name": "nmap_scan",
                                                   "arguments": {}}}).encode()
        return f
    if kind == "a2a":
        f = request_flow(path="/a2a", host="a2a.example.com", method="POST", auth=auth)
        f.request.headers["Content-Type"] = "application/json"
        f.request.content = json.dumps({"jsonrpc": "2.0", "id": "r1", "method": "SendMessage",
                                        "params": {"message": {
                                            "messageId": "m1", "role": "ROLE_USER",
                                            "parts": [{"text": "hi"}]}}}).encode()
        return f
    if kind == "credential":
        return request_flow(path="/v1/models", auth=auth)
    return request_flow(path="/v1/models", auth=auth)


ANSWERS = {
    "llm": (b'{"model": "gpt-4o", "usage": {"prompt_tokens": 5, "completion_tokens": 2}}',
            "application/json"),
    "mcp": (b'{"jsonrpc": "2.0", "id": 1, "result": {"content": []}}', "application/json"),
}
REQUEST_PHASES = ("http_connect", "requestheaders", "request")


def run_http(tctx: Any, kind: str, until: str, crash: crash_in | None) -> http.HTTPFlow:
    """Drive an HTTP flow through the chain's phases up to ``until``; ``crash`` is active
    for that phase only."""
    f = http_flow(kind)
    phases: list[tuple[str, Callable[[], hooks.Hook]]] = (
        [("http_connect", lambda: http_layer.HttpConnectHook(f))] if kind == "connect" else
        [("requestheaders", lambda: http_layer.HttpRequestHeadersHook(f)),
         ("request", lambda: http_layer.HttpRequestHook(f)),
         ("responseheaders", lambda: http_layer.HttpResponseHeadersHook(f)),
         ("response", lambda: http_layer.HttpResponseHook(f))])
    body, ctype = ANSWERS.get(kind, (b'{"ok": true}', "application/json"))
    for name, event in phases:
        if name == "responseheaders":
            assert f.response is None, f"the chain refused the {kind} flow before the crash"
            f.response = http.Response.make(200, body, {"content-type": ctype})
            f.response.raw_content = None  # headers only
        if name == "response" and f.error is None:
            if callable(f.response.stream):
                f.response.stream(body)
                f.response.stream(b"")
            f.response.raw_content = b"" if f.response.stream else body
        if name == until and crash is not None:
            with crash:
                dispatch(tctx, event())
        else:
            dispatch(tctx, event())
        if name == until:
            break
    return f


def http_stopped(f: http.HTTPFlow, phase: str) -> bool:
    killed = f.error is not None and f.error.msg == f.error.KILLED_MESSAGE
    if phase in REQUEST_PHASES:
        denied = (f.response is not None and f.response.status_code == 500
                  and json.loads(f.response.content)["fleetgate"]["rule"] == "internal-error")
        return denied or killed
    return killed


def run_case(tctx: Any, addon: Any, hook: str, case: Case) -> None:
    crash = crash_in(getattr(addon, hook), case.at_line)
    if case.scenario == "server_connect":
        f = run_http(tctx, "plain", "request", None)
        assert f.response is None
        server = tflow.tserver_conn()
        server.address = ("api.example.com", 443)
        data = server_hooks.ServerConnectionHookData(client=f.client_conn, server=server)
        with crash:
            dispatch(tctx, server_hooks.ServerConnectHook(data))
        assert crash.fired, "the hook returned before calling anything: fix the scenario"
        assert data.server.error, "a crashed server_connect let the dial go ahead"
    elif case.scenario in ("tcp", "udp"):
        flow: Any = tflow.ttcpflow() if case.scenario == "tcp" else tflow.tudpflow()
        flow.live = True
        event = (tcp.TcpStartHook(flow) if case.scenario == "tcp" else udp.UdpStartHook(flow))
        with crash:
            dispatch(tctx, event)
        assert crash.fired, "the hook returned before calling anything: fix the scenario"
        assert flow.error is not None, f"a crashed {hook} let the raw flow run"
    elif case.scenario == "clienthello":
        client = tflow.tclient_conn()
        data = tls.ClientHelloData(context.Context(client, tctx.options), None)  # type: ignore[arg-type]
        data.ignore_connection = True  # as ignore_hosts / allow_hosts would set it
        with crash:
            dispatch(tctx, tls_layer.TlsClienthelloHook(data))
        assert crash.fired, "the hook's body did not run"
        assert not data.ignore_connection or client.error, \
            "a crashed tls_clienthello let the connection through uninspected"
    else:
        f = run_http(tctx, case.scenario, hook, crash)
        assert crash.fired, "the hook returned before calling anything: fix the scenario"
        assert http_stopped(f, hook), (
            f"a crash in {type(addon).__name__}.{hook} let the flow through: "
            f"response={f.response and f.response.status_code} error={f.error}")


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[tuple[Any, list[Any]]]:
    key = tmp_path / "key"
    key.write_text("sk-census-key")
    with running_chain(tmp_path, RULES.format(key_file=key)) as running:
        yield running


def census_params() -> list[Any]:
    params = []
    for (cls, hook), case in sorted(ENFORCING.items()):
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        params.append(pytest.param(cls, hook, case, id=f"{cls}.{hook}", marks=marks))
    return params


@pytest.mark.parametrize(("cls", "hook", "case"), census_params())
def test_a_crash_in_an_enforcing_hook_denies_or_cuts(
        chain: tuple[Any, list[Any]], cls: str, hook: str, case: Case) -> None:
    tctx, addons = chain
    [addon] = [a for a in traverse(addons) if type(a).__name__ == cls]
    run_case(tctx, addon, hook, case)


@pytest.mark.parametrize("kind", ["plain", "llm", "mcp", "control", "credential", "a2a"])
def test_without_a_crash_the_scenarios_pass(chain: tuple[Any, list[Any]], kind: str) -> None:
    """The census is meaningful only if the same flows go through when nothing crashes."""
    tctx, _ = chain
    f = run_http(tctx, kind, "request" if kind == "control" else "response", None)
    assert f.error is None  # the control endpoint answers itself, the others are forwarded
    assert f.response is not None and f.response.status_code == 200


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_without_a_crash_raw_flows_are_refused(chain: tuple[Any, list[Any]], kind: str) -> None:
    """The raw-flow scenarios reach the guard: uncrashed, it kills the flow."""
    tctx, _ = chain
    flow: Any = tflow.ttcpflow() if kind == "tcp" else tflow.tudpflow()
    flow.live = True
    dispatch(tctx, tcp.TcpStartHook(flow) if kind == "tcp" else udp.UdpStartHook(flow))
    assert flow.error is not None and flow.error.msg == flow.error.KILLED_MESSAGE
