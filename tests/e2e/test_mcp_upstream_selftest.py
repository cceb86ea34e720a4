"""The MCP test servers and client helpers work on their own (direct TLS, no gateway)."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import httpx2
import mcp.types as types
import pytest
import trustme
from mcp.client.session import ClientSession
from mcp.shared.exceptions import MCPError
from mcp_client import (
    call_tool,
    list_all_tools,
    list_tools,
    probe,
    result_text,
    run_session,
    wait_for_notification,
)
from mcp_upstream import (
    ALL_TOOLS,
    CLOUD_TOOLS,
    POISON_TEXT,
    POISONED_TOOLS,
    PROMPT,
    RESOURCE,
    SECURITY_TOOLS,
    TRANSPORTS,
    McpUpstream,
    Transport,
)


@pytest.fixture(params=TRANSPORTS)
def mcp_upstream(request: pytest.FixtureRequest, upstream_ca: trustme.CA) -> Iterator[McpUpstream]:
    up = McpUpstream(upstream_ca, request.param)
    yield up
    up.stop()


def test_list_call_prompts_resources_and_record(mcp_upstream: McpUpstream, upstream_ca: trustme.CA) -> None:
    up = mcp_upstream
    seen = probe(up.ip_url, up.transport, [("nmap_scan", {"target": "10.0.0.7"})], ca=upstream_ca)

    assert seen.init is not None and seen.init.server_info.name == "fleetgate-test-mcp"
    assert [t.name for t in seen.tools] == [t.name for t in ALL_TOOLS + POISONED_TOOLS]
    assert POISON_TEXT in (seen.tool("add_numbers").description or "")
    assert seen.tool("kubectl").input_schema["required"] == ["command", "namespace"]
    assert [p.name for p in seen.prompts] == [PROMPT.name]
    assert [str(r.uri) for r in seen.resources] == [str(RESOURCE.uri)]
    assert result_text(seen.results[0]) == 'nmap_scan ran with {"target": "10.0.0.7"}'

    assert [(c.name, c.arguments) for c in up.calls] == [("nmap_scan", {"target": "10.0.0.7"})]
    assert up.rpc_methods() == ["initialize", "notifications/initialized", "tools/list", "prompts/list",
                                "resources/list", "tools/call"]
    call_post = next(e for e in up.exchanges() if (e.rpc() or {}).get("method") == "tools/call")
    if up.transport == "sse":
        assert call_post.path.startswith("/messages/?session_id=") and call_post.status == 202
    else:
        assert call_post.path == "/mcp" and call_post.status == 200
        assert call_post.headers["accept"] == "application/json, text/event-stream"
        assert call_post.headers["mcp-session-id"] == up.calls[0].headers["mcp-session-id"]
        expected = "application/json" if up.transport == "streamable-json" else "text/event-stream"
        assert call_post.response_headers["content-type"] == expected


def test_rug_pull_changes_the_next_listing(mcp_upstream: McpUpstream, upstream_ca: trustme.CA) -> None:
    up = mcp_upstream
    notes: list[types.ServerNotification] = []

    async def twice(session: ClientSession) -> tuple[str | None, str | None]:
        before = next(t for t in await list_all_tools(session) if t.name == "docker_ps").description
        await anyio.to_thread.run_sync(
            lambda: up.set_description("docker_ps", f"List containers. {POISON_TEXT}", notify=True))
        await wait_for_notification(notes, "notifications/tools/list_changed")
        after = next(t for t in await list_all_tools(session) if t.name == "docker_ps").description
        return before, after

    before, after = run_session(up.ip_url, up.transport, twice, ca=upstream_ca, notifications=notes)
    assert before == "List running docker containers."
    assert after == f"List containers. {POISON_TEXT}"
    stream = "/sse" if up.transport == "sse" else "/mcp"
    assert [e.method for e in up.exchanges() if e.path == stream and e.method == "GET"] == ["GET"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_tools_list_paginates(transport: Transport, upstream_ca: trustme.CA) -> None:
    with McpUpstream(upstream_ca, transport, tools=SECURITY_TOOLS + CLOUD_TOOLS, page_size=3) as up:

        async def pages(session: ClientSession) -> list[tuple[list[str], str | None]]:
            out: list[tuple[list[str], str | None]] = []
            cursor: str | None = None
            while True:
                page = await session.list_tools(params=types.PaginatedRequestParams(cursor=cursor))
                out.append(([t.name for t in page.tools], page.next_cursor))
                if not (cursor := page.next_cursor):
                    return out

        got = run_session(up.ip_url, transport, pages, ca=upstream_ca)
        assert [len(names) for names, _ in got] == [3, 3, 2]
        assert [cursor for _, cursor in got] == ["3", "6", None]
        assert [t.name for t in list_tools(up.ip_url, transport, ca=upstream_ca)] == \
            [t.name for t in SECURITY_TOOLS + CLOUD_TOOLS]


def test_stateless_streamable(upstream_ca: trustme.CA) -> None:
    with McpUpstream(upstream_ca, "streamable-json", stateless=True) as up:
        result = call_tool(up.ip_url, "streamable-json", "kubectl",
                           {"command": "get pods", "namespace": "prod"}, ca=upstream_ca)
        assert result_text(result) == 'kubectl ran with {"command": "get pods", "namespace": "prod"}'
        assert all("mcp-session-id" not in e.headers for e in up.exchanges())
        assert [e.method for e in up.exchanges()] == ["POST"] * 4  # no GET stream, no DELETE


def test_custom_result_unknown_tool_and_errors(upstream_ca: trustme.CA) -> None:
    with McpUpstream(upstream_ca, "streamable-json", tools=POISONED_TOOLS) as up:
        up.set_result("add_numbers", "3")
        assert result_text(call_tool(up.ip_url, "streamable-json", "add_numbers", {"a": 1, "b": 2},
                                     ca=upstream_ca)) == "3"
        unknown = call_tool(up.ip_url, "streamable-json", "rm_rf", {}, ca=upstream_ca)
        assert unknown.is_error and "unknown tool rm_rf" in result_text(unknown)
        assert up.call_names() == ["add_numbers", "rm_rf"]  # recorded even when unknown

        async def bad_prompt(session: ClientSession) -> object:
            return await session.get_prompt("nope")

        with pytest.raises(MCPError, match="unknown prompt"):
            run_session(up.ip_url, "streamable-json", bad_prompt, ca=upstream_ca)
        with pytest.raises(httpx2.ConnectError):  # an untrusted CA fails the handshake
            run_session(up.ip_url, "streamable-json", list_all_tools, ca=trustme.CA(), timeout=2)
