"""Upstream credentials, the control endpoint and the health listener, through the whole chain.

Covered end to end in tests/e2e (test_credentials.py, test_killswitch.py, test_gateway.py);
here pinned at the addon level, through ``pipeline()``, mitmproxy's hooks and commands only.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from chain import (
    SECRET,
    basic,
    free_port,
    request_flow,
    respond,
    run_request,
    running_chain,
    started,
)
from mitmproxy.proxy import server_hooks
from mitmproxy.test import tflow

from fleetgate.addons.state import decision_of
from fleetgate.identity.mint import mint_token

UPSTREAM_KEY = "sk-upstream-0123456789"

RULES = """apiVersion: fleetgate/v1
credentials:
- id: example-key
  hosts: [api.example.com]
  pathPrefix: /v1/
  secretFile: {key_file}
  remove: [x-api-key]
- id: lost-key
  hosts: [api.example.com]
  pathPrefix: /lost/
  secretFile: {missing}
delegation:
  roles:
    coordinator: [security]
  maxDepth: 2
  maxChildren: 5
  maxTtl: 30m
authorization:
  rules:
  - deny: 'request.path.contains("delete")'
agents:
- name: fleet
  match: 'jwt.agent_role in ["coordinator", "security", "general"]'
  egress:
    hosts: [api.example.com]
  authorization:
    rules:
    - allow: 'true'
