"""MCP hardening (issue 14) through a real mitmdump, against a JSON-RPC upstream that records
every request reaching it: the gateway judges exactly what the server will read.

* an identifier the gateway judges (``Mcp-Session-Id``, ``Mcp-Method``, ``Mcp-Name``,
  ``Mcp-Protocol-Version``, the ``session_id`` query parameter) sent twice or readable two ways
  is refused (``400 mcp.ambiguous``), never forwarded: no session hijack;
* a declared MCP endpoint takes POST (judged), GET and DELETE without a body; anything else
  (a JSON-RPC body on GET, HEAD, PUT, PATCH...) is refused (``405 mcp.method``);
* every answer goes through the strict parser whatever its Content-Type: a ``tools/list``
  answered as ``text/plain`` or without a type is filtered, an unreadable one withheld, an SSE
  event with duplicate keys cut.

Raw JSON-RPC over httpx, as a jailbroken agent would send it.  The gateway is shared by the
module (:class:`GatewayPool`); the upstream's record is cleared for each test.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from mcp_upstream import GatewayPool

from harness import Gateway, Seen, Upstream, token, upstream_name, write_rules

TOOLS = [{"name": n, "description": f"{n} does its job", "inputSchema": {"type": "object"}}
         for n in ("nmap_scan", "terraform_apply")]
HIDDEN = "terraform_apply"  # no rule allows it: never visible, never callable

MCP_RULES = """
mcp:
  servers:
  - name: tools
    hosts: ["{name}:{port}"]
    mcpAuthorization:
      rules:
      - 'jwt.agent_role in ["tester", "wide"] && mcp.tool.name.startsWith("nmap")'
"""

# a profile whose HTTP rules allow every method, so that only McpGuard stands in the way
WIDE = """- name: wide
  match: 'jwt.agent_role == "wide"'
  egress:
    hosts: ["{name}:{port}"]
  authorization:
    rules:
    - allow: 'true'
"""

_sessions = itertools.count(1)


def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str | None,
          extra: dict[str, str] | None = None) -> None:
    h.send_response(status)
    if ctype is not None:
        h.send_header("Content-Type", ctype)
    for k, v in (extra or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


def mcp_server(h: BaseHTTPRequestHandler, seen: Seen) -> None:
    """Streamable HTTP: a new session on ``initialize``; GET is an (immediately ended) event
    stream; DELETE ends the session."""
    if seen.method == "GET":
        _send(h, 200, b": stream open\n\n", "text/event-stream")
        return
    if seen.method == "DELETE" or not seen.body:
        _send(h, 200, b"", None)
        return
    msg = json.loads(seen.body)
    extra = {}
    if msg.get("method") == "initialize":
        extra["Mcp-Session-Id"] = f"sess-{next(_sessions)}"
        result: dict[str, Any] = {"protocolVersion": "2025-06-18", "capabilities": {}}
    elif msg.get("method") == "tools/call":
        result = {"content": [{"type": "text", "text": f"ran {msg['params']['name']}"}]}
    else:
        result = {"tools": TOOLS}
    _send(h, 200, json.dumps({"jsonrpc": "2.0", "id": msg.get("id"), "result": result}).encode(),
          "application/json", extra)


def legacy_messages(h: BaseHTTPRequestHandler, seen: Seen) -> None:
    """The older transport's POST endpoint: accepted, answered on the GET stream."""
    _send(h, 202, b"Accepted", "text/plain")


def tools_list_as(ctype: str | None, status: int = 200) -> Any:
    def handler(h: BaseHTTPRequestHandler, seen: Seen) -> None:
        rid = json.loads(seen.body).get("id")
        _send(h, status, json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"tools": TOOLS}})
              .encode(), ctype)
    return handler


def raw_answer(body: bytes, ctype: str | None, status: int = 200) -> Any:
    def handler(h: BaseHTTPRequestHandler, seen: Seen) -> None:
        _send(h, status, body, ctype)
    return handler


@pytest.fixture(scope="module")
def mcp_upstream(upstream_ca: trustme.CA) -> Iterator[Upstream]:
    up = Upstream(upstream_ca)
    up.route("/mcp", mcp_server)
    up.route("/messages/", legacy_messages)
    up.route("/plain", tools_list_as("text/plain"))
    up.route("/untyped", tools_list_as(None))
    up.route("/garbage", raw_answer(b"tools: nmap_scan, terraform_apply", "text/plain"))
    up.route("/missing", raw_answer(b"Session not found: terraform_apply", "text/plain", 404))
    secret = json.dumps({"tools": TOOLS})
    up.route("/sse-dup", raw_answer(
        ('event: message\ndata: {"jsonrpc":"2.0","id":1,"result":' + secret
         + ',"result":{"tools":[]}}\n\n').encode(), "text/event-stream"))
    up.route("/sse-other-event", raw_answer(
        ('event: surprise\ndata: {"jsonrpc":"2.0","id":1,"result":' + secret + "}\n\n").encode(),
        "text/event-stream"))
    yield up
    up.stop()


