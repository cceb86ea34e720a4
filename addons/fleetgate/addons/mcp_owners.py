"""McpSharedState: MCP sessions and pins across gateways (``fleetgate_state`` a Redis URL).

With the embedded default this addon does nothing (every hook returns at once: no await on
the request path). With shared state:

- ``request`` (after :class:`~fleetgate.addons.mcp.McpGuard` judged the flow): a
  ``tools/list`` first reads the fleet's pins (so a rug pull first seen by this replica is
  compared with what another replica pinned); a request on
  an MCP session is checked against the session's owner in Redis, so an agent cannot ride
  another agent's session by sending its id through another replica. Another owner: 403 with
  a JSON-RPC error (rule ``mcp.session-owner``); Redis cannot say within
  ``fleetgate_state_wait_ms``: 503 ``mcp.state`` (fail closed). A ``DELETE`` by the owner
  releases it.
- ``responseheaders``: the session an ``initialize`` answer names is claimed in Redis for its
  agent (another owner there: the answer is cut).
- a task reads the shared pins every :data:`fleetgate.runtime.mcp.PIN_SYNC` seconds, so an
  approval made on any gateway applies on this one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

from mitmproxy import ctx, http

from fleetgate.addons.flowtools import allowed, cut_flow, fail_closed
from fleetgate.addons.state import (
    HEADER,
    agent_of,
    decision_id,
    mcp_of,
    record_decision,
    set_comment,
)
from fleetgate.mcp.messages import INVALID_REQUEST
from fleetgate.runtime.mcp import PIN_SYNC, McpService, OwnerUnknown
from fleetgate.wire import jsonrpc_error_body

__all__ = ["McpSharedState"]

STATE_UNAVAILABLE = -32603  # JSON-RPC internal error: the gateway cannot check right now


class McpSharedState:
    def __init__(self, mcp: McpService) -> None:
        self.mcp = mcp
        self._task: asyncio.Task[None] | None = None

    def running(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sync())

    async def _sync(self) -> None:
        while True:
            await asyncio.sleep(PIN_SYNC)
            with contextlib.suppress(Exception):  # sync_pins reports its own failures
                await self.mcp.sync_pins()

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    # -- session owners -----------------------------------------------------------------

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        if self.mcp.owners is None:
            return None  # embedded state: nothing to check across gateways
        meta = mcp_of(flow)
        if meta is None or allowed(flow) is None:
            return None
        sid = meta.get("session")
        lists = "tools/list" in (meta.get("methods") or {}).values()
        if not sid and not lists:
            return None
        return self._check(flow, meta, str(sid) if sid else None, lists)

    async def _check(self, flow: http.HTTPFlow, meta: dict[str, Any], sid: str | None,
                     lists: bool) -> None:
        server, agent = str(meta["server"]), agent_of(flow)
        wait = ctx.options.fleetgate_state_wait_ms / 1000
        try:
            problem = None if sid is None else await self.mcp.check_owner(server, sid, agent, wait)
            if lists and problem is None and not await self.mcp.sync_pins(wait):
                # the answer is vetted against the fleet's pins as they are now, or not at all
                raise OwnerUnknown("the fleet's MCP tool pins cannot be read from the shared "
                                   "state, so the tool list cannot be vetted")
        except OwnerUnknown as exc:
            self._refuse(flow, 503, STATE_UNAVAILABLE, str(exc), "mcp.state", meta,
                         {"Retry-After": "5"})
            return
        if problem:
            self._refuse(flow, 403, INVALID_REQUEST, problem, "mcp.session-owner", meta, {})
            return
        if sid is not None and flow.request.method == "DELETE":
            await self.mcp.forget_owner(server, sid, agent)

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        if self.mcp.owners is None or flow.response is None or flow.error:
            return None
        meta = mcp_of(flow)
        if meta is None or meta.get("session") or not (meta.get("calls") or meta.get("transport")):
            return None
        sid = flow.response.headers.get("mcp-session-id")
        if not sid:
            return None
        return self._claim(flow, str(meta["server"]), sid)

    async def _claim(self, flow: http.HTTPFlow, server: str, sid: str) -> None:
        wait = ctx.options.fleetgate_state_wait_ms / 1000
        try:
            problem = await self.mcp.check_owner(server, sid, agent_of(flow), wait)
        except OwnerUnknown as exc:
            cut_flow(flow, "mcp.state", str(exc))
            return
        if problem:
            cut_flow(flow, "mcp.session-owner", problem)

    @staticmethod
    def _refuse(flow: http.HTTPFlow, status: int, code: int, message: str, rule: str,
                meta: dict[str, Any], headers: dict[str, str]) -> None:
        did = decision_id(flow)
        text = f"fleetgate refused this MCP request: {message}"
        if rule == "mcp.state":
            text += "; retry later (the gateway operator sees this in /healthz/ready)"
        flow.response = http.Response.make(
            status, jsonrpc_error_body(None, code, text, rule=rule, decision_id=did),
            {"Content-Type": "application/json", HEADER: did, **headers})
        record_decision(flow, False, rule, message, status)
        meta.setdefault("calls", []).append({"method": "", "target": "", "allow": False,
                                             "rule": rule, "reason": message})
        flow.marked = ":no_entry:"
        set_comment(flow, f"MCP refused by {rule}: {message}")
