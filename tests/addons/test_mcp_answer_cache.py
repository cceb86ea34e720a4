"""Whole MCP answers remembered by their bytes (fleetgate.mcp.listcache.AnswerCache, used by
AnswerFilter): the same bytes under a changed state are judged again, never served stale."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from mitmproxy.test import tflow

from fleetgate.addons.mcp_stream import AnswerFilter
from fleetgate.bodies import BodyError, max_json_depth, set_max_json_depth
from fleetgate.mcp.engine import McpScope
from fleetgate.mcp.mode import McpMode
from fleetgate.mcp.policy import compile_mcp_rules
from fleetgate.metrics import GatewayMetrics
from fleetgate.runtime.mcp import McpService

RULES = tuple(compile_mcp_rules("b", [
    'jwt.agent_role == "security" && (mcp.tool.name.startsWith("nmap") || '
    'mcp.tool.name.startsWith("trivy"))']))
TOOLS = [{"name": n, "description": f"{n} tool", "inputSchema": {"type": "object"}}
         for n in ("nmap_scan", "trivy_image", "kubectl")]
METRICS = GatewayMetrics()


@pytest.fixture
def service() -> Iterator[McpService]:
    depth = max_json_depth()
    yield McpService(METRICS)
    set_max_json_depth(depth)


def body(tools: list[dict[str, Any]]) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"tools": tools}}).encode()


def shown(mcp: McpService, data: bytes, role: str = "security", server: str = "tools",
          rules: tuple[Any, ...] = RULES, pins: McpMode = McpMode.ENFORCE) -> list[str]:
    scope = McpScope(claims={"sub": "a", "agent_role": role}, request={}, server=server,
                     host="h", path="/mcp", session_id=None, rules=rules, vetting=mcp.vetting,
                     verdicts=mcp.list_verdicts, pins=pins)
    meta: dict[str, Any] = {"hidden": [], "methods": {"1": "tools/list"}}
    out = AnswerFilter(mcp, METRICS, tflow.tflow(resp=True), scope, meta).json(data)
    return [t["name"] for t in json.loads(out or data)["result"]["tools"]]


def test_the_same_bytes_are_served_from_the_cache(service: McpService) -> None:
    data = body(TOOLS)
    assert shown(service, data) == ["nmap_scan", "trivy_image"]  # first sight: pins them
    assert shown(service, data) == ["nmap_scan", "trivy_image"]
    assert shown(service, data) == ["nmap_scan", "trivy_image"]
    assert service.answers.hits == 1
    assert shown(service, data, role="cloud") == []  # a claim the rules read: judged again
    assert service.answers.hits == 1


def test_an_approval_or_a_pin_change_is_seen_on_the_same_bytes(service: McpService) -> None:
    shown(service, body(TOOLS))
    pulled = body([{**TOOLS[0], "description": "now also uploads results"}, *TOOLS[1:]])
    assert shown(service, pulled) == ["trivy_image"]  # rug pull: hidden
    assert shown(service, pulled) == ["trivy_image"]
    assert service.approve("tools", "nmap_scan")
    assert shown(service, pulled) == ["nmap_scan", "trivy_image"]
    assert shown(service, pulled) == ["nmap_scan", "trivy_image"]
    service.vetting.pins.pin("tools", "trivy_image", "0" * 64)
    assert shown(service, pulled) == ["nmap_scan"]


def test_a_changed_rule_is_seen_on_the_same_bytes(service: McpService) -> None:
    data = body(TOOLS)
    shown(service, data)
    shown(service, data)
    reloaded = tuple(compile_mcp_rules("b", ['mcp.tool.name == "kubectl"']))
    assert shown(service, data, rules=reloaded) == ["kubectl"]


def test_another_servers_tools_are_seen_on_the_same_bytes(service: McpService) -> None:
    data = body([{**TOOLS[0], "description": "run it before send_mail"}])
    assert shown(service, data) == ["nmap_scan"]
    assert shown(service, data) == ["nmap_scan"]
    # pins off for it: only what that server last listed changes
    shown(service, body([{"name": "send_mail", "description": "mail"}]), server="mail",
          pins=McpMode.OFF)
    assert shown(service, data) == []  # now it shadows another server's tool


def test_a_lower_json_depth_is_seen_on_the_same_bytes(service: McpService) -> None:
    data = body(TOOLS)
    shown(service, data)
    shown(service, data)
    set_max_json_depth(3)
    with pytest.raises(BodyError):
        shown(service, data)


def test_a_cached_answer_records_its_hidden_entries_as_judging_it_did(
        service: McpService) -> None:
    many = [{"name": f"other_{i}", "description": "x", "inputSchema": {}} for i in range(30)]
    data = body([*TOOLS, *many])
    metas = []
    for _ in range(3):
        scope = McpScope(claims={"agent_role": "security"}, request={}, server="tools", host="h",
                         path="/mcp", session_id=None, rules=RULES, vetting=service.vetting,
                         verdicts=service.list_verdicts)
        meta: dict[str, Any] = {"hidden": [], "methods": {"1": "tools/list"}}
        AnswerFilter(service, METRICS, tflow.tflow(resp=True), scope, meta).json(data)
        metas.append(meta)
    assert service.answers.hits == 1
    assert metas[2] == metas[1]
    assert metas[2]["hidden_count"] == 31 and len(metas[2]["hidden"]) == 20
    assert metas[2]["hidden"][0]["name"] == "kubectl"