@pytest.fixture(scope="module")
def gw(mcp_upstream: Upstream, tmp_path_factory: pytest.TempPathFactory, confdir: Path,
       upstream_ca_file: Path) -> Iterator[Gateway]:
    name, port = upstream_name(mcp_upstream.port), mcp_upstream.port
    pool = GatewayPool(tmp_path_factory.mktemp("mcp-hardening"), confdir, upstream_ca_file)
    yield pool.get("mcp", lambda path: write_rules(
        path, [port], top=MCP_RULES.format(name=name, port=port),
        extra=WIDE.format(name=name, port=port)))
    pool.stop()


@pytest.fixture
def upstream(mcp_upstream: Upstream) -> Upstream:
    mcp_upstream.seen.clear()
    return mcp_upstream


def call(rid: Any, tool: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call",
            "params": {"name": tool, "arguments": {}}}


def send(gw: Gateway, upstream: Upstream, method: str, path: str, body: Any = None,
         headers: list[tuple[str, str]] = (), sub: str = "agent-b", role: str = "tester",
         ) -> httpx.Response:
    """One request with headers as a list (repeated names stay repeated on the wire)."""
    content = None if body is None else json.dumps(body).encode()
    base = [("Accept", "application/json, text/event-stream")]
    if content is not None:
        base.append(("Content-Type", "application/json"))
    with gw.client(token(sub=sub, role=role)) as c:
        return c.request(method, upstream.url + path, content=content,
                         headers=[*base, *headers])


def initialize(gw: Gateway, upstream: Upstream, sub: str, role: str = "tester") -> str:
    r = send(gw, upstream, "POST", "/mcp", {"jsonrpc": "2.0", "id": 0, "method": "initialize",
                                            "params": {}}, sub=sub, role=role)
    assert r.status_code == 200, r.text
    return r.headers["mcp-session-id"]


