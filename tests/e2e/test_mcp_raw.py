"""MCP through a real mitmdump, sent by hand as a jailbroken agent would (raw httpx), against
a minimal JSON-RPC upstream that records every message reaching it.

The SDK-driven end-to-end tests are in ``test_mcp_sdk.py``; these pin the wire-level edges:
direct denials never reaching the server, batch placeholders, stateless header checks,
compressed/duplicate-key/oversized bodies, JSON (sized and chunked) and SSE answers, session
ownership.  The server is reached by name (``up<port>.fleetgate.test``) and declared by it; the
tests that do not change the gateway share one (module scope).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import GatewayFactory
from helpers import MCP_RULES, call, calls_seen, mcp_route, post
from mcp_upstream import GatewayPool

from harness import Gateway, Seen, Upstream, token, write_rules


@pytest.fixture(scope="module")
def mcp_upstream(upstream_ca: trustme.CA) -> Iterator[Upstream]:
    up = Upstream(upstream_ca)
    up.route("/mcp", mcp_route("json"))
    up.route("/mcp-chunked", mcp_route("chunked"))
    up.route("/mcp-sse", mcp_route("sse"))
    up.route("/mcp-own", mcp_route("json", session="sess-own"))
    yield up
    up.stop()


@pytest.fixture(scope="module")
def shared_gw(mcp_upstream: Upstream, tmp_path_factory: pytest.TempPathFactory, confdir: Path,
              upstream_ca_file: Path) -> Iterator[Gateway]:
    pool = GatewayPool(tmp_path_factory.mktemp("mcp-raw-gateway"), confdir, upstream_ca_file)
    yield pool.get("mcp", lambda path: write_rules(
        path, [mcp_upstream.port], top=MCP_RULES.format(name=mcp_upstream.name, port=mcp_upstream.port)))
    pool.stop()


@pytest.fixture
def upstream(mcp_upstream: Upstream) -> Upstream:
    """The module's MCP upstream, its record cleared for this test."""
    mcp_upstream.seen.clear()
    return mcp_upstream


@pytest.fixture
def gw(shared_gw: Gateway, upstream: Upstream) -> Gateway:
    return shared_gw


@pytest.mark.parametrize("path", ["/mcp", "/mcp-chunked", "/mcp-sse"])
def test_tools_list_is_filtered_in_every_answer_form(gw: Any, upstream: Upstream, path: str) -> None:
    r = post(gw, upstream, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, path)
    assert r.status_code == 200
    if path == "/mcp-sse":
        [line] = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
        answer = json.loads(line[6:])
    else:
        answer = r.json()
    assert [t["name"] for t in answer["result"]["tools"]] == ["nmap_scan", "trivy_image", "kubectl"]
    assert answer["result"]["nextCursor"] == "page-2"
    assert "fleetgate_mcp_list_entries_hidden_total" in gw.metrics()


def test_denied_call_never_reaches_the_server(gw: Any, upstream: Upstream) -> None:
    r = post(gw, upstream, call(9, "terraform_apply", dir="/prod"))
    assert r.status_code == 200
    assert r.json()["error"]["message"] == "Unknown tool: terraform_apply"
    decision_id = r.headers["x-fleetgate-decision-id"]
    assert r.json()["id"] == 9 and decision_id
    assert ("tools/call", "terraform_apply") not in calls_seen(upstream)
    assert calls_seen(upstream) == []
    rec = gw.wait_for_decision(lambda d: d.get("decision_id") == decision_id)
    assert rec["mcp"] is not None
    assert rec["result"] == "deny" and rec["rule"] == "mcp.default-deny"
    assert rec["mcp"]["calls"][0]["target"] == "terraform_apply"


def test_argument_rule_blocks_only_agent_infra(gw: Any, upstream: Upstream) -> None:
    ok = post(gw, upstream, call(1, "kubectl", namespace="default"))
    assert ok.json()["result"]["content"][0]["text"] == "ran kubectl"
    no = post(gw, upstream, call(2, "kubectl", namespace="agent-infra"))
    assert no.json()["error"]["code"] == -32602
    assert calls_seen(upstream) == [("tools/call", "kubectl")]


