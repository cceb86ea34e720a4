"""Addon-level tests with mitmproxy's own test helpers: the chain, fail-closed, guards."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chain import basic, request_flow, run_hook, run_request, running_chain, tok
from mitmproxy import exceptions
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons, tflow

from fleetgate.addons import authorization as authorization_module
from fleetgate.addons.authorization import HttpAuthorization
from fleetgate.addons.guard import ConnectionGuard
from fleetgate.addons.identity import AgentIdentity
from fleetgate.addons.pipeline import pipeline
from fleetgate.addons.state import DECISION, HEADER, IDENTITY

RULES = """apiVersion: fleetgate/v1
authorization:
  rules:
  - deny: 'request.path.contains("delete")'
agents:
- name: tester
  match: 'jwt.agent_role == "tester"'
  egress:
    hosts: [api.example.com]
  authorization:
    rules:
    - id: tester.get
      allow: 'request.method == "GET"'
"""


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[tuple[Any, list[Any]]]:
    with running_chain(tmp_path, RULES) as running:
        yield running


def test_chain_allows_and_strips_proxy_credentials(chain: tuple[Any, list[Any]]) -> None:
    _, addons = chain
    f = request_flow(auth=basic(tok()))
    run_request(addons, f)
    assert f.response is None
    assert "Proxy-Authorization" not in f.request.headers
    assert f.metadata[DECISION]["allow"] is True
    assert f.metadata[DECISION]["rule"] == "tester.get"
    assert f.metadata[IDENTITY]["agent"] == "agent-7"
    json.dumps(f.metadata)  # mitmweb can show every value


def test_chain_denial_is_marked_and_commented_for_mitmweb(chain: tuple[Any, list[Any]]) -> None:
    _, addons = chain
    f = request_flow(path="/x/delete", auth=basic(tok()))
    run_request(addons, f)
    assert f.response is not None and f.response.status_code == 403
    assert f.marked
    assert f.comment.startswith("agent-7 / tester / - \u00b7 denied by rules.authorization[0]")
    assert f.response.headers[HEADER] == f.metadata["fleetgate.decision_id"]
    body = json.loads(f.response.content)
    assert body["fleetgate"]["rule"] == "rules.authorization[0]"


def test_connect_identity_is_bound_to_the_client_connection(
        chain: tuple[Any, list[Any]]) -> None:
    _, addons = chain
    connect = request_flow(method="CONNECT", path="", auth=basic(tok(sub="tunnel-agent")))
    run_hook(addons, "http_connect", connect)
    assert connect.response is None
    inner = request_flow()  # no credentials inside the tunnel
    inner.client_conn = connect.client_conn
    run_request(addons, inner)
    assert inner.response is None
    assert inner.metadata[IDENTITY]["agent"] == "tunnel-agent"
    other = request_flow()  # another connection, no credentials
    run_request(addons, other)
    assert other.response is not None and other.response.status_code == 407


def test_a_crashing_hook_denies_instead_of_passing(chain: tuple[Any, list[Any]],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _, addons = chain

    def boom(*_: Any) -> Any:
        raise RuntimeError("policy engine exploded")

    monkeypatch.setattr(authorization_module, "decide", boom)
    f = request_flow(auth=basic(tok()))
    run_request(addons, f)
    assert f.response is not None and f.response.status_code == 500
    body = json.loads(f.response.content)
    assert body["fleetgate"]["rule"] == "internal-error"
    assert body["fleetgate"]["decision_id"] == f.metadata["fleetgate.decision_id"]
    assert "exploded" not in f.response.text  # no internals leak to the agent
    assert f.marked


@pytest.mark.parametrize(("module", "name"), [
    ("fleetgate.addons.ambiguity", "ambiguity"),         # AmbiguityGuard.requestheaders
    ("fleetgate.addons.request_bodies", "plan_body"),    # RequestBodies.requestheaders
    ("fleetgate.addons.header_bounds", "header_excess"), # HeaderBounds.requestheaders
])
def test_the_request_guards_deny_when_they_crash(chain: tuple[Any, list[Any]],
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 module: str, name: str) -> None:
    _, addons = chain

    def boom(*_: Any, **__: Any) -> Any:
        raise RuntimeError("guard exploded")

    monkeypatch.setattr(f"{module}.{name}", boom)
    f = request_flow(auth=basic(tok()))
    run_request(addons, f)
    assert f.response is not None and f.response.status_code == 500
    assert json.loads(f.response.content)["fleetgate"]["rule"] == "internal-error"


def test_timeouts_deny_when_they_cannot_arm(chain: tuple[Any, list[Any]],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A request the upstream timeout cannot be armed for is not sent without it."""
    from fleetgate.addons.timeouts import Timeouts

    _, addons = chain
    timeouts = next(a for a in addons if isinstance(a, Timeouts))

    def boom(*_: Any, **__: Any) -> None:
        raise RuntimeError("no clock")

    monkeypatch.setattr(timeouts.deadlines, "arm", boom)
    f = request_flow(auth=basic(tok()))
    run_request(addons, f)
    assert f.response is not None and f.response.status_code == 500


def test_server_connect_refuses_unapproved_and_internal_destinations(
        chain: tuple[Any, list[Any]]) -> None:
    _, addons = chain
    authz = next(a for a in addons if isinstance(a, HttpAuthorization))
    f = request_flow(auth=basic(tok()))
    run_request(addons, f)
    assert f.response is None
    # a destination no request was allowed to reach on this connection
    server = tflow.tserver_conn()
    server.address = ("api.other.com", 443)
    data = server_hooks.ServerConnectionHookData(client=f.client_conn, server=server)
    asyncio.run(authz.server_connect(data))
    assert data.server.error and "no request to it was allowed" in data.server.error
    # an approved name that resolves to an internal address
    authz.approved[f.client_conn].add(("127.0.0.1", 443))
    server2 = tflow.tserver_conn()
    server2.address = ("127.0.0.1", 443)
    data2 = server_hooks.ServerConnectionHookData(client=f.client_conn, server=server2)
    asyncio.run(authz.server_connect(data2))
    assert data2.server.error and "loopback" in data2.server.error


def test_guard_refuses_bypass_options() -> None:
    guard = ConnectionGuard(pipeline()[0].metrics)
    with taddons.context(guard, Proxyserver()) as tctx:
        with pytest.raises(exceptions.OptionsError, match="ignore_hosts"):
            tctx.configure(guard, ignore_hosts=["example.com"])
        with pytest.raises(exceptions.OptionsError, match="regular"):
            tctx.configure(guard, mode=["transparent"])
        tctx.configure(guard, connection_strategy="eager")
        assert tctx.options.connection_strategy == "lazy"


def test_guard_kills_raw_tcp_flows() -> None:
    guard = ConnectionGuard(pipeline()[0].metrics)
    with taddons.context(guard):
        f = tflow.ttcpflow()
        f.live = True
        guard.tcp_start(f)
        assert f.error is not None and f.marked


def test_identity_without_any_key_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEETGATE_JWT_SECRET", raising=False)
    ident = AgentIdentity(pipeline()[0].metrics)
    with taddons.context(ident) as tctx, pytest.raises(exceptions.OptionsError,
                                                       match="verification key"):
        tctx.configure(ident, fleetgate_jwt_leeway=10)
