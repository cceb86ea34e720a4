"""How strictly an MCP server's tools are vetted (``mcp.servers[].poisoning`` / ``pins``)."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["McpMode"]


class McpMode(StrEnum):
    """What a tool-poisoning finding or an unapproved tool definition does."""

    ENFORCE = "enforce"  # hide the tool (and refuse calls to it)
    REPORT = "report"    # show it, log and count the finding
    OFF = "off"