def assert_refused(r: httpx.Response, status: int, rule_words: str, rid: Any = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["jsonrpc"] == "2.0" and body["id"] == rid
    assert rule_words in body["error"]["message"]
    did = r.headers["x-fleetgate-decision-id"]
    assert did and body["error"]["data"]["decision_id"] == did


def calls(upstream: Upstream) -> list[tuple[str, str]]:
    return [(s.method, s.path) for s in upstream.seen]


# -- 1. one reading of every identifier: no session hijack -------------------------------


def test_two_session_headers_never_reach_the_server(gw: Gateway, upstream: Upstream) -> None:
    a_session = initialize(gw, upstream, "agent-a")
    upstream.seen.clear()
    hijacks = [
        [("Mcp-Session-Id", a_session), ("Mcp-Session-Id", "junk")],  # the battery's case
        [("Mcp-Session-Id", "junk"), ("Mcp-Session-Id", a_session)],
        [("Mcp-Session-Id", f"{a_session}, junk")],  # one header, two readings
        [("Mcp-Session-Id", f"{a_session};junk")],
    ]
    for headers in hijacks:
        r = send(gw, upstream, "POST", "/mcp", call(7, "nmap_scan"), headers)
        assert_refused(r, 400, "ambiguous MCP request", rid=7)
    assert calls(upstream) == []
    rec = gw.wait_for_decision(lambda d: d.get("rule") == "mcp.ambiguous")
    assert rec["result"] == "deny"
    # control: the owner still works in its session, and another agent is still refused
    ok = send(gw, upstream, "POST", "/mcp", call(8, "nmap_scan"),
              [("Mcp-Session-Id", a_session)], sub="agent-a")
    assert ok.json()["result"]["content"][0]["text"] == "ran nmap_scan"
    other = send(gw, upstream, "POST", "/mcp", call(9, "nmap_scan"),
                 [("Mcp-Session-Id", a_session)], sub="agent-b")
    assert other.status_code == 403
    assert calls(upstream) == [("POST", "/mcp")]


@pytest.mark.parametrize("query", [
    "session_id={b}&session_id={a}",  # the battery's case: Starlette reads the last
    "session_id={b}&sessionId={a}",
    "x=1;session_id={a}&session_id={b}",  # servers splitting on ';' see two
    "session_id={b}%2C{a}",
])
def test_two_session_query_parameters_never_reach_the_server(
        gw: Gateway, upstream: Upstream, query: str) -> None:
    a_session, b_session = "a" * 32, "b" * 32
    r = send(gw, upstream, "POST", "/messages/?" + query.format(a=a_session, b=b_session),
             call(3, "nmap_scan"), sub="agent-b")
    assert_refused(r, 400, "ambiguous MCP request", rid=3)
    assert calls(upstream) == []


def test_one_session_query_parameter_is_forwarded(gw: Gateway, upstream: Upstream) -> None:
    r = send(gw, upstream, "POST", "/messages/?session_id=" + "c" * 32, call(3, "nmap_scan"),
             sub="agent-c")
    assert r.status_code == 202 and r.content == b""  # "Accepted" is not JSON: not passed
    assert calls(upstream) == [("POST", "/messages/?session_id=" + "c" * 32)]


@pytest.mark.parametrize("headers", [
    [("Mcp-Method", "tools/call"), ("Mcp-Method", "tools/list")],
    [("Mcp-Method", "tools/call"), ("Mcp-Name", "nmap_scan"), ("Mcp-Name", HIDDEN)],
    [("Mcp-Name", "nmap_scan"), ("mcp-name", "nmap_scan")],
    [("Mcp-Protocol-Version", "2025-06-18"), ("Mcp-Protocol-Version", "2025-03-26")],
    [("Mcp-Method", "tools/call, tools/list")],
])
def test_repeated_stateless_headers_never_reach_the_server(
        gw: Gateway, upstream: Upstream, headers: list[tuple[str, str]]) -> None:
    r = send(gw, upstream, "POST", "/mcp", call(4, "nmap_scan"), headers)
    assert_refused(r, 400, "ambiguous MCP request", rid=4)
    assert calls(upstream) == []


# -- 2. every method judged -------------------------------------------------------------


@pytest.mark.parametrize(("method", "role"), [
    ("GET", "tester"), ("HEAD", "tester"), ("PUT", "wide"), ("PATCH", "wide"),
    ("DELETE", "wide"), ("OPTIONS", "wide")])
def test_a_json_rpc_body_on_another_method_never_reaches_the_server(
        gw: Gateway, upstream: Upstream, method: str, role: str) -> None:
    r = send(gw, upstream, method, "/mcp", call(5, HIDDEN), role=role)
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, POST, DELETE"
    if method != "HEAD":
        assert_refused(r, 405, method, rid=5)
    assert calls(upstream) == []


def test_head_and_options_without_a_body_are_refused(gw: Gateway, upstream: Upstream) -> None:
    for method in ("HEAD", "OPTIONS"):
        assert send(gw, upstream, method, "/mcp", role="wide").status_code == 405
    assert calls(upstream) == []


def test_get_stream_and_delete_without_a_body_pass_for_the_owner(
        gw: Gateway, upstream: Upstream) -> None:
    sid = initialize(gw, upstream, "agent-w", role="wide")
    upstream.seen.clear()
    r = send(gw, upstream, "GET", "/mcp", headers=[("Mcp-Session-Id", sid)], sub="agent-w",
             role="wide")
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    # another agent may neither read nor end the session
    for method in ("GET", "DELETE"):
        other = send(gw, upstream, method, "/mcp", headers=[("Mcp-Session-Id", sid)],
                     sub="intruder", role="wide")
        assert_refused(other, 403, "belongs to another agent")
    assert send(gw, upstream, "DELETE", "/mcp", headers=[("Mcp-Session-Id", sid)],
                sub="agent-w", role="wide").status_code == 200
    assert calls(upstream) == [("GET", "/mcp"), ("DELETE", "/mcp")]


# -- 3. every answer read by the strict parser ----------------------------------------


@pytest.mark.parametrize("path", ["/plain", "/untyped"])
def test_a_tools_list_labelled_otherwise_is_still_filtered(gw: Gateway, upstream: Upstream,
                                                          path: str) -> None:
    r = send(gw, upstream, "POST", path, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert r.status_code == 200
    assert HIDDEN not in r.text
    assert [t["name"] for t in json.loads(r.content)["result"]["tools"]] == ["nmap_scan"]


@pytest.mark.parametrize(("path", "status"), [("/garbage", 502), ("/missing", 404)])
def test_an_answer_that_is_not_json_is_withheld(gw: Gateway, upstream: Upstream, path: str,
                                                status: int) -> None:
    r = send(gw, upstream, "POST", path, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert_refused(r, status, "withheld")
    assert HIDDEN not in r.text
    rec = gw.wait_for_decision(lambda d: d.get("path") == path and d.get("rule") == "mcp.answer")
    assert rec["result"] == "deny"


@pytest.mark.parametrize("path", ["/sse-dup", "/sse-other-event"])
def test_sse_data_is_parsed_strictly(gw: Gateway, upstream: Upstream, path: str) -> None:
    """Duplicate keys in an event are refused (as in a JSON answer): the stream is cut before
    the event; an event of another type is filtered like a message."""
    got = b""
    with gw.client(token(sub="agent-s", role="tester")) as c:
        try:
            with c.stream("POST", upstream.url + path,
                          content=json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
                          headers={"Content-Type": "application/json",
                                   "Accept": "application/json, text/event-stream"}) as r:
                for chunk in r.iter_bytes():
                    got += chunk
        except httpx.HTTPError:
            pass  # the cut
    assert HIDDEN.encode() not in got
    if path == "/sse-dup":
        rec = gw.wait_for_decision(lambda d: d.get("path") == path)
        assert rec["rule"] == "mcp.answer" and "duplicate JSON key" in rec["reason"]
    else:
        assert b"nmap_scan" in got
