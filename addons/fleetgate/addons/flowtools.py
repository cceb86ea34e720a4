"""What every fleetgate addon does to a flow: name the decision, deny it, cut it.

Also the fail-closed wrapper. mitmproxy logs an exception raised in a hook and lets the
flow continue upstream; for a gateway that is failing open. Every enforcing hook is wrapped
with :func:`fail_closed`, which turns any unexpected exception into a 500 denial carrying the
decision id (or a kill when the response is already on its way).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import socket
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, http

from fleetgate.addons.state import (
    CUT,
    HEADER,
    decision_id,
    decision_of,
    llm_usage_of,
    record_decision,
    set_comment,
)
from fleetgate.wire import denial_body

log = logging.getLogger(__name__)

def deny(flow: http.HTTPFlow, status: int, rule: str, reason: str,
         hint: str | None = None, headers: dict[str, str] | None = None,
         lead: str = "fleetgate denied this request", **extra: Any) -> None:
    """Answer the flow ourselves: it never reaches upstream. Shown in mitmweb as marked.
    ``extra`` goes into the body's ``fleetgate`` member (e.g. an approval id)."""
    did = decision_id(flow)
    hdrs = {"Content-Type": "application/json", HEADER: did, **(headers or {})}
    flow.response = http.Response.make(
        status, denial_body(status, rule, reason, did, hint, lead=lead, **extra), hdrs)
    record_decision(flow, False, rule, reason, status)
    flow.marked = ":no_entry:"
    set_comment(flow, f"denied by {rule}: {reason}")


def cut_flow(flow: http.HTTPFlow, rule: str, reason: str, abort: bool = False) -> bool:
    """Stop a flow that is already in transit, stream included.

    ``flow.kill()`` alone cannot stop a response that is streaming (mitmproxy issue 4711),
    so we also close the client connection through the proxy server's connection handler.
    Returns whether anything was cut.
    """
    if not mark_cut(flow, rule, reason):
        return False
    return close_flow(flow, abort)


def mark_cut(flow: http.HTTPFlow, rule: str, reason: str) -> bool:
    """Record that ``rule`` cut the flow (decision, mitmweb mark); False if already cut."""
    if flow.metadata.get(CUT):
        return False
    flow.metadata[CUT] = {"rule": rule, "reason": reason}
    record_decision(flow, False, rule, reason, flow.response.status_code if flow.response else None)
    flow.marked = ":scissors:"
    set_comment(flow, f"cut by {rule}: {reason}")
    return True


def close_flow(flow: http.HTTPFlow, abort: bool = False) -> bool:
    """Kill the flow and close its connections (see :func:`cut_flow`). ``abort`` drops the
    sockets without a TLS goodbye or flushing what is buffered (a kill-switch stop: nothing
    more is owed to the agent, and a graceful close needs several turns of the event loop)."""
    cut = False
    if flow.killable:
        flow.kill()
        cut = True
    proxyserver: Any = ctx.master.addons.get("proxyserver") if ctx.master else None
    handler = getattr(proxyserver, "connections", {}).get(flow.client_conn.id)
    if handler is not None:
        for conn in (flow.client_conn, flow.server_conn):
            if conn in handler.transports:
                _close_now(handler, conn, abort)
                cut = True
    return cut


def _close_now(handler: Any, conn: Any, abort: bool = False) -> None:
    """Close the socket at once, then cancel its task. ``close_connection`` alone only
    cancels the connection's task: the socket closes after the flow's error hooks have run
    (usage estimates, settlements, logs), which for a hundred cut streams adds up to a
    noticeable delay before the agent sees its stream end. An abort also shuts the socket
    down here and now: asyncio's ``abort()`` closes it only at the loop's next turn, after
    whatever the caller still does in this one (a sweep's kill-log reports, a first
    tokenizer load for a cut stream's usage estimate)."""
    writer = getattr(handler.transports.get(conn), "writer", None)
    transport = getattr(writer, "transport", None)
    if abort and transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # already gone: abort() below still cleans up
                sock.shutdown(socket.SHUT_RDWR)
        transport.abort()
    elif writer is not None and not writer.is_closing():
        writer.close()
    handler.close_connection(conn)


def _fail(flow: Any, hook: str, exc: BaseException) -> None:
    if isinstance(flow, http.HTTPFlow):
        did = decision_id(flow)
        log.error("fleetgate: %s hook crashed on decision %s; flow denied", hook, did,
                  exc_info=exc)
        reason = f"internal error in {hook}; the request was denied, not passed through"
        if flow.response is None or hook in ("http_connect", "requestheaders", "request"):
            deny(flow, 500, "internal-error", reason,
                 hint=f"report decision id {did} to the gateway operator")
        else:
            cut_flow(flow, "internal-error", reason)
    else:
        server = getattr(flow, "server", None)
        if hasattr(flow, "ignore_connection"):  # tls_clienthello: keep intercepting
            flow.ignore_connection = False
        if server is not None:  # server_connect hook data
            server.error = f"fleetgate: internal error in {hook}; connection refused"
        elif hasattr(flow, "kill") and getattr(flow, "killable", False):
            flow.kill()
        log.error("fleetgate: %s hook crashed; connection refused", hook, exc_info=exc)


def fail_closed[F: Callable[..., Any]](fn: F) -> F:
    """Wrap a hook so that an exception denies the flow instead of passing it."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def awrapper(self: Any, flow: Any, *a: Any) -> Any:
            try:
                return await fn(self, flow, *a)
            except Exception as exc:
                _fail(flow, fn.__name__, exc)
                return None
        return awrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(self: Any, flow: Any, *a: Any) -> Any:
        try:
            return fn(self, flow, *a)
        except Exception as exc:
            _fail(flow, fn.__name__, exc)
            return None
    return wrapper  # type: ignore[return-value]


def settled(flow: http.HTTPFlow) -> bool:
    """The guard idiom: nothing more to decide for this flow."""
    return bool(flow.response or flow.error or not flow.live)


def allowed(flow: http.HTTPFlow) -> dict[str, Any] | None:
    """The rules' allow decision for a flow still to be forwarded; ``None`` when the rules
    denied it, nothing decided yet, or it is already answered: later checks (MCP, limits,
    budgets) only ever narrow an allow."""
    if settled(flow):
        return None
    decision = decision_of(flow)
    return decision if decision is not None and decision.get("allow") else None


def close_client(client: Any, abort: bool = False) -> bool:
    """Close one client connection (and with it every tunnel and stream on it)."""
    proxyserver: Any = ctx.master.addons.get("proxyserver") if ctx.master else None
    handler = getattr(proxyserver, "connections", {}).get(getattr(client, "id", None))
    if handler is None or client not in handler.transports:
        return False
    _close_now(handler, client, abort)
    return True


def metered_tokens(flow: http.HTTPFlow) -> int | None:
    """Input + output tokens the LLM meter recorded for the flow; ``None`` if it recorded no
    usage (limits and budgets then keep what they reserved, or release it)."""
    usage = llm_usage_of(flow)
    tokens = usage.get("tokens") if usage is not None else None
    if not isinstance(tokens, dict):
        return None
    return int(tokens.get("input") or 0) + int(tokens.get("output") or 0)
