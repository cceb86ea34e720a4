"""Running a mitmproxy layer step while replacing some of the commands it yields.

mitmproxy's layer steps are generators: they yield commands (hooks, ``SendHttp``...) and are
sent back each command's reply. Where mitmproxy offers no hook, fleetgate wraps a step
(:mod:`fleetgate.addons.upstream_errors`, :mod:`fleetgate.addons.request_bodies`) and relays it
through :func:`relay`, which keeps that send/reply protocol exact so the wrapped step behaves
as before for every command the wrapper leaves alone.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from typing import Any

Replace = Callable[[Any], Iterable[Any] | None]


def relay(step: Generator[Any, Any, Any], replace: Replace) -> Generator[Any, Any, Any]:
    """Yield ``step``'s commands, forwarding replies, except where ``replace(command)`` returns
    an iterable: its commands are yielded instead (an empty one drops the command), and the
    step is resumed as if the command had had no reply. Returns the step's return value."""
    reply: Any = None
    while True:
        try:
            cmd = step.send(reply)
        except StopIteration as stop:
            return stop.value
        instead = replace(cmd)
        if instead is None:
            reply = yield cmd
        else:
            yield from instead
            reply = None
