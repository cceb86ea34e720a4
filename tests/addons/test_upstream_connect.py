"""The upstream connect bound, on mitmproxy's real ``ConnectionHandler.open_connection``.

The handler around it is a small stand-in (hooks and events recorded), so each place a
connect can hang is reached on purpose: a ``server_connect`` hook that never returns (an
address lookup), a dial that never completes (a full accept queue), and a connection that
opened and must not be touched when the bound passes.
"""

from __future__ import annotations

import asyncio
import socket
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
from mitmproxy import connection
from mitmproxy.proxy import commands, events, server, server_hooks

from fleetgate.addons import upstream_connect
from fleetgate.upstream_failure import CONNECT_TIMEOUT, classify

BOUND = 0.2


class StandIn:
    """What ``open_connection`` uses of its ``ConnectionHandler``."""

    def __init__(self, hang_in_connect_hook: bool = False) -> None:
        self.client = connection.Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2),
                                        timestamp_start=0)
        self.hang_in_connect_hook = hang_in_connect_hook
        self.hooks: list[str] = []
        self.completed: list[str | None] = []
        self.max_conns: defaultdict[Any, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(5))
        self.transports: dict[Any, Any] = {}
        self.hold = asyncio.Event()

    def log(self, message: str, level: int = 0) -> None:
        pass

    async def handle_hook(self, hook: Any) -> None:
        self.hooks.append(type(hook).__name__)
        if isinstance(hook, server_hooks.ServerConnectHook) and self.hang_in_connect_hook:
            await asyncio.Event().wait()  # a lookup that never returns

    async def server_event(self, event: Any) -> None:
        if isinstance(event, events.OpenConnectionCompleted):
            self.completed.append(event.reply)

    async def handle_connection(self, conn: Any) -> None:
        await self.hold.wait()  # the open connection's lifetime
        self.transports.pop(conn).writer.close()


@pytest.fixture(autouse=True)
def bound() -> Iterator[None]:
    upstream_connect.install()
    upstream_connect.set_bound(BOUND)
    yield
    upstream_connect.set_bound(30)


@pytest.fixture
def blackhole() -> Iterator[tuple[str, int]]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    addr = srv.getsockname()
    filler = socket.create_connection(addr)  # the queue is full: further SYNs are dropped
    yield addr
    filler.close()
    srv.close()


def _open(handler: StandIn, address: tuple[str, int]) -> tuple[commands.OpenConnection, Any]:
    conn = connection.Server(address=address)
    cmd = commands.OpenConnection(conn)
    return cmd, server.ConnectionHandler.open_connection(handler, cmd)  # type: ignore[arg-type]


async def _run(handler: StandIn, address: tuple[str, int]) -> commands.OpenConnection:
    cmd, coro = _open(handler, address)
    task = asyncio.create_task(coro)
    await asyncio.wait_for(task, BOUND * 20)  # returns: the wrapper never leaves it cancelled
    assert not task.cancelled()
    return cmd


def _assert_given_up(handler: StandIn, cmd: commands.OpenConnection) -> None:
    assert len(handler.completed) == 1
    reply = handler.completed[0]
    assert reply is not None and reply.startswith(CONNECT_TIMEOUT)
    assert cmd.connection.error == reply
    assert "ServerConnectErrorHook" in handler.hooks
    failure = classify(reply, "api.example.com:443")
    assert (failure.status, failure.rule, failure.retry) == (504, "upstream.timeout", True)
    assert upstream_connect.pending() == 0


def test_a_dial_that_never_completes_is_given_up_at_the_bound(
        blackhole: tuple[str, int]) -> None:
    handler = StandIn()

    async def main() -> tuple[commands.OpenConnection, float]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        cmd = await _run(handler, blackhole)
        return cmd, loop.time() - t0

    cmd, elapsed = asyncio.run(main())
    _assert_given_up(handler, cmd)
    assert BOUND * 0.9 <= elapsed < BOUND * 10


def test_a_lookup_that_never_returns_is_given_up_too() -> None:
    """The cancel lands in the server_connect hook, before mitmproxy's own ``try``: the
    wrapper completes the connect with the error itself, so the request is not left waiting."""
    handler = StandIn(hang_in_connect_hook=True)
    cmd = asyncio.run(_run(handler, ("api.example.com", 443)))
    _assert_given_up(handler, cmd)


def test_an_open_connection_outlives_the_bound(blackhole: tuple[str, int]) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    handler = StandIn()

    async def main() -> tuple[commands.OpenConnection, bool]:
        cmd, coro = _open(handler, srv.getsockname())
        task = asyncio.create_task(coro)
        await asyncio.sleep(BOUND * 3)  # well past the bound, the connection open all along
        alive = not task.done()
        handler.hold.set()
        await asyncio.wait_for(task, 5)
        return cmd, alive

    try:
        cmd, alive = asyncio.run(main())
    finally:
        srv.close()
    assert alive
    assert handler.completed == [None]  # opened, no error
    assert cmd.connection.error is None
    assert upstream_connect.pending() == 0


def test_a_cancel_that_is_not_ours_still_cancels(blackhole: tuple[str, int]) -> None:
    """mitmproxy cancels a connection's task when the agent goes away: that must not be
    swallowed as if it were the bound."""
    upstream_connect.set_bound(30)
    handler = StandIn()

    async def main() -> bool:
        _, coro = _open(handler, blackhole)
        task = asyncio.create_task(coro)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return task.cancelled()

    assert asyncio.run(main())
    assert upstream_connect.pending() == 0
