"""The upstream connect bound: a connection that is not open in time is given up, and said so.

mitmproxy 12.3.1 dials an upstream with no timeout of its own: a destination that drops SYNs
holds the agent for the kernel's retries (about two minutes on Linux), and an address lookup
that hangs holds it for as long as the resolver does. Neither has an addon hook that could
bound it, so :func:`install` wraps ``ConnectionHandler.open_connection`` (once per process):
every TCP connection gets one timer, from the ``server_connect`` hooks (fleetgate resolves
names there) through the dial, of ``fleetgate_upstream_connect_timeout`` seconds. When it
fires before the socket is open, the connecting task is cancelled with a message that says
what happened; mitmproxy reports that message to the waiting request as a failed connect,
and :class:`~fleetgate.addons.upstream_errors.UpstreamErrors` answers ``504
upstream.timeout`` in the client's format. Where the cancel lands before mitmproxy's own
``try`` (the lookup in a ``server_connect`` hook, the per-address connection limit), the
wrapper completes the connect with the same error itself, so no request is left waiting.

A connection that opened is never touched: the timer checks ``timestamp_tcp_setup``, which
mitmproxy sets synchronously the moment the socket is open, and the timer is cancelled then.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from mitmproxy.connection import Server
from mitmproxy.proxy import events, server, server_hooks

from fleetgate.upstream_failure import CONNECT_TIMEOUT

log = logging.getLogger(__name__)

_MARK = "_fleetgate_connect_bound"
_bound = [30.0]  # seconds; set by Timeouts.configure (per process, like the wrap itself)


@dataclass(slots=True)
class Pending:
    """One upstream connection being opened."""

    task: asyncio.Task[Any]
    client_id: str
    handle: asyncio.TimerHandle | None = None
    message: str | None = None  # set when the gateway gave up on it


_pending: dict[Server, Pending] = {}


def set_bound(seconds: float) -> None:
    _bound[0] = float(seconds)


def pending() -> int:
    """How many upstream connections are being opened now."""
    return len(_pending)


def give_up(conn: Server, message: str) -> bool:
    """Cancel the opening of ``conn`` with ``message``; False if it already opened or ended."""
    entry = _pending.get(conn)
    if (entry is None or entry.message is not None or conn.timestamp_tcp_setup is not None
            or conn.error or entry.task.done()):
        return False
    entry.message = message
    if entry.handle is not None:
        entry.handle.cancel()
    log.warning("fleetgate: %s", message)
    entry.task.cancel(message)
    return True


def give_up_client(client_id: str, message: str) -> int:
    """Give up every connection being opened for one client connection (its request's bound
    ran out while the dial was still pending); return how many."""
    return sum(give_up(conn, message) for conn, entry in list(_pending.items())
               if entry.client_id == client_id)


def _expired(conn: Server, seconds: float) -> None:
    where = conn.address
    dest = f"{where[0]}:{where[1]}" if where else "the upstream"
    give_up(conn, f"{CONNECT_TIMEOUT} {dest} within {seconds:g}s "
                  "(fleetgate_upstream_connect_timeout)")


def install() -> None:
    """Wrap ``ConnectionHandler.open_connection`` once; refuse to start if it is not there."""
    handler_cls: Any = getattr(server, "ConnectionHandler", None)
    original = getattr(handler_cls, "open_connection", None)
    if original is None or not hasattr(events, "OpenConnectionCompleted"):
        raise RuntimeError("fleetgate: this mitmproxy has no ConnectionHandler.open_connection; "
                           "upstream connects could not be bounded")
    if getattr(original, _MARK, False):
        return

    async def open_connection(self: Any, command: Any) -> None:
        conn = command.connection
        task = asyncio.current_task()
        if conn.transport_protocol != "tcp" or task is None or conn in _pending:
            await original(self, command)
            return
        entry = _pending[conn] = Pending(task, self.client.id)
        seconds = _bound[0]
        entry.handle = asyncio.get_running_loop().call_later(seconds, _expired, conn, seconds)
        try:
            await original(self, command)  # returns when the connection ends, not at connect
        except asyncio.CancelledError:
            if entry.message is None:
                raise  # not ours: mitmproxy is closing the connection handler
            task.uncancel()
            if conn.error is None and conn.timestamp_tcp_setup is None:
                # cancelled before mitmproxy's own try (a lookup in server_connect, the
                # per-address limit): complete the connect with our error, as it would
                conn.error = entry.message
                data = server_hooks.ServerConnectionHookData(client=self.client, server=conn)
                await self.handle_hook(server_hooks.ServerConnectErrorHook(data))
                await self.server_event(events.OpenConnectionCompleted(command, entry.message))
        finally:
            if entry.handle is not None:
                entry.handle.cancel()
            _pending.pop(conn, None)

    setattr(open_connection, _MARK, True)
    handler_cls.open_connection = open_connection


def connected(conn: Server) -> None:
    """The socket is open: the bound no longer applies to it."""
    entry = _pending.pop(conn, None)
    if entry is not None and entry.handle is not None:
        entry.handle.cancel()
