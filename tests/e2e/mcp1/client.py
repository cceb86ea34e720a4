"""An agent built with the MCP SDK 1.x client, for the 1.x/2.x interplay tests.

Run with ``.venv-mcp1/bin/python`` (mcp 1.30 alone; no fleetgate there)::

    client.py --url URL --transport streamable-json|streamable-sse|sse \\
              --proxy http://agent:JWT@127.0.0.1:PORT --cafile GATEWAY_CA \\
              --call '["nmap_scan", {"target": "10.0.0.1"}]' ...

It goes through the HTTPS proxy with the JWT in the proxy URL (as an agent pod does), trusting
``--cafile`` (the gateway's CA), initializes, lists every tool (following ``nextCursor``), makes
each ``--call`` in order and prints one JSON object: ``protocolVersion``, ``serverInfo``,
``tools`` (names) and ``calls``, each either ``{"name", "text", "isError"}`` or ``{"name",
"error": {"code", "message"}}`` (the JSON-RPC error the SDK raised as ``McpError``).
"""

from __future__ import annotations

import argparse
import json
import ssl
from datetime import timedelta
from typing import Any

import anyio
import httpx
import mcp.types as types
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import McpError

TIMEOUT = 10.0


def client_factory(proxy: str, cafile: str) -> Any:
    verify = ssl.create_default_context(cafile=cafile)

    def factory(headers: dict[str, str] | None = None, timeout: httpx.Timeout | None = None,
                auth: httpx.Auth | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(proxy=proxy, verify=verify, headers=headers, auth=auth,
                                 timeout=httpx.Timeout(TIMEOUT, read=30.0))

    return factory


async def session_calls(session: ClientSession, calls: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    init = await session.initialize()
    tools: list[str] = []
    cursor: str | None = None
    while True:
        params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools += [t.name for t in page.tools]
        if not (cursor := page.nextCursor):
            break
    results: list[dict[str, Any]] = []
    for name, arguments in calls:
        try:
            res = await session.call_tool(name, arguments)
        except McpError as exc:
            results.append({"name": name, "error": {"code": exc.error.code, "message": exc.error.message}})
            continue
        text = "".join(c.text for c in res.content if isinstance(c, types.TextContent))
        results.append({"name": name, "text": text, "isError": res.isError})
    return {"protocolVersion": init.protocolVersion, "serverInfo": init.serverInfo.model_dump(),
            "tools": tools, "calls": results}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    calls = [(c[0], c[1]) for c in (json.loads(raw) for raw in args.call)]
    make = client_factory(args.proxy, args.cafile)
    out: dict[str, Any] = {}
    with anyio.fail_after(3 * TIMEOUT):
        if args.transport == "sse":
            async with sse_client(args.url, timeout=TIMEOUT, sse_read_timeout=30.0,
                                  httpx_client_factory=make) as (read, write), \
                    ClientSession(read, write, read_timeout_seconds=timedelta(seconds=TIMEOUT)) as session:
                out = await session_calls(session, calls)
        else:
            async with make() as client, \
                    streamable_http_client(args.url, http_client=client) as (read, write, _), \
                    ClientSession(read, write, read_timeout_seconds=timedelta(seconds=TIMEOUT)) as session:
                out = await session_calls(session, calls)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--transport", choices=("streamable-json", "streamable-sse", "sse"), required=True)
    parser.add_argument("--proxy", required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--call", action="append", default=[], help='JSON: ["tool", {arguments}]')
    print(json.dumps(anyio.run(run, parser.parse_args())))


if __name__ == "__main__":
    main()
