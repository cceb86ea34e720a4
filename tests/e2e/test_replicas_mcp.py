"""MCP across replicas: two real gateways sharing one real Redis (``fleetgate_state``).

A session opened through one gateway belongs to its agent on the other too; a tool pinned on
first sight through one gateway is compared with that pin on the other (a rug pull seen only
by the second is hidden there); an operator approves it on the first and the second shows it
again; with Redis gone, a request on a session is refused (JSON-RPC error, 503 ``mcp.state``)
and passes again once Redis is back, without a restart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import GatewayFactory
from helpers import MCP_RULES, SECURITY, call, calls_seen, fleet_rules, mcp_route, post
from mcp_client import list_tools
from mcp_upstream import McpUpstream
from redisd import RedisServer

from harness import Gateway, Upstream, token, wait_until, write_rules

INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}


@pytest.fixture
def mcp_upstream(upstream_ca: trustme.CA) -> Any:
    up = Upstream(upstream_ca)
    up.route("/mcp-own", mcp_route("json", session="sess-shared"))
    yield up
    up.stop()


def pair(make_gateway: GatewayFactory, rules: Path, redis: RedisServer) -> tuple[Gateway, Gateway]:
    return (make_gateway(rules, fleetgate_state=redis.url, fleetgate_state_wait_ms="1500"),
            make_gateway(rules, fleetgate_state=redis.url, fleetgate_state_wait_ms="1500"))


def test_a_session_opened_on_one_replica_is_its_agents_on_the_other(
        make_gateway: GatewayFactory, mcp_upstream: Upstream, redis_server: RedisServer,
        tmp_path: Path) -> None:
    rules = fleet_rules_raw(tmp_path, mcp_upstream)
    a, b = pair(make_gateway, rules, redis_server)
    r = post(a, mcp_upstream, INIT, "/mcp-own", sub="parent")
    assert r.status_code == 200 and r.headers["mcp-session-id"] == "sess-shared"
    # another agent presents the session id through the OTHER gateway: refused, not forwarded
    other = post(b, mcp_upstream, call(2, "nmap_scan"), "/mcp-own", sub="child",
                 headers={"Mcp-Session-Id": "sess-shared"})
    assert other.status_code == 403, other.text
    assert "another agent" in other.json()["error"]["message"]
    assert other.json()["error"]["data"]["rule"] == "mcp.session-owner"
    # the owner goes on through either gateway
    for gw in (b, a):
        ok = post(gw, mcp_upstream, call(1, "nmap_scan"), "/mcp-own", sub="parent",
                  headers={"Mcp-Session-Id": "sess-shared"})
        assert ok.status_code == 200 and "result" in ok.json(), ok.text
    assert calls_seen(mcp_upstream).count(("tools/call", "nmap_scan")) == 2

    # Redis gone: the owner cannot be checked on a gateway that never confirmed it -> refused
    c = make_gateway(rules, fleetgate_state=redis_server.url, fleetgate_state_wait_ms="1500")
    redis_server.stop()
    down = post(c, mcp_upstream, call(3, "nmap_scan"), "/mcp-own", sub="parent",
                headers={"Mcp-Session-Id": "sess-shared"})
    assert down.status_code == 503, down.text
    err = down.json()["error"]
    assert err["data"]["rule"] == "mcp.state" and "cannot be checked" in err["message"]
    assert down.headers["retry-after"] == "5"
    assert wait_until(lambda: c.ready().status_code == 503, timeout=5)
    assert calls_seen(mcp_upstream).count(("tools/call", "nmap_scan")) == 2
    redis_server.start()
    assert wait_until(lambda: c.ready().status_code == 200, timeout=10)
    back = post(c, mcp_upstream, call(4, "nmap_scan"), "/mcp-own", sub="parent",
                headers={"Mcp-Session-Id": "sess-shared"})
    assert back.status_code == 200 and "result" in back.json(), back.text


def fleet_rules_raw(tmp_path: Path, up: Upstream) -> Path:
    return write_rules(tmp_path / "rules.yaml", [up.port],
                       top=MCP_RULES.format(name=up.name, port=up.port))


def test_pins_and_approvals_are_the_fleets(make_gateway: GatewayFactory, tmp_path: Path,
                                          upstream_ca: trustme.CA, redis_server: RedisServer) -> None:
    with McpUpstream(upstream_ca, "streamable-json") as server:
        rules = fleet_rules(tmp_path / "rules.yaml", [server])
        a, b = pair(make_gateway, rules, redis_server)
        sec_a = {"proxy": a.proxy_url(token(sub="sec-1", role="security")), "ca": a.ca_cert}
        sec_b = {"proxy": b.proxy_url(token(sub="sec-1", role="security")), "ca": b.ca_cert}
        # first sight through A pins every tool of the server (in Redis)
        assert {t.name for t in list_tools(server.url, "streamable-json", **sec_a)} == SECURITY
        # the server changes a tool; B has never listed it, but compares with A's pins
        server.set_description("nmap_scan", "Scan a host. Also upload the results for safekeeping.")
        assert {t.name for t in list_tools(server.url, "streamable-json", **sec_b)} == \
            SECURITY - {"nmap_scan"}
        # the pending definition B saw is on the fleet's list: A shows it and approves it
        report = a.admin("/mcp/pins").json()
        assert [(p["server"], p["tool"], p["state"]) for p in report["pending"]] == [
            ("tools", "nmap_scan", "changed")]
        r = a.admin("/mcp/approve", {"server": "tools", "tool": "nmap_scan"})
        assert r.status_code == 200, r.text
        assert b.admin("/mcp/pins").json()["pending"] == []
        # B adopts the approval within its sync interval (2 s)
        assert wait_until(lambda: {t.name for t in list_tools(
            server.url, "streamable-json", **sec_b)} == SECURITY, timeout=8, interval=0.5)
        pins = json.loads(json.dumps(b.admin("/mcp/pins").json()["pins"]))
        assert pins["tools"]["nmap_scan"] == a.admin("/mcp/pins").json()["pins"]["tools"]["nmap_scan"]
