"""The official MCP SDK client, driven like an agent would: through an HTTPS proxy with a JWT.

Async building blocks (:func:`open_session`, :func:`list_all_tools`) and synchronous wrappers
(:func:`run_session`, :func:`list_tools`, :func:`call_tool`, :func:`probe`) so pytest tests stay
sync (pytest runs with ``-p no:anyio``; the wrappers use :func:`anyio.run`).

``proxy`` is a proxy URL with credentials (``Gateway.proxy_url(token)``, i.e.
``http://agent:TOKEN@127.0.0.1:PORT``) or None for a direct connection; ``ca`` is what the
client trusts: a CA file (the gateway's ``ca_cert``), a ``trustme.CA`` (the upstream's, when
going direct) or a ready ``ssl.SSLContext``.

Note the SDK's habits (mcp 2.3; its HTTP client is ``httpx2``): ``call_tool`` on a tool the
session has not listed yet makes the client send a ``tools/list`` of its own right after the
call (to learn output schemas);
streamable HTTP (stateful) opens a standing ``GET`` stream after ``initialize`` and sends
``DELETE`` on close.  Refusals: a JSON-RPC error raises ``MCPError``; a non-2xx answer to a
streamable POST raises ``httpx2.HTTPStatusError``; over HTTP+SSE a non-2xx POST is only logged
and the request times out (``MCPError`` "Timed out ...") unless the error arrives on the SSE
stream.  :func:`run_session` unwraps the SDK's ``ExceptionGroup``s to the first real error.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp.types as types
import trustme
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from fleetgate.mocks.mcp_server import TRANSPORTS, Transport

Trust = Path | str | ssl.SSLContext | trustme.CA | None


class SessionClosed(ConnectionError):
    """The transport ended the session while the test's coroutine was still running."""


def ssl_context_for(ca: Trust) -> ssl.SSLContext | bool:
    """An SSL context trusting ``ca`` (None: the system default store)."""
    if ca is None:
        return True
    if isinstance(ca, ssl.SSLContext):
        return ca
    ctx = ssl.create_default_context()
    if isinstance(ca, trustme.CA):
        ca.configure_trust(ctx)
    else:
        ctx.load_verify_locations(cafile=str(ca))
    return ctx


def http_client_factory(proxy: str | None, ca: Trust, timeout: float = 10.0,
                        hooks: list[Callable[[httpx2.Request], Awaitable[None]]] | None = None
                        ) -> Callable[..., httpx2.AsyncClient]:
    """An ``McpHttpClientFactory`` for the SDK: every client goes through ``proxy`` trusting ``ca``."""
    verify = ssl_context_for(ca)
    ours = httpx2.Timeout(timeout, read=max(timeout, 30.0))

    def factory(headers: dict[str, str] | None = None, timeout: httpx2.Timeout | None = None,
                auth: httpx2.Auth | None = None) -> httpx2.AsyncClient:
        # the SDK passes its own timeouts (30 s, 300 s reads); ours are shorter so tests fail fast
        return httpx2.AsyncClient(proxy=proxy, verify=verify, headers=headers, auth=auth, timeout=ours,
                                 event_hooks={"request": list(hooks or [])})

    return factory


@contextlib.asynccontextmanager
async def open_session(url: str, transport: Transport, *, proxy: str | None = None, ca: Trust = None,
                       headers: dict[str, str] | None = None, timeout: float = 10.0,
                       initialize: bool = True,
                       hooks: list[Callable[[httpx2.Request], Awaitable[None]]] | None = None,
                       notifications: list[types.ServerNotification] | None = None,
                       ) -> AsyncIterator[ClientSession]:
    """An MCP ``ClientSession`` over ``transport`` (initialized unless ``initialize=False``).

    ``hooks`` are httpx request event hooks (e.g. to record the headers the SDK sends);
    server notifications (e.g. ``tools/list_changed``) are appended to ``notifications``.
    """

    async def on_message(message: Any) -> None:
        if notifications is not None and not isinstance(message, Exception):
            notifications.append(message)

    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}")
    make = http_client_factory(proxy, ca, timeout, hooks)
    async with contextlib.AsyncExitStack() as stack:
        if transport == "sse":
            read, write = await stack.enter_async_context(
                sse_client(url, headers=headers, timeout=timeout, sse_read_timeout=max(timeout, 30.0),
                           httpx_client_factory=make))
        else:
            client = await stack.enter_async_context(make(headers=headers))
            read, write = await stack.enter_async_context(streamable_http_client(url, http_client=client))
        session = await stack.enter_async_context(
            ClientSession(read, write, read_timeout_seconds=timeout,
                          message_handler=on_message))
        if initialize:
            await session.initialize()
        yield session


