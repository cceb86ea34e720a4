"""MCP SDK 1.x beside 2.x, through a real gateway: agents in the field run both.

(a) a 1.x client (``.venv-mcp1``, ``mcp1/client.py``) against the 2.x mock server and (b) the
2.x client (``mcp_client``) against a 1.x server (``mcp1/server.py``), on every transport:
``tools/list`` is filtered per agent (a denied tool hidden), an allowed call is answered and a
denied call is refused with the JSON-RPC error the SDK surfaces (``McpError`` in 1.x,
``MCPError`` in 2.x), never reaching the server.  Rules and roles are test_mcp_sdk's; the
servers are reached by name.  ``.venv-mcp1`` holds mcp 1.30 alone (the two SDKs cannot share
an environment); CI creates it, and without it these tests fail rather than skip.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from helpers import SECURITY, fleet_rules
from mcp.shared.exceptions import MCPError
from mcp_client import call_tool, probe, result_text
from mcp_upstream import ALL_TOOLS, POISONED_TOOLS, TRANSPORTS, GatewayPool, McpUpstream, Transport

from harness import REPO, Gateway, register_name, token, unregister_names

MCP1_PYTHON = REPO / ".venv-mcp1" / "bin" / "python"
MCP1_SCRIPTS = Path(__file__).with_name("mcp1")
ALLOWED = ("nmap_scan", {"target": "10.0.0.1"})
DENIED = ("terraform_apply", {"dir": "/prod"})


@pytest.fixture(scope="module")
def mcp1_python() -> Path:
    if not MCP1_PYTHON.exists():
        pytest.fail(f"{MCP1_PYTHON} is missing: the MCP SDK 1.x environment is needed; create it with "
                    "./scripts/bootstrap.sh --env .venv-mcp1 mcp1")
    return MCP1_PYTHON


@dataclass
class Mcp1Server:
    """``mcp1/server.py`` running in ``.venv-mcp1``, reached by ``name`` on ``port``."""

    transport: Transport
    name: str
    proc: subprocess.Popen[str]
    port: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    pumping: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"https://{self.name}:{self.port}/{'sse' if self.transport == 'sse' else 'mcp'}"

    def call_names(self) -> list[str]:
        return [e["name"] for e in list(self.events) if e.get("event") == "call"]

    def pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def stop(self) -> None:
        unregister_names(self.port)
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.pumping is not None:
            self.pumping.join(5)  # stdout is at its end once the process has gone
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_mcp1_server(python: Path, ca: trustme.CA, transport: Transport, workdir: Path) -> Mcp1Server:
    name = f"mcp1-{transport}.fleetgate.test"
    pem = workdir / f"{transport}.pem"
    ca.issue_cert(name, "127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    tools = [t.to_tool().model_dump(by_alias=True, exclude_none=True) for t in ALL_TOOLS + POISONED_TOOLS]
    proc = subprocess.Popen(
        [str(python), str(MCP1_SCRIPTS / "server.py"), "--transport", transport, "--certfile", str(pem),
         "--tools", json.dumps(tools)], stdout=subprocess.PIPE, text=True)
    server = Mcp1Server(transport, name, proc)
    server.pumping = threading.Thread(target=server.pump, daemon=True)
    server.pumping.start()
    deadline = time.monotonic() + 20
    while not (up := [e for e in list(server.events) if e.get("event") == "listening"]):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"the 1.x MCP server ({transport}) did not start")
        time.sleep(0.02)
    server.port = up[0]["port"]
    register_name(name, server.port, server.port)
    return server


@pytest.fixture(scope="module")
def servers(mcp1_python: Path, upstream_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, McpUpstream | Mcp1Server]]:
    """Per transport: the 2.x mock (``<transport>``) and the 1.x server (``<transport>/mcp1``)."""
    workdir = tmp_path_factory.mktemp("mcp1-certs")
    ups: dict[str, McpUpstream | Mcp1Server] = {}
    try:
        for t in TRANSPORTS:
            ups[t] = McpUpstream(upstream_ca, t)
            ups[f"{t}/mcp1"] = start_mcp1_server(mcp1_python, upstream_ca, t, workdir)
        yield ups
    finally:
        for up in ups.values():
            up.stop()


@pytest.fixture(scope="module")
def gw(servers: dict[str, McpUpstream | Mcp1Server], tmp_path_factory: pytest.TempPathFactory,
       confdir: Path, upstream_ca_file: Path) -> Iterator[Gateway]:
    pool = GatewayPool(tmp_path_factory.mktemp("mcp-sdk1-gateway"), confdir, upstream_ca_file)
    yield pool.get("mcp", lambda path: fleet_rules(path, list(servers.values())))
    pool.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sdk1_client_through_the_gateway_to_the_sdk2_server(
        mcp1_python: Path, gw: Gateway, servers: dict[str, McpUpstream | Mcp1Server],
        transport: Transport) -> None:
    server = servers[transport]
    assert isinstance(server, McpUpstream)
    server.reset()
    proc = subprocess.run(
        [str(mcp1_python), str(MCP1_SCRIPTS / "client.py"), "--url", server.url, "--transport", transport,
         "--proxy", gw.proxy_url(token(sub="security-1", role="security")), "--cafile", str(gw.ca_cert),
         "--call", json.dumps(ALLOWED), "--call", json.dumps(DENIED)],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["serverInfo"]["name"] == "fleetgate-test-mcp"
    assert set(seen["tools"]) == SECURITY  # terraform_apply (and the rest) hidden
    allowed, denied = seen["calls"]
    assert allowed == {"name": "nmap_scan", "text": 'nmap_scan ran with {"target": "10.0.0.1"}',
                       "isError": False}
    assert denied == {"name": "terraform_apply",
                      "error": {"code": -32602, "message": "Unknown tool: terraform_apply"}}
    assert server.call_names() == ["nmap_scan"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sdk2_client_through_the_gateway_to_the_sdk1_server(
        gw: Gateway, servers: dict[str, McpUpstream | Mcp1Server], transport: Transport) -> None:
    server = servers[f"{transport}/mcp1"]
    assert isinstance(server, Mcp1Server)
    before = len(server.call_names())
    sec = {"proxy": gw.proxy_url(token(sub="security-1", role="security")), "ca": gw.ca_cert}
    seen = probe(server.url, transport, [ALLOWED], prompts=False, resources=False, **sec)
    assert seen.init is not None and seen.init.server_info.name == "fleetgate-test-mcp1"
    assert {t.name for t in seen.tools} == SECURITY  # terraform_apply (and the rest) hidden
    assert result_text(seen.results[0]) == 'nmap_scan ran with {"target": "10.0.0.1"}'
    assert not seen.results[0].is_error
    with pytest.raises(MCPError, match="Unknown tool: terraform_apply") as refused:
        call_tool(server.url, transport, *DENIED, **sec)
    assert refused.value.code == -32602
    time.sleep(0.2)  # a call that reached the server would be on its stdout by now
    assert server.call_names()[before:] == ["nmap_scan"]
