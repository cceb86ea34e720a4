"""Helpers shared by the e2e test modules (no test module imports another one).

The MCP rules and tool sets of the SDK tests (``test_mcp_sdk.py``, ``test_mcp_sdk1.py``) and
the minimal JSON-RPC upstream with its request helpers of the raw tests (``test_mcp_raw.py``,
``test_limits.py``).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Protocol

import httpx

from harness import Seen, Upstream, token, upstream_name, write_rules

SECURITY = {"nmap_scan", "trivy_image", "falco_events"}
CLOUD = {"terraform_plan", "terraform_apply", "kubectl", "helm_list", "istioctl_analyze"}
GENERAL = {"ssh_exec", "docker_ps"}


SEED_RULES = """\
# seed 000, verbatim
- >-
  jwt.agent_role == "security" && (
    mcp.tool.name.startsWith("nmap") ||
    mcp.tool.name.startsWith("trivy") ||
    mcp.tool.name.startsWith("falco")
  )
- >-
  jwt.agent_role == "cloud" && (
    mcp.tool.name.startsWith("terraform") ||
    mcp.tool.name.startsWith("kubectl") ||
    mcp.tool.name.startsWith("istioctl") ||
    mcp.tool.name.startsWith("helm")
  )
- id: tools.not-agent-infra
  deny: >-
    mcp.tool.arguments.exists(k, type(mcp.tool.arguments[k]) == string &&
      mcp.tool.arguments[k].contains("agent-infra"))
  reason: agent-infra hosts the gateway
- 'jwt.agent_role == "tester" && mcp.tool.name == "add_numbers"'
"""


class Named(Protocol):
    """A server agents reach by name: ``McpUpstream``, or the 1.x SDK server of test_mcp_sdk1."""

    name: str
    port: int


def fleet_rules(path: Path, servers: Sequence[Named], poisoning: str = "enforce",
                pins: str = "enforce", declared: bool = True) -> Path:
    """The seed's rules for one MCP server ``tools`` hosting every tool (here: served by every
    one of ``servers``, by name), three specialist profiles.
    ``declared=False``: the seed's own form, a top-level ``mcpAuthorization`` and no server."""
    host = ", ".join(f'"{s.name}:{s.port}"' for s in servers)
    if declared:
        top = f"""
mcp:
  servers:
  - name: tools
    hosts: [{host}]
    poisoning: {poisoning}
    pins: {pins}
    mcpAuthorization:
      rules:
{textwrap.indent(SEED_RULES, " " * 6)}"""
    else:
        top = f"\nmcpAuthorization:\n  rules:\n{textwrap.indent(SEED_RULES, '  ')}"
    profiles = "".join(f"""
- name: {role}
  match: 'jwt.agent_role == "{role}"'
  egress: {{hosts: [{host}]}}
  authorization: {{rules: [{{allow: 'true'}}]}}
""" for role in ("security", "cloud"))
    profiles += f"""
- name: general
  match: 'jwt.agent_role == "general"'
  egress: {{hosts: [{host}]}}
  authorization: {{rules: [{{allow: 'true'}}]}}
  allowed_tools: ["ssh_*", "docker_*"]
  denied_tools: ["ssh_exec_root"]
"""
    return write_rules(path, [s.port for s in servers], extra=profiles, top=top)


TOOLS = [{"name": n, "description": f"{n} does its job", "inputSchema": {"type": "object"}}
         for n in ("nmap_scan", "trivy_image", "terraform_apply", "kubectl")]

MCP_RULES = """
mcp:
  servers:
  - name: tools
    hosts: ["{name}:{port}"]
    mcpAuthorization:
      rules:
      - >-
        jwt.agent_role == "tester" && (mcp.tool.name.startsWith("nmap") ||
        mcp.tool.name.startsWith("trivy") || mcp.tool.name.startsWith("kubectl"))
      - id: tools.not-agent-infra
        deny: 'mcp.tool.name == "kubectl" && mcp.tool.arguments.namespace == "agent-infra"'
        reason: agent-infra hosts the gateway
"""


def rpc_answer(msg: dict[str, Any]) -> dict[str, Any] | None:
    if "id" not in msg:
        return None
    method = msg.get("method")
    if method == "tools/list":
        result: dict[str, Any] = {"tools": TOOLS, "nextCursor": "page-2"}
    elif method == "tools/call":
        result = {"content": [{"type": "text", "text": f"ran {msg['params']['name']}"}]}
    else:
        result = {}
    return {"jsonrpc": "2.0", "id": msg["id"], "result": result}