@pytest.mark.parametrize("path", ["/mcp", "/mcp-sse"])
def test_batch_with_a_denied_element(gw: Any, upstream: Upstream, path: str) -> None:
    r = post(gw, upstream, [call(1, "nmap_scan"), call(2, "terraform_apply")], path)
    if path == "/mcp-sse":
        answers = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: ")]
    else:
        answers = r.json()
    by_id = {a["id"]: a for a in answers}
    assert by_id[1]["result"]["content"][0]["text"] == "ran nmap_scan"
    assert by_id[2]["error"]["message"] == "Unknown tool: terraform_apply"
    # the server saw the allowed call and a ping: never the denied tool
    assert calls_seen(upstream) == [("tools/call", "nmap_scan"), ("ping", None)]


def test_stateless_header_that_disagrees_is_refused(gw: Any, upstream: Upstream) -> None:
    r = post(gw, upstream, call(4, "nmap_scan"),
             headers={"Mcp-Method": "tools/call", "Mcp-Name": "trivy_image"})
    assert r.status_code == 400 and r.json()["error"]["code"] == -32020
    assert r.json()["id"] == 4
    ok = post(gw, upstream, call(5, "nmap_scan"),
              headers={"Mcp-Method": "tools/call", "Mcp-Name": "nmap_scan"})
    assert "result" in ok.json()
    assert calls_seen(upstream) == [("tools/call", "nmap_scan")]


@pytest.mark.parametrize(("raw", "status"), [
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"nmap_scan"},'
     b'"params":{"name":"terraform_apply"}}', 400),
    (b"this is not json", 400),
    (b'{"jsonrpc":"2.0","id":1}', 400),
])
def test_unreadable_bodies_are_refused_unforwarded(gw: Any, upstream: Upstream, raw: bytes,
                                                   status: int) -> None:
    r = post(gw, upstream, None, raw=raw)
    assert r.status_code == status and "error" in r.json()
    assert calls_seen(upstream) == []


def test_gzip_body_is_judged_and_bomb_refused(gw: Any, upstream: Upstream) -> None:
    r = post(gw, upstream, None, raw=gzip.compress(json.dumps(call(1, "terraform_apply")).encode()),
             headers={"Content-Encoding": "gzip"})
    assert r.json()["error"]["message"] == "Unknown tool: terraform_apply"
    bomb = gzip.compress(b"[" + b" " * 40_000_000 + b"]")
    r = post(gw, upstream, None, raw=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413
    assert calls_seen(upstream) == []


def test_a_session_belongs_to_the_agent_that_opened_it(gw: Any, upstream: Upstream) -> None:
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}
    r = post(gw, upstream, init, "/mcp-own", sub="parent")
    assert r.headers["mcp-session-id"] == "sess-own"
    assert "result" in post(gw, upstream, call(1, "nmap_scan"), "/mcp-own", sub="parent",
                            headers={"Mcp-Session-Id": "sess-own"}).json()
    other = post(gw, upstream, call(2, "nmap_scan"), "/mcp-own", sub="child",
                 headers={"Mcp-Session-Id": "sess-own"})
    assert other.status_code == 403 and "another agent" in other.json()["error"]["message"]
    assert calls_seen(upstream).count(("tools/call", "nmap_scan")) == 1


def test_an_event_stream_that_is_not_mcp_passes_untouched(make_gateway: GatewayFactory,
                                                          upstream: Upstream, tmp_path: Path) -> None:
    """With no server declared, a GET event stream is sniffed for the older MCP transport's
    ``endpoint`` event; any other stream (here: non-JSON data) is passed as it is."""
    def plain(h: BaseHTTPRequestHandler, seen: Seen) -> None:
        payload = b"".join(f"event: tick\ndata: tick {i} <not json>\n\n".encode() for i in range(20))
        payload += b"data: " + b"x" * 200_000 + b"\n\n"  # beyond the MCP event limit set below
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    upstream.route("/ticks", plain)
    gw = make_gateway(write_rules(tmp_path / "rules.yaml", [upstream.port]),
                      fleetgate_mcp_max_body="100000")
    with gw.client(token(sub="a", role="tester")) as c:
        r = c.get(upstream.url + "/ticks", headers={"Accept": "text/event-stream"})
    assert r.status_code == 200
    assert r.text.count("data: tick") == 20 and "tick 19 <not json>" in r.text
    assert r.text.endswith("x" * 200_000 + "\n\n")  # once known not MCP, nothing is held
    rec = gw.wait_for_decision(lambda d: d.get("path") == "/ticks")
    assert "mcp" not in rec
