"""An MCP server built with the SDK 1.x (low-level ``Server``), for the 1.x/2.x interplay tests.

Run with ``.venv-mcp1/bin/python`` (mcp 1.30 alone; no fleetgate there)::

    server.py --transport streamable-json|streamable-sse|sse --certfile PEM --tools JSON

``--certfile`` holds the key and the certificate chain (the test issues it); ``--tools`` is a
JSON list of MCP tool objects (``name``, ``description``, ``inputSchema``), the same tools the
2.x mock serves.  It listens on 127.0.0.1 (``--port``, default any free one) and writes JSON
lines to stdout: ``{"event": "listening", "port": N}`` once it accepts connections, then
``{"event": "call", "name": ..., "arguments": ...}`` for every ``tools/call`` that reaches a
handler, so the test can tell a call the gateway refused from one that ran.  SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
from typing import Any

import mcp.types as types
import uvicorn
from mcp.server.lowlevel import Server
from mcp.server.sse import SseServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

TRANSPORTS = ("streamable-json", "streamable-sse", "sse")


def emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def build_server(tools: list[types.Tool]) -> Server[Any, Any]:
    server: Server[Any, Any] = Server("fleetgate-test-mcp1", version="1.0.0")
    known = {t.name for t in tools}

    @server.list_tools()
    async def list_tools() -> list[types.Tool]:
        return tools

    @server.call_tool(validate_input=False)
    async def call_tool(name: str, arguments: dict[str, Any]) -> list[types.ContentBlock]:
        emit(event="call", name=name, arguments=arguments)
        if name not in known:
            raise ValueError(f"unknown tool {name}")
        text = f"{name} ran with {json.dumps(arguments, sort_keys=True)}"
        return [types.TextContent(type="text", text=text)]

    return server


def build_app(server: Server[Any, Any], transport: str) -> Any:
    options = server.create_initialization_options()
    sse = SseServerTransport("/messages/") if transport == "sse" else None
    manager = None if sse else StreamableHTTPSessionManager(
        app=server, json_response=transport == "streamable-json")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            async with contextlib.AsyncExitStack() as stack:
                while True:
                    message = await receive()
                    if message["type"] == "lifespan.startup":
                        if manager is not None:
                            await stack.enter_async_context(manager.run())
                        await send({"type": "lifespan.startup.complete"})
                    elif message["type"] == "lifespan.shutdown":
                        await send({"type": "lifespan.shutdown.complete"})
                        return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if manager is not None and path == "/mcp":
            await manager.handle_request(scope, receive, send)
        elif sse is not None and path == "/sse" and scope["method"] == "GET":
            async with sse.connect_sse(scope, receive, send) as (read, write):
                await server.run(read, write, options)
        elif sse is not None and path == "/messages/":
            await sse.handle_post_message(scope, receive, send)
        else:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    return app


async def serve(args: argparse.Namespace) -> None:
    tools = [types.Tool.model_validate(t) for t in json.loads(args.tools)]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    config = uvicorn.Config(build_app(build_server(tools), args.transport), log_level="warning",
                            lifespan="on", ws="none", access_log=False, timeout_graceful_shutdown=1,
                            ssl_certfile=args.certfile, ssl_keyfile=args.certfile)
    server = uvicorn.Server(config)

    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.01)
        emit(event="listening", port=sock.getsockname()[1])

    announcing = asyncio.ensure_future(announce())
    await server.serve(sockets=[sock])
    announcing.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=TRANSPORTS, required=True)
    parser.add_argument("--certfile", required=True)
    parser.add_argument("--tools", required=True)
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
