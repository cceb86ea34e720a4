"""ReusePort: the proxy port shared by several gateway processes (``fleetgate_reuse_port``).

``fleetgate run --workers N`` starts N mitmdump processes on one ``--listen-port``: each binds
its own listening socket with ``SO_REUSEPORT`` and the kernel spreads new connections over
them (a hash of the connection's addresses), so every core serves agents with no user-space
balancer in the path. mitmproxy 12.3 binds its TCP proxy listeners with
``asyncio.start_server(self.handle_stream, host, port)`` in
``mode_servers.AsyncioServerInstance.listen`` and has no option for ``reuse_port``, so
:func:`install` gives that one module a view of :mod:`asyncio` whose ``start_server`` adds
``reuse_port=True`` while the option is on; everything else it reads is asyncio's own. It is
installed once per process and refuses to start (a clear error) when ``listen`` no longer
makes that call: a mitmproxy upgrade that moved it must be looked at, not silently lose the
option. UDP modes (``mitmproxy_rs``) are not affected.

mitmdump binds its proxy port as it starts, concurrently with loading its scripts (``-s`` is
loaded by a task), so an option applied by a script could come too late for that bind. So
the option needs ``--set server=false`` at start: :meth:`ReusePort.running`, which runs once
the option is applied and the view installed, turns the server on, and the listeners bind
then, with ``SO_REUSEPORT``. Started with the option on and the server already on, the
gateway refuses to run (the port may be bound without it) and says what to pass;
``fleetgate run --workers`` passes both.

Linux lets sockets share a port with ``SO_REUSEPORT`` only when every one of them set it and
they belong to the same user: a gateway of another user cannot steal connections, but one of
the same user started with the option on will take its share.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

from mitmproxy import ctx
from mitmproxy.proxy import mode_servers

log = logging.getLogger(__name__)

# The exact call the wrap relies on (mitmproxy 12.3.x, mode_servers.py).
EXPECTED_CALL = "asyncio.start_server(self.handle_stream, host, port)"
_enabled = [False]  # per process, like the wrap itself; set by ReusePort.configure


class _AsyncioView:
    """What ``mode_servers`` sees as ``asyncio``: asyncio itself, except ``start_server``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def start_server(*args: Any, **kwargs: Any) -> asyncio.Server:
        if _enabled[0]:
            kwargs.setdefault("reuse_port", True)
        return await asyncio.start_server(*args, **kwargs)


def install() -> None:
    """Give ``mode_servers`` the asyncio view once; raise if ``listen`` is not as expected."""
    current = getattr(mode_servers, "asyncio", None)
    if isinstance(current, _AsyncioView):
        return
    cls: Any = getattr(mode_servers, "AsyncioServerInstance", None)
    listen = getattr(cls, "listen", None)
    try:
        source = inspect.getsource(listen) if listen is not None else ""
    except (OSError, TypeError):
        source = ""
    if current is not asyncio or EXPECTED_CALL not in source:
        raise RuntimeError(
            "fleetgate: this mitmproxy does not bind its proxy listeners with "
            f"{EXPECTED_CALL} in mode_servers.AsyncioServerInstance.listen; "
            "fleetgate_reuse_port (fleetgate run --workers) cannot work with it "
            "(fleetgate supports mitmproxy 12.3.x)")
    setattr(mode_servers, "asyncio", _AsyncioView())  # noqa: B010 (one module's view)


def enabled() -> bool:
    return _enabled[0]


class ReusePort:
    def load(self, loader: Any) -> None:
        loader.add_option(
            "fleetgate_reuse_port", bool, False,
            "Bind the proxy listeners with SO_REUSEPORT, so several gateway processes share "
            "one listen port and the kernel spreads connections over them (fleetgate run "
            "--workers N sets it). Needs server=false at start: fleetgate turns the server on "
            "once this is applied.")
        install()

    def configure(self, updated: set[str]) -> None:
        if "fleetgate_reuse_port" in updated:
            _enabled[0] = bool(ctx.options.fleetgate_reuse_port)

    def running(self) -> None:
        if not _enabled[0]:
            return
        if ctx.options.server:
            log.error("fleetgate: fleetgate_reuse_port needs --set server=false at start "
                      "(mitmproxy binds the proxy port while it loads scripts, so the port may "
                      "be bound without SO_REUSEPORT); fleetgate turns the server on once the "
                      "option is applied. fleetgate run --workers passes both.")
            ctx.master.shutdown()
            return
        log.info("fleetgate: binding the proxy listeners with SO_REUSEPORT")
        ctx.options.update(server=True)