"""

CONTROL = "fleetgate.internal"


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[tuple[Any, list[Any]]]:
    key_file = tmp_path / "upstream-key"
    key_file.write_text(UPSTREAM_KEY + "\n")
    rules = RULES.format(key_file=key_file, missing=tmp_path / "no-such-key")
    with running_chain(tmp_path, rules) as running:
        yield running


def token(sub: str = "coord-1", role: str = "coordinator", session: str = "s-coord") -> str:
    return mint_token(SECRET, sub, 600, {"agent_role": role, "session_id": session})


def agent_request(path: str, sub: str = "agent-1", method: str = "GET",
                  host: str = "api.example.com", role: str = "general") -> Any:
    f = request_flow(path=path, host=host, method=method,
                     auth=basic(token(sub, role, f"s-{sub}")))
    f.request.headers["Authorization"] = "Bearer agent-own-key"
    f.request.headers["x-api-key"] = "agent-smuggled-key"
    return f


# -- credentials ------------------------------------------------------------------------


def test_the_upstream_key_replaces_the_agents_own_in_an_allowed_flow(
        chain: tuple[Any, list[Any]]) -> None:
    _, addons = chain
    f = agent_request("/v1/models")
    run_request(addons, f)
    assert f.response is None
    # what goes upstream: the gateway's key, never the agent's own or a second key
    assert f.request.headers.get_all("Authorization") == [f"Bearer {UPSTREAM_KEY}"]
    assert "x-api-key" not in f.request.headers
    decision = decision_of(f)
    assert decision is not None and decision["credential"] == "example-key"
    # once the request has left, the flow mitmweb and the logs show holds no secret
    respond(addons, f, b"{}", {"content-type": "application/json", "content-length": "2"})
    assert UPSTREAM_KEY not in str(f.request.headers)
    assert "example-key" in f.comment


def test_no_key_for_a_denied_flow_nor_outside_the_route(chain: tuple[Any, list[Any]]) -> None:
    _, addons = chain
    denied = agent_request("/v1/delete-everything")
    run_request(addons, denied)
    assert denied.response is not None and denied.response.status_code == 403
    assert UPSTREAM_KEY not in str(denied.request.headers)
    other = agent_request("/public/page")  # allowed, but no credential route covers it
    run_request(addons, other)
    assert other.response is None
    assert UPSTREAM_KEY not in str(other.request.headers)


def test_an_unreadable_key_refuses_rather_than_forwarding_the_agents(
        chain: tuple[Any, list[Any]]) -> None:
    _, addons = chain
    f = agent_request("/lost/thing")
    run_request(addons, f)
    assert f.response is not None and f.response.status_code == 503
    assert json.loads(f.response.content)["fleetgate"]["rule"] == "credentials.lost-key"
    assert f.response.headers["x-should-retry"] == "false"


# -- control endpoint -------------------------------------------------------------------


def control(auth_token: str, path: str, method: str = "GET", body: bytes | None = None) -> Any:
    f = request_flow(path=path, host=CONTROL, method=method, auth=basic(auth_token))
    if body is not None:
        f.request.headers["Content-Type"] = "application/json"
        f.request.content = body
    return f


def test_delegation_mints_a_narrower_child_token_answered_by_the_gateway(
        chain: tuple[Any, list[Any]]) -> None:
    _, addons = chain
    coord = token()
    f = control(coord, "/v1/delegate", "POST", json.dumps({"role": "security"}).encode())
    run_request(addons, f)
    assert f.response is not None and f.response.status_code == 200, f.response.text
    child = json.loads(f.response.content)
    assert child["role"] == "security" and child["depth"] == 1
    assert child["parent_session"] == "s-coord" and child["agent"].startswith("coord-1/")
    # the child token works as a proxy credential, and knows its place in the family
    me = control(child["token"], "/v1/whoami")
    run_request(addons, me)
    assert me.response is not None and me.response.status_code == 200
    who = json.loads(me.response.content)
    assert who["role"] == "security" and who["depth"] == 1 and who["applies"] is None
    # scope only narrows: a security agent may not mint a coordinator
    up = control(child["token"], "/v1/delegate", "POST", b'{"role": "coordinator"}')
    run_request(addons, up)
    assert up.response is not None and up.response.status_code == 403
    assert json.loads(up.response.content)["fleetgate"]["rule"] == "delegation.role"


def test_control_endpoint_refuses_bad_bodies_and_unknown_paths(
        chain: tuple[Any, list[Any]]) -> None:
    _, addons = chain
    bad = control(token(), "/v1/delegate", "POST", b"\xff not json")
    run_request(addons, bad)
    assert bad.response is not None and bad.response.status_code == 400
    assert json.loads(bad.response.content)["fleetgate"]["rule"] == "delegation.bad_request"
    unknown = control(token(), "/v1/anything")
    run_request(addons, unknown)
    assert unknown.response is not None and unknown.response.status_code == 404


def test_revoking_the_parent_session_refuses_the_child_and_its_minting(
        chain: tuple[Any, list[Any]]) -> None:
    tctx, addons = chain
    coord = token()
    f = control(coord, "/v1/delegate", "POST", b'{"role": "security"}')
    run_request(addons, f)
    child = json.loads(f.response.content)["token"]
    # the operator's command, with descendants ("+")
    answer = tctx.master.commands.call("fleetgate.stop", "session:s-coord+", "revoked in test")
    assert "stop" in str(answer)
    again = control(coord, "/v1/delegate", "POST", b'{"role": "security"}')
    run_request(addons, again)
    assert again.response is not None and again.response.status_code == 503
    assert json.loads(again.response.content)["fleetgate"]["rule"] == "killswitch.stop"
    use = request_flow(path="/v1/models", auth=basic(child))
    run_request(addons, use)  # the family is recalled: the child is refused too
    assert use.response is not None and use.response.status_code == 503
    assert json.loads(use.response.content)["fleetgate"]["rule"] == "killswitch.stop"
    assert tctx.master.commands.call("fleetgate.unrevoke", "session:s-coord+") == "lifted 1"
    back = control(coord, "/v1/whoami")
    run_request(addons, back)
    assert back.response is not None and back.response.status_code == 200


def test_no_child_token_while_the_kill_switch_cannot_record_it(
        chain: tuple[Any, list[Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A child session the kill switch could not record could never be stopped by family:
    while its store is failing, delegation answers 503 and issues nothing."""
    _, addons = chain
    coord = token()
    first = control(coord, "/v1/whoami")
    run_request(addons, first)  # the coordinator's session is recorded while the store works
    assert first.response is not None and first.response.status_code == 200
    kill = next(a.kill for a in addons if type(a).__name__ == "KillSwitch")
    store = kill.core.store

    def full(*_: Any, **__: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(store.inner, "save_node", full)
    newcomer = request_flow(path="/v1/models", auth=basic(token("other-1", "security", "s-new")))
    run_request(addons, newcomer)  # a new session cannot be written: the store is now failing
    assert newcomer.response is not None and newcomer.response.status_code == 503
    f = control(coord, "/v1/delegate", "POST", b'{"role": "security"}')
    run_request(addons, f)
    assert f.response is not None and f.response.status_code == 503, f.response.text
    body = json.loads(f.response.content)
    assert body["fleetgate"]["rule"] == "killswitch.state" and "token" not in body
    assert "database or disk is full" in body["fleetgate"]["reason"]
    assert f.response.headers["Retry-After"] == "1"


# -- health listener --------------------------------------------------------------------


def test_the_health_listener_answers_liveness_and_readiness(
        chain: tuple[Any, list[Any]]) -> None:
    tctx, addons = chain
    port = free_port()
    tctx.options.update(fleetgate_metrics_listen=f"127.0.0.1:{port}", fleetgate_admin_listen="")
    with started(addons):
        base = f"http://127.0.0.1:{port}"
        live = httpx.get(base + "/healthz/live", timeout=5)
        ready = httpx.get(base + "/healthz/ready", timeout=5)
        plain = httpx.get(base + "/healthz", timeout=5)
        assert live.status_code == 200
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert plain.status_code == 200
        assert httpx.get(base + "/nothing-here", timeout=5).status_code == 404
        # the metrics it serves count what went through the chain
        f = agent_request("/v1/models")
        run_request(addons, f)
        assert "fleetgate_" in httpx.get(base + "/metrics", timeout=5).text


SELF_RULES = """apiVersion: fleetgate/v1
destinations:
  allowPrivate: ["127.0.0.1/32"]
agents:
- name: fleet
  match: 'jwt.agent_role == "general"'
  egress:
    hosts: ["127.0.0.1:{ours}", "127.0.0.1:{other}"]
  authorization:
    rules:
    - allow: 'true'
"""


def test_the_gateway_never_proxies_to_its_own_health_listener(tmp_path: Path) -> None:
    """Even where the rules allow the address, the upstream dial to the gateway's own
    listener is refused; the same address on another port is dialled."""
    ours, other = free_port(), free_port()
    with running_chain(tmp_path, SELF_RULES.format(ours=ours, other=other)) as (tctx, addons):
        tctx.options.update(fleetgate_metrics_listen=f"127.0.0.1:{ours}",
                            fleetgate_admin_listen="")
        with started(addons):
            errors = {}
            for port in (ours, other):
                f = agent_request("/v1/models", host="127.0.0.1")
                f.request.port = port
                f.request.headers["Host"] = f"127.0.0.1:{port}"
                f.client_conn.sni = None
                run_request(addons, f)
                assert f.response is None, f.response.text
                server = tflow.tserver_conn()
                server.address = ("127.0.0.1", port)
                data = server_hooks.ServerConnectionHookData(client=f.client_conn, server=server)
                asyncio.run(tctx.master.addons.handle_lifecycle(
                    server_hooks.ServerConnectHook(data)))
                errors[port] = data.server.error
    assert errors[ours] and "fleetgate itself" in errors[ours]
    assert not errors[other]
