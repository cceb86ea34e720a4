"""An allowed request whose upstream fails gets JSON in the client's format, never HTML (issue 13).

Cannot resolve, connection refused, TLS failure, a destination the gateway will not dial: each
is answered by the gateway with the decision id, a rule id the agent can act on, and the body
shape the OpenAI and Anthropic SDKs (or an MCP client) parse.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import trustme

from harness import (
    Gateway,
    Upstream,
    free_port,
    register_name,
    ssl_context,
    token,
    unregister_names,
)

pytestmark = pytest.mark.e2e

REFUSED_NAME = "down.fleetgate.test"


def _rules(path: Path, upstream: Upstream, untrusted: Upstream, refused_port: int,
           allow_private: str) -> Path:
    hosts = [f"{upstream.name}:{upstream.port}", f"{untrusted.name}:{untrusted.port}",
             "no-such-host.invalid:443", "api.openai.com:443", "api.anthropic.com:443",
             f"{REFUSED_NAME}:{refused_port}", f"mcp.{REFUSED_NAME}:{refused_port}"]
    path.write_text(f"""apiVersion: fleetgate/v1
destinations:
  allowPrivate: {allow_private}
agents:
- name: tester
  match: 'jwt.agent_role == "tester"'
  egress:
    hosts: {json.dumps(hosts)}
  authorization:
    rules:
    - id: tester.allow
      allow: 'true'
""")
    return path


@pytest.fixture
def untrusted() -> Iterator[Upstream]:
    up = Upstream(trustme.CA())  # a CA the gateway does not trust
    yield up
    up.stop()


@pytest.fixture
def refused_port() -> Iterator[int]:
    port = free_port()  # nothing listens there
    register_name(REFUSED_NAME, port, port)
    register_name(f"mcp.{REFUSED_NAME}", port, port)
    register_name("api.openai.com", 443, port)
    register_name("api.anthropic.com", 443, port)
    yield port
    unregister_names(port)


@pytest.fixture
def gw(make_gateway, tmp_path: Path, upstream: Upstream, untrusted: Upstream,
       refused_port: int) -> Gateway:
    return make_gateway(_rules(tmp_path / "rules.yaml", upstream, untrusted, refused_port,
                               '["127.0.0.1/32"]'))


def _json_error(r: httpx.Response) -> dict:
    assert r.headers["content-type"] == "application/json", r.text[:200]
    assert r.headers.get("x-fleetgate-decision-id")
    body = r.json()
    assert body["fleetgate"]["decision_id"] == r.headers["x-fleetgate-decision-id"]
    return body


def test_unresolvable_name_is_a_json_502_naming_the_rule(gw: Gateway) -> None:
    with gw.client(token()) as c:
        r = c.get("https://no-such-host.invalid/v1/models")
        again = c.get("https://no-such-host.invalid/v1/models")  # the tunnel still answers
    assert r.status_code == 502
    body = _json_error(r)
    assert body["error"]["code"] == "upstream.resolve"
    assert "no-such-host.invalid" in body["error"]["message"]
    assert r.headers["x-should-retry"] == "false"
    assert again.status_code == 502
    d = gw.wait_for_decision(lambda d: d.get("status") == 502 and d.get("host") == "no-such-host.invalid")
    assert d["upstream"]["rule"] == "upstream.resolve"
    assert d["rule"] == "tester.allow"  # the rules allowed it; the upstream failed
    assert 'fleetgate_upstream_failures_total{rule="upstream.resolve"} 2.0' in gw.metrics()


def test_connection_refused_surfaces_in_the_openai_sdk(gw: Gateway, refused_port: int) -> None:
    with openai.OpenAI(api_key="sk-agent-never-sees-a-real-key", max_retries=0,
                       http_client=gw.client(token())) as client, \
            pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 502
    assert "upstream.connect" in info.value.message
    assert info.value.response.headers.get("x-fleetgate-decision-id")


def test_connection_refused_surfaces_in_the_anthropic_sdk(gw: Gateway) -> None:
    # the anthropic SDK brings its own HTTP stack (httpx2): configured like an agent pod
    http = anthropic.DefaultHttpxClient(proxy=gw.proxy_url(token()),
                                        verify=ssl_context(gw.ca_cert), timeout=20)
    with anthropic.Anthropic(api_key="agent-key", max_retries=0, http_client=http) as client, \
            pytest.raises(anthropic.APIStatusError) as info:
        client.messages.create(model="claude-test", max_tokens=5,
                               messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 502
    assert "upstream.connect" in str(info.value.message)


def test_untrusted_upstream_certificate_is_a_json_tls_error(gw: Gateway, untrusted: Upstream) -> None:
    with gw.client(token()) as c:
        r = c.get(f"{untrusted.url}/x")
    assert r.status_code == 502
    assert _json_error(r)["error"]["code"] == "upstream.tls"
    assert untrusted.seen == []


def test_refused_internal_destination_is_json(make_gateway, tmp_path: Path, upstream: Upstream,
                                              untrusted: Upstream, refused_port: int) -> None:
    gw = make_gateway(_rules(tmp_path / "r.yaml", upstream, untrusted, refused_port, "[]"))
    with gw.client(token()) as c:
        r = c.get(f"{upstream.url}/x")
    assert r.status_code == 502
    body = _json_error(r)
    assert body["error"]["code"] == "destinations.connect"
    assert "127.0.0.1" in body["error"]["message"]
    assert upstream.seen == []


def test_mcp_request_to_a_down_server_gets_a_json_rpc_error(gw: Gateway, refused_port: int) -> None:
    msg = {"jsonrpc": "2.0", "id": 7, "method": "initialize",
           "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                      "clientInfo": {"name": "agent", "version": "1"}}}
    with gw.client(token()) as c:
        r = c.post(f"https://mcp.{REFUSED_NAME}:{refused_port}/mcp", json=msg,
                   headers={"Accept": "application/json, text/event-stream",
                            "Mcp-Protocol-Version": "2025-11-25"})
    assert r.status_code == 502, r.text
    assert r.headers.get("x-fleetgate-decision-id")
    body = r.json()
    assert body["jsonrpc"] == "2.0" and body["id"] == 7
    assert "upstream.connect" in body["error"]["message"]
    assert body["error"]["data"]["decision_id"] == r.headers["x-fleetgate-decision-id"]


def test_a_working_upstream_is_untouched(gw: Gateway, upstream: Upstream) -> None:
    with gw.client(token()) as c:
        r = c.get(f"{upstream.url}/fine")
    assert r.status_code == 200 and r.json()["path"] == "/fine"
    assert r.headers.get("x-fleetgate-decision-id")