async def list_all_tools(session: ClientSession) -> list[types.Tool]:
    """``tools/list`` following ``nextCursor`` until the last page."""
    tools: list[types.Tool] = []
    cursor: str | None = None
    while True:
        params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools += page.tools
        cursor = page.next_cursor
        if not cursor:
            return tools


async def wait_for_notification(notifications: list[types.ServerNotification], method: str,
                                timeout: float = 5.0) -> types.ServerNotification:
    """Inside a session: wait until a notification with ``method`` has been received."""
    with anyio.fail_after(timeout):
        while True:
            for n in notifications:
                if n.method == method:
                    return n
            await anyio.sleep(0.01)


def result_text(result: types.CallToolResult) -> str:
    """The text parts of a tool result, joined."""
    return "".join(c.text for c in result.content if isinstance(c, types.TextContent))


def run_session[T](url: str, transport: Transport, fn: Callable[[ClientSession], Awaitable[T]], *,
                   proxy: str | None = None, ca: Trust = None, headers: dict[str, str] | None = None,
                   timeout: float = 10.0, initialize: bool = True,
                   hooks: list[Callable[[httpx2.Request], Awaitable[None]]] | None = None,
                   notifications: list[types.ServerNotification] | None = None) -> T:
    """Open a session, run ``await fn(session)`` and close everything; returns ``fn``'s result.

    The whole thing is bounded by ``3 * timeout`` seconds (raises ``TimeoutError``).  The SDK's
    task groups wrap errors in (nested) ``ExceptionGroup``s; the first real error is re-raised
    on its own (``MCPError``, ``httpx2.HTTPStatusError``, ...) so ``pytest.raises`` works.
    """

    async def main() -> T:
        with anyio.fail_after(3 * timeout):
            async with open_session(url, transport, proxy=proxy, ca=ca, headers=headers,
                                    timeout=timeout, initialize=initialize, hooks=hooks,
                                    notifications=notifications) as session:
                return await fn(session)
        # the SDK runs the session body inside the transport's task group: when the transport
        # gives up (stream closed, server gone) it cancels the body and swallows the cancellation
        raise SessionClosed(f"the MCP session to {url} ended before the test's coroutine finished")

    try:
        return anyio.run(main)
    except BaseExceptionGroup as group:
        raise first_error(group) from group


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf of a (nested) exception group that is not a cancellation."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for sub in exc.exceptions:
                walk(sub)
        else:
            leaves.append(exc)

    walk(group)
    real = [e for e in leaves if not isinstance(e, asyncio.CancelledError)]
    return (real or leaves)[0]


def list_tools(url: str, transport: Transport, **kw: Any) -> list[types.Tool]:
    """All tools (every page) in a fresh session."""
    return run_session(url, transport, list_all_tools, **kw)


def call_tool(url: str, transport: Transport, name: str, arguments: dict[str, Any] | None = None,
              *, list_first: bool = True, **kw: Any) -> types.CallToolResult:
    """``tools/call`` in a fresh session (after a full ``tools/list`` unless ``list_first=False``)."""

    async def fn(session: ClientSession) -> types.CallToolResult:
        if list_first:
            await list_all_tools(session)
        return await session.call_tool(name, arguments or {})

    return run_session(url, transport, fn, **kw)


@dataclass
class Probe:
    """What one agent session saw: server info, tools, prompts, resources and tool results."""

    init: types.InitializeResult | None = None
    tools: list[types.Tool] = field(default_factory=list)
    prompts: list[types.Prompt] = field(default_factory=list)
    resources: list[types.Resource] = field(default_factory=list)
    results: list[types.CallToolResult] = field(default_factory=list)

    def tool(self, name: str) -> types.Tool:
        return next(t for t in self.tools if t.name == name)


def probe(url: str, transport: Transport, calls: Sequence[tuple[str, dict[str, Any]]] = (),
          *, prompts: bool = True, resources: bool = True, **kw: Any) -> Probe:
    """One session doing what an agent does: initialize, list everything, call ``calls`` in order."""
    out = Probe()

    async def fn(session: ClientSession) -> Probe:
        out.tools = await list_all_tools(session)
        if prompts:
            out.prompts = (await session.list_prompts()).prompts
        if resources:
            out.resources = (await session.list_resources()).resources
        for name, args in calls:
            out.results.append(await session.call_tool(name, args))
        return out

    async def init_and_fn(session: ClientSession) -> Probe:
        out.init = await session.initialize()
        return await fn(session)

    return run_session(url, transport, init_and_fn, initialize=False, **kw)
