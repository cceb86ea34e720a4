"""What an MCP message asks for, as the ``mcp`` variable rules see.

Every field is always present (empty when the method has no such target), so a rule about
tools never errors on ``initialize``; ``mcp.tool.arguments`` is the call's own argument map.
"""

from __future__ import annotations

from typing import Any

from fleetgate.mcp.messages import Message

__all__ = ["CALL_METHODS", "LIST_METHODS", "mcp_facts", "target_kind"]

# list method -> (result key, item kind)
LIST_METHODS = {
    "tools/list": ("tools", "tool"),
    "prompts/list": ("prompts", "prompt"),
    "resources/list": ("resources", "resource"),
    "resources/templates/list": ("resourceTemplates", "resource"),
}
# methods that act on one tool / prompt / resource: judged at call time
CALL_METHODS = {
    "tools/call": "tool",
    "prompts/get": "prompt",
    "resources/read": "resource",
    "resources/subscribe": "resource",
    "resources/unsubscribe": "resource",
    "completion/complete": "completion",
}


def target_kind(method: str | None) -> str | None:
    """``tool`` / ``prompt`` / ``resource`` for a call that rules must allow, else ``None``."""
    return CALL_METHODS.get(method or "")


def base_facts(method: str, server_host: str, server_path: str,
               session_id: str | None, server_name: str = "", listing: bool = False) -> dict[str, Any]:
    return {
        "method": method,
        "tool": {"name": "", "arguments": {}},
        "prompt": {"name": "", "arguments": {}},
        "resource": {"uri": ""},
        "server": {"host": server_host, "path": server_path, "name": server_name or server_host},
        "session_id": session_id or "",
        "listing": listing,
    }


def mcp_facts(msg: Message, server_host: str, server_path: str,
              session_id: str | None, server_name: str = "") -> dict[str, Any]:
    """Facts for one request message."""
    facts = base_facts(msg.method or "", server_host, server_path, session_id, server_name)
    p = msg.params
    kind = target_kind(msg.method)
    if kind == "tool":
        args = p.get("arguments")
        facts["tool"] = {"name": str(p.get("name") or ""),
                         "arguments": args if isinstance(args, dict) else {}}
    elif kind == "prompt":
        args = p.get("arguments")
        facts["prompt"] = {"name": str(p.get("name") or ""),
                           "arguments": args if isinstance(args, dict) else {}}
    elif kind == "resource":
        facts["resource"] = {"uri": str(p.get("uri") or "")}
    elif kind == "completion":
        raw_ref = p.get("ref")
        ref: dict[str, Any] = raw_ref if isinstance(raw_ref, dict) else {}
        if ref.get("type") == "ref/prompt":
            facts["prompt"] = {"name": str(ref.get("name") or ""), "arguments": {}}
        elif ref.get("type") == "ref/resource":
            facts["resource"] = {"uri": str(ref.get("uri") or "")}
    return facts


def item_facts(method: str, kind: str, item: dict[str, Any], server_host: str,
               server_path: str, session_id: str | None, server_name: str = "") -> dict[str, Any]:
    """Facts for one entry of a list result: would this agent be allowed to use it?"""
    facts = base_facts(method, server_host, server_path, session_id, server_name)
    facts["listing"] = True
    if kind == "tool":
        facts["tool"] = {"name": str(item.get("name") or ""), "arguments": {}}
    elif kind == "prompt":
        facts["prompt"] = {"name": str(item.get("name") or ""), "arguments": {}}
    else:
        facts["resource"] = {"uri": str(item.get("uri") or item.get("uriTemplate") or "")}
    return facts
