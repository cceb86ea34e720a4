"""McpOperator: the MCP options and the operator commands, over the MCP service.

Options: ``fleetgate_mcp_pins`` (the pin file, read at start and written when a tool is pinned
or approved; with shared state, ``fleetgate_state``, pins live in Redis instead),
``fleetgate_mcp_trust_first_use``, ``fleetgate_mcp_max_body``; a bad value
stops the gateway at startup (``OptionsError``). Commands (mitmweb's command bar):
``fleetgate.mcp.pending``, ``fleetgate.mcp.approve``, ``fleetgate.mcp.pins``, the same as
``/mcp/pins`` and ``/mcp/approve`` on the admin port (registered by
:class:`fleetgate.runtime.mcp.McpService`) and the ``fleetgate mcp`` CLI.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mitmproxy import command, ctx, exceptions

from fleetgate.runtime.mcp import McpService
from fleetgate.stores.pins import FilePinStore

__all__ = ["McpOperator"]

log = logging.getLogger("fleetgate.mcp")


class McpOperator:
    def __init__(self, mcp: McpService) -> None:
        self.mcp = mcp

    def load(self, loader: Any) -> None:
        loader.add_option(
            "fleetgate_mcp_pins", str, "",
            "JSON file of approved MCP tool definitions (server -> tool -> sha256). Read at "
            "start, written when a tool is pinned or approved. '' keeps pins in memory only.")
        loader.add_option(
            "fleetgate_mcp_trust_first_use", bool, True,
            "Pin every tool of a server's first listing. Off: every tool of a server absent "
            "from the pin file waits for approval.")
        loader.add_option(
            "fleetgate_mcp_max_body", int, 16 * 1024 * 1024,
            "Largest MCP request body, JSON answer or single event fleetgate reads; larger ones "
            "are refused (requests) or cut (answers), never passed on unread.")

    def configure(self, updated: set[str]) -> None:
        if "fleetgate_mcp_max_body" in updated and ctx.options.fleetgate_mcp_max_body <= 0:
            raise exceptions.OptionsError("fleetgate_mcp_max_body must be > 0")
        if {"fleetgate_mcp_pins", "fleetgate_mcp_trust_first_use", "fleetgate_state"} & updated:
            path = ctx.options.fleetgate_mcp_pins
            shared = self.mcp.shared
            try:
                if shared is not None and shared.enabled:
                    if path:
                        log.warning("fleetgate: fleetgate_mcp_pins=%s is not read: with shared "
                                    "state (fleetgate_state) MCP pins live in Redis", path)
                    self.mcp.use_shared(ctx.options.fleetgate_mcp_trust_first_use)
                else:
                    self.mcp.use_pins(FilePinStore(Path(path)) if path else None,
                                      ctx.options.fleetgate_mcp_trust_first_use)
            except (OSError, ValueError) as exc:
                raise exceptions.OptionsError(f"fleetgate_mcp_pins: {exc}") from None

    @command.command("fleetgate.mcp.pending")
    def cmd_pending(self) -> Sequence[str]:
        """MCP tools waiting for approval: server, tool, new/changed, sha256."""
        return [f"{p.server} {p.tool} {p.state.value} {p.fingerprint[:12]}"
                for p in self.mcp.pending()]

    @command.command("fleetgate.mcp.approve")
    def cmd_approve(self, server: str, tool: str) -> str:
        """Approve the pending definition of one MCP tool (pins it, shows it again)."""
        if self.mcp.approve(server, tool):
            return f"approved {tool} of {server}"
        raise exceptions.CommandError(f"nothing pending for {tool!r} of {server!r}")

    @command.command("fleetgate.mcp.pins")
    def cmd_pins(self) -> Sequence[str]:
        """Pinned MCP tool definitions: server, tool, sha256."""
        return [f"{s} {t} {h[:12]}" for s, tools in sorted(self.mcp.pinned().items())
                for t, h in sorted(tools.items())]