def mcp_route(mode: str, session: str = "sess-1"):  # type: ignore[no-untyped-def]
    """JSON-RPC answers as application/json with a length, chunked JSON, or an SSE stream;
    every answer names ``session`` in ``Mcp-Session-Id``."""

    def handler(h: BaseHTTPRequestHandler, seen: Seen) -> None:
        body = json.loads(seen.body)
        answers = ([a for a in map(rpc_answer, body) if a] if isinstance(body, list)
                   else rpc_answer(body))
        if answers is None or answers == []:
            h.send_response(202)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        h.send_response(200)
        h.send_header("Mcp-Session-Id", session)
        if mode == "sse":
            items = answers if isinstance(answers, list) else [answers]
            payload = b"".join(f"event: message\ndata: {json.dumps(a)}\n\n".encode() for a in items)
            h.send_header("Content-Type", "text/event-stream")
        else:
            payload = json.dumps(answers).encode()
            h.send_header("Content-Type", "application/json")
        if mode == "json":
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
        else:
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            for i in range(0, len(payload), 50):  # small chunks: events straddle them
                part = payload[i:i + 50]
                h.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                h.wfile.flush()
            h.wfile.write(b"0\r\n\r\n")

    return handler


def post(gw: Any, upstream: Upstream, body: Any, path: str = "/mcp", sub: str = "agent-1",
         headers: dict[str, str] | None = None, raw: bytes | None = None) -> httpx.Response:
    with gw.client(token(sub=sub, role="tester")) as c:
        return c.post(upstream.url + path, content=raw if raw is not None else json.dumps(body),
                      headers={"Content-Type": "application/json",
                               "Accept": "application/json, text/event-stream", **(headers or {})})


def call(rid: Any, tool: str, **args: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call",
            "params": {"name": tool, "arguments": args}}


def calls_seen(upstream: Upstream) -> list[Any]:
    out = []
    for s in upstream.seen:
        if s.method == "POST" and s.body:
            body = json.loads(s.body)
            out.extend(body if isinstance(body, list) else [body])
    return [(m.get("method"), (m.get("params") or {}).get("name")) for m in out]


def family_policy(port: int, profile_extra: str = "") -> str:
    """A coordinator that may delegate to a security agent, the upstream reached by name as
    the OpenAI provider and the MCP server ``tools`` (``/mcp``), a global ``no-deletes`` deny
    rule (the trace tests: ``test_tracing.py``, ``test_trace_cli.py``). ``profile_extra``:
    more keys of the ``fleet`` profile, indented by two spaces."""
    here = f'"{upstream_name(port)}:{port}", "127.0.0.1:{port}"'
    return f"""apiVersion: fleetgate/v1
destinations:
  allowPrivate: ["127.0.0.1/32"]
authorization:
  rules:
  - id: no-deletes
    deny: 'request.path.contains("delete")'
    reason: deletes need a human
llm:
  providers:
  - name: openai
    api: openai
    hosts: ["api.openai.com:443", {here}]
mcp:
  servers:
  - name: tools
    hosts: [{here}]
    path: /mcp
    mcpAuthorization:
      rules:
      - 'true'
delegation:
  roles:
    coordinator: [security]
  maxDepth: 2
  maxChildren: 5
  maxTtl: 30m
agents:
- name: fleet
  match: 'jwt.agent_role in ["coordinator", "security"]'
  egress:
    hosts: ["api.openai.com:443", {here}]
  authorization:
    rules:
    - allow: 'true'
{profile_extra}"""


def rpc(client: httpx.Client, up: Upstream, rid: int, method: str,
        params: dict[str, Any] | None = None, session: str | None = None) -> httpx.Response:
    """One JSON-RPC request to ``up``'s ``/mcp``, in the MCP session ``session`` if given."""
    headers = {"Accept": "application/json, text/event-stream"}
    if session:
        headers["Mcp-Session-Id"] = session
    return client.post(up.url + "/mcp", headers=headers,
                       json={"jsonrpc": "2.0", "id": rid, "method": method,
                             "params": params or {}})
