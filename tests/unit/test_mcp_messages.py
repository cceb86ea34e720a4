"""MCP JSON-RPC parsing and the facts rules will see (groundwork for MCP governance)."""

from __future__ import annotations

import pytest

from fleetgate.bodies import BodyError, parse_json
from fleetgate.mcp.facts import item_facts, mcp_facts, target_kind
from fleetgate.mcp.messages import INVALID_REQUEST, McpError, parse_messages


def msgs(text: str):
    return parse_messages(parse_json(text.encode()))


def test_single_request_and_batch_are_classified() -> None:
    (m,), batch = msgs('{"jsonrpc":"2.0","id":1,"method":"tools/call",'
                       '"params":{"name":"nmap_scan","arguments":{"target":"10.0.0.1"}}}')
    assert not batch and m.is_request and m.method == "tools/call" and m.id == 1
    items, batch = msgs('[{"jsonrpc":"2.0","id":"a","method":"tools/list"},'
                        '{"jsonrpc":"2.0","method":"notifications/initialized"},'
                        '{"jsonrpc":"2.0","id":7,"result":{}}]')
    assert batch
    assert [(m.is_request, m.is_notification, m.is_response) for m in items] == [
        (True, False, False), (False, True, False), (False, False, True)]


@pytest.mark.parametrize("body", [
    "[]", '"x"', '{"id":1,"method":"tools/list"}', '{"jsonrpc":"1.0","id":1,"method":"x"}',
    '{"jsonrpc":"2.0","id":1,"method":5}', '{"jsonrpc":"2.0","id":true,"method":"x"}',
    '{"jsonrpc":"2.0","id":{"a":1},"method":"x"}', '{"jsonrpc":"2.0","id":1}',
    '[{"jsonrpc":"2.0","id":1,"method":"tools/list"}, 42]',
    '{"jsonrpc":"2.0","id":1,"method":"x","params":"nope"}',
])
def test_malformed_messages_refuse_the_whole_body(body: str) -> None:
    with pytest.raises(McpError) as err:
        msgs(body)
    assert err.value.code in (INVALID_REQUEST, -32602)


def test_duplicate_keys_are_refused_before_any_judgement() -> None:
    with pytest.raises(BodyError):
        msgs('{"jsonrpc":"2.0","id":1,"method":"tools/call",'
             '"params":{"name":"nmap_scan","name":"kubectl_delete"}}')


def test_call_facts_name_the_target() -> None:
    (m,), _ = msgs('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":'
                   '{"name":"kubectl_apply","arguments":{"namespace":"agent-infra"}}}')
    f = mcp_facts(m, "mcp.example.com", "/mcp", "sess-1", "cloud-tools")
    assert f["tool"] == {"name": "kubectl_apply", "arguments": {"namespace": "agent-infra"}}
    assert f["server"] == {"host": "mcp.example.com", "path": "/mcp", "name": "cloud-tools"}
    assert f["session_id"] == "sess-1" and f["listing"] is False
    assert f["prompt"]["name"] == "" and f["resource"]["uri"] == ""
    assert target_kind("tools/call") == "tool" and target_kind("initialize") is None
    (r,), _ = msgs('{"jsonrpc":"2.0","id":2,"method":"resources/read",'
                   '"params":{"uri":"file:///etc/passwd"}}')
    assert mcp_facts(r, "h", "/", None)["resource"]["uri"] == "file:///etc/passwd"
    (c,), _ = msgs('{"jsonrpc":"2.0","id":3,"method":"completion/complete","params":'
                   '{"ref":{"type":"ref/prompt","name":"review"},"argument":{"name":"a","value":"b"}}}')
    assert mcp_facts(c, "h", "/", None)["prompt"]["name"] == "review"


def test_list_item_facts_have_no_arguments() -> None:
    f = item_facts("tools/list", "tool", {"name": "trivy_scan", "inputSchema": {}}, "h", "/", None)
    assert f["listing"] is True and f["tool"] == {"name": "trivy_scan", "arguments": {}}
    r = item_facts("resources/templates/list", "resource",
                   {"uriTemplate": "repo://{name}"}, "h", "/", None)
    assert r["resource"]["uri"] == "repo://{name}"
