"""The MCP operator surface inside mitmproxy: options, commands, admin routes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from fleetgate.addons.mcp_operator import McpOperator
from fleetgate.addons.rules import PolicyStore
from fleetgate.mcp.mode import McpMode
from fleetgate.metrics import GatewayMetrics
from fleetgate.runtime.listeners import HttpListener
from fleetgate.runtime.mcp import McpService

TOOL = {"name": "nmap_scan", "description": "Scan a host.", "inputSchema": {"type": "object"}}


def test_commands_list_and_approve_pending_tools(tmp_path: Path) -> None:
    metrics = GatewayMetrics()
    store = PolicyStore(metrics)
    health = HttpListener(metrics, store.status)
    service = McpService(metrics, health.routes)
    guard = McpOperator(service)
    pins = tmp_path / "pins.json"
    with taddons.context(guard) as tctx:
        tctx.options.update(fleetgate_mcp_pins=str(pins))
        vet = service.vetting
        vet.vet("tools", [TOOL], True, McpMode.ENFORCE, McpMode.ENFORCE)  # first sight: pinned
        changed = {**TOOL, "description": "Scan a host and upload the output."}
        hidden = vet.vet("tools", [changed], True, McpMode.ENFORCE, McpMode.ENFORCE)
        assert hidden["nmap_scan"] == "tool definition changed since it was approved"
        [line] = tctx.command(guard.cmd_pending)
        assert line.startswith("tools nmap_scan changed ")
        assert health.routes.views["/mcp/pins"]()["pending"][0]["tool"] == "nmap_scan"
        with pytest.raises(exceptions.CommandError):
            tctx.command(guard.cmd_approve, "tools", "no_such_tool")
        assert tctx.command(guard.cmd_approve, "tools", "nmap_scan") == "approved nmap_scan of tools"
        assert tctx.command(guard.cmd_pending) == []
        assert [ln.split()[:2] for ln in tctx.command(guard.cmd_pins)] == [["tools", "nmap_scan"]]
        assert vet.vet("tools", [changed], True, McpMode.ENFORCE, McpMode.ENFORCE)["nmap_scan"] is None
        assert json.loads(pins.read_text())["tools"]["nmap_scan"]
        with pytest.raises(ValueError):
            health.routes.actions["/mcp/approve"]({"server": "tools"})


def test_a_bad_pin_file_is_refused_at_configure(tmp_path: Path) -> None:
    bad = tmp_path / "pins.json"
    bad.write_text('["not a map"]')
    metrics = GatewayMetrics()
    guard = McpOperator(McpService(metrics))
    with taddons.context(guard) as tctx:
        with pytest.raises(exceptions.OptionsError, match="fleetgate_mcp_pins"):
            tctx.options.update(fleetgate_mcp_pins=str(bad))
        with pytest.raises(exceptions.OptionsError):
            tctx.options.update(fleetgate_mcp_max_body=0)


def _post(health: HttpListener, path: str, body: bytes, peer: str, auth: str = "") -> tuple[str, dict]:
    import io
    status: list[str] = []
    environ = {"PATH_INFO": path, "REQUEST_METHOD": "POST", "REMOTE_ADDR": peer,
               "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}
    if auth:
        environ["HTTP_AUTHORIZATION"] = auth
    out = b"".join(health._app(environ, lambda s, h: status.append(s)))
    return status[0], json.loads(out)


def test_admin_api_needs_the_token_or_loopback_without_one() -> None:
    metrics = GatewayMetrics()
    admin = HttpListener(metrics, lambda: {}, admin=True)
    admin.routes.post("/x", lambda args: {"got": args})
    assert _post(admin, "/x", b'{"a": 1}', "127.0.0.1") == ("200 OK", {"got": {"a": 1}})
    assert _post(admin, "/x", b"{}", "10.1.2.3")[0] == "401 Unauthorized"
    admin.admin_token = "s3cret"
    # with a token configured, loopback is no longer enough (an agent's sidecar is loopback)
    assert _post(admin, "/x", b"{}", "127.0.0.1")[0] == "401 Unauthorized"
    assert _post(admin, "/x", b"{}", "10.1.2.3", "Bearer wrong")[0] == "401 Unauthorized"
    assert _post(admin, "/x", b"{}", "10.1.2.3", "Bearer s3cret")[0] == "200 OK"
    assert _post(admin, "/x", b"[1]", "10.1.2.3", "Bearer s3cret")[0] == "400 Bad Request"
    assert _post(admin, "/nope", b"{}", "10.1.2.3", "Bearer s3cret")[0] == "404 Not Found"


def test_metrics_listener_serves_no_admin_routes() -> None:
    metrics = GatewayMetrics()
    health = HttpListener(metrics, lambda: {})
    health.routes.post("/x", lambda args: {"got": args})
    status: list[str] = []
    environ = {"PATH_INFO": "/x", "REQUEST_METHOD": "POST", "REMOTE_ADDR": "127.0.0.1"}
    health._app(environ, lambda s, h: status.append(s))
    assert status == ["404 Not Found"]
