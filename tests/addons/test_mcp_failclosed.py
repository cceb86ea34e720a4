"""McpGuard fails closed: a crash while judging a request denies it; an answer that cannot
be read or rewritten is withheld or its stream cut, never passed on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chain import basic, request_flow, run_hook, run_request, running_chain, tok
from mitmproxy import http

from fleetgate.addons import mcp as mcp_module
from fleetgate.addons.state import CUT, MCP

RULES = """apiVersion: fleetgate/v1
agents:
- name: tester
  match: 'jwt.agent_role == "tester"'
  egress: {hosts: [mcp.example.com]}
  authorization: {rules: [{allow: 'true'}]}
mcp:
  servers:
  - name: tools
    hosts: [mcp.example.com]
    mcpAuthorization:
      rules: ['mcp.tool.name == "nmap_scan"']
"""


@pytest.fixture
def addons(tmp_path: Path) -> Iterator[list[Any]]:
    with running_chain(tmp_path, RULES) as (_, chain):
        yield chain


def mcp_flow(body: Any) -> Any:
    f = request_flow(path="/mcp", host="mcp.example.com", method="POST", auth=basic(tok()))
    f.request.headers["content-type"] = "application/json"
    f.request.content = json.dumps(body).encode()
    return f


def test_a_crash_while_judging_denies(addons: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: Any, **__: Any) -> Any:
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(mcp_module, "judge_request", boom)
    f = mcp_flow({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "nmap_scan"}})
    run_request(addons, f)
    assert f.response is not None and f.response.status_code == 500
    assert json.loads(f.response.content)["fleetgate"]["rule"] == "internal-error"


def answer(f: Any, ctype: str, body: bytes, length: bool = True) -> None:
    headers = {"content-type": ctype}
    if length:
        headers["content-length"] = str(len(body))
    f.response = http.Response.make(200, b"", headers)
    f.response.raw_content = None if not length else body


def test_an_unreadable_json_answer_is_withheld(addons: list[Any]) -> None:
    f = mcp_flow({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    run_request(addons, f)
    assert f.response is None and f.metadata[MCP]["server"] == "tools"
    answer(f, "application/json", b'{"jsonrpc":"2.0","id":1,"result":{"tools":[]},"result":{}}')
    run_hook(addons, "responseheaders", f)
    run_hook(addons, "response", f)
    assert f.response.status_code == 502
    assert "could not check" in json.loads(f.response.content)["error"]["message"]


def test_a_stream_that_cannot_be_rewritten_is_cut(addons: list[Any],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    f = mcp_flow({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    run_request(addons, f)
    answer(f, "text/event-stream", b"", length=False)
    run_hook(addons, "responseheaders", f)
    stream = f.response.stream
    assert callable(stream)
    listed = b'data: {"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"nmap_scan"},{"name":"x"}]}}\n\n'
    [out] = stream(listed)
    assert json.loads(out.decode().removeprefix("data: "))["result"]["tools"] == [{"name": "nmap_scan"}]
    assert stream(b"data: {not json}\n\n") == []  # cannot be judged: nothing passes, flow cut
    assert f.metadata[CUT]["rule"] == "mcp.answer"
    assert stream(b'data: {"jsonrpc":"2.0","id":2,"result":{}}\n\n') == []  # and nothing after
