"""The facts the MCP addons read off a flow, in one place (not an addon).

Which MCP server a flow goes to (asked of :class:`fleetgate.runtime.mcp.McpService` with the
request's facts), and the :class:`fleetgate.mcp.engine.McpScope` the pure engine judges and
rewrites under: who asks, where, which rules, which vetting. Shared by the request and answer
addons and by RequestBodies (whose limit for a body depends on whether it is MCP).
"""

from __future__ import annotations

from typing import Any

from mitmproxy import http

from fleetgate.addons.state import claims_of, decision_id, decision_of, llm_request_of
from fleetgate.mcp.engine import McpScope
from fleetgate.normalize import normalize_host, normalize_path, request_facts
from fleetgate.policy.model import McpServer, Policy
from fleetgate.runtime.mcp import McpService

__all__ = ["content_type", "has_body", "mcp_scope", "mcp_server"]


def mcp_server(mcp: McpService, policy: Policy, flow: http.HTTPFlow) -> McpServer | None:
    """The MCP server ``flow`` goes to; ``None``: not MCP traffic."""
    req = flow.request
    return mcp.server_for(policy, req.method, normalize_host(req.host), req.port,
                          normalize_path(req.path), req.path, req.headers,
                          llm=bool(llm_request_of(flow)))


def mcp_scope(mcp: McpService, policy: Policy, flow: http.HTTPFlow, server: McpServer,
              sid: str | None) -> McpScope:
    req = flow.request
    decision = decision_of(flow) or {}
    facts = request_facts(req.method, req.scheme, req.host, req.port, req.path,
                          list(req.headers.items(multi=True)))
    return McpScope(
        claims=claims_of(flow), request=facts.to_cel(policy.cel_inputs),
        server=server.name, host=normalize_host(req.host),
        path=normalize_path(req.path.partition("?")[0]), session_id=sid,
        rules=mcp.rules(policy, server, decision.get("profiles") or ()),
        reveal_denied=policy.mcp.reveal_denied, decision_id=decision_id(flow),
        poisoning=server.poisoning, pins=server.pins, vetting=mcp.vetting,
        verdicts=mcp.list_verdicts)


def has_body(req: http.Request) -> bool:
    if req.raw_content is None:  # streamed: not read, so not empty as far as we know
        return True
    return bool(req.raw_content) or bool(req.headers.get("transfer-encoding"))


def content_type(headers: Any) -> str:
    return str(headers.get("content-type", "")).split(";", 1)[0].strip().lower()
