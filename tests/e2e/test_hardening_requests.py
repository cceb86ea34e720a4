"""End to end: requests the gateway and the server could read differently are refused, and
inputs that could crash or outlast a parser are bounded. Through a real mitmdump, with raw
sockets where httpx would not send the ambiguity; each case asserts the recording upstream
saw nothing."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import time
from pathlib import Path

import jwt
import pytest
from llm_upstream import llm_rules_extra

from harness import (
    SECRET,
    Gateway,
    Upstream,
    raw_connect,
    read_response,
    ssl_context,
    token,
    write_rules,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def rules_file(tmp_path: Path, upstream: Upstream) -> Path:
    """The usual test policy with the upstream also declared as an OpenAI provider."""
    return write_rules(tmp_path / "rules.yaml", [upstream.port],
                       top=llm_rules_extra(upstream.port))


def basic(tok: str) -> str:
    return "Basic " + base64.b64encode(f"agent:{tok}".encode()).decode()


def tunnel_request(gw: Gateway, up: Upstream, request: bytes,
                   target: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """CONNECT to the upstream by name, TLS through the gateway, send ``request`` verbatim."""
    target = target or f"{up.name}:{up.port}"
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw:
        raw.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
                    f"Proxy-Authorization: {basic(token())}\r\n\r\n".encode())
        head = raw.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head
        with ssl_context(gw.ca_cert).wrap_socket(
                raw, server_hostname=target.rsplit(":", 1)[0]) as s:
            s.sendall(request)
            return read_response(s)


def rule_of(body: bytes) -> str:
    return str(json.loads(body)["fleetgate"]["rule"])


def _post(up: Upstream, extra: str, body: bytes = b"{}") -> bytes:
    return (f"POST /v1/things HTTP/1.1\r\nHost: {up.name}:{up.port}\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


# -- one rule for ambiguity ---------------------------------------------------------------


def test_control_request_passes_the_raw_tunnel(gateway: Gateway, upstream: Upstream) -> None:
    """The raw helper itself reaches the upstream: the refusals below are not its doing."""
    status, _, _ = tunnel_request(gateway, upstream,
                                  _post(upstream, "Content-Type: application/json\r\n"))
    assert status == 200
    assert upstream.paths() == ["/v1/things"]


@pytest.mark.parametrize("extra", [
    "Host: {name}:{port}\r\n",  # Host twice (the request adds the first)
    "Content-Type: application/json\r\nContent-Type: text/plain\r\n",
    "Content-Encoding: identity\r\nContent-Encoding: gzip\r\n",
], ids=["host", "content-type", "content-encoding"])
def test_a_judged_header_sent_twice_is_refused(gateway: Gateway, upstream: Upstream,
                                               extra: str) -> None:
    req = _post(upstream, extra.format(name=upstream.name, port=upstream.port))
    status, headers, body = tunnel_request(gateway, upstream, req)
    assert status == 400
    assert rule_of(body) == "request.ambiguous"
    assert json.loads(body)["fleetgate"]["decision_id"] == headers["x-fleetgate-decision-id"]
    assert upstream.seen == []


@pytest.mark.parametrize("extra", [
    "Content-Length: 2\r\n",  # and the request's own Content-Length: 2
    "Transfer-Encoding: chunked\r\n",
], ids=["content-length-twice", "te-and-cl"])
def test_framing_ambiguities_are_refused_by_mitmproxy(gateway: Gateway, upstream: Upstream,
                                                      extra: str) -> None:
    """mitmproxy's own validation (validate_inbound_headers, which fleetgate pins on) refuses
    these before any addon; the test proves they never reach the server."""
    status, _, _ = tunnel_request(gateway, upstream, _post(upstream, extra))
    assert status == 400
    time.sleep(0.3)
    assert upstream.seen == []


def test_turning_off_mitmproxys_header_validation_is_refused(make_gateway,
                                                            rules_file: Path) -> None:
    gw = make_gateway(rules_file, start=False)
    argv = [*gw.argv(), "--set", "validate_inbound_headers=false"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=gw.workdir)
    assert proc.returncode != 0
    assert "validate_inbound_headers" in proc.stdout + proc.stderr


def test_two_proxy_credentials_on_connect_are_refused(gateway: Gateway,
                                                      upstream: Upstream) -> None:
    good = basic(token("agent-a"))
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        target = f"{upstream.name}:{upstream.port}"
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
                  f"Proxy-Authorization: {good}\r\nProxy-Authorization: {good}\r\n\r\n"
                  .encode())
        status, headers, body = read_response(s)
    assert status == 407
    assert rule_of(body) == "identity.ambiguous"
    assert "proxy-authenticate" in headers
    assert upstream.seen == [] and upstream.connections == 0


def test_control_host_inside_another_tunnel_is_domain_fronting(gateway: Gateway,
                                                               upstream: Upstream) -> None:
    req = b"GET /v1/whoami HTTP/1.1\r\nHost: fleetgate.internal\r\n\r\n"
    status, _, body = tunnel_request(gateway, upstream, req)
    assert status == 403
    assert rule_of(body) == "host-mismatch"
    assert upstream.seen == []
    with gateway.client(token("who")) as c:  # the real control host still answers
        r = c.get("https://fleetgate.internal/v1/whoami")
    assert r.status_code == 200 and r.json()["agent"] == "who"


# -- bounds -------------------------------------------------------------------------------


def test_json_nested_10000_deep_is_a_400(gateway: Gateway, upstream: Upstream) -> None:
    deep = b'{"model": "gpt-4o", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    with gateway.client(token()) as c:
        llm = c.post(upstream.url + "/v1/chat/completions", content=deep,
                     headers={"content-type": "application/json"})
        control = c.post("https://fleetgate.internal/v1/delegate",
                         content=b"[" * 10_000 + b"]" * 10_000,
                         headers={"content-type": "application/json"})
        shallow = c.post(upstream.url + "/v1/chat/completions", json={
            "model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert llm.status_code == 400, llm.text
    assert "deeper than 64" in llm.json()["error"]["message"]
    assert control.status_code == 400 and control.json()["fleetgate"]["rule"] == \
        "delegation.bad_request"
    assert shallow.status_code == 200
    assert upstream.paths() == ["/v1/chat/completions"]  # only the shallow one


def test_json_depth_is_an_option(make_gateway, rules_file: Path, upstream: Upstream) -> None:
    gw = make_gateway(rules_file, fleetgate_max_json_depth="2")
    with gw.client(token()) as c:
        r = c.post(upstream.url + "/v1/chat/completions", json={
            "model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "deeper than 2" in r.json()["error"]["message"]
    assert upstream.seen == []


def test_validly_signed_oversized_jwt_is_refused(gateway: Gateway, upstream: Upstream) -> None:
    big = jwt.encode({"sub": "big", "agent_role": "tester", "exp": int(time.time()) + 600},
                     SECRET, algorithm="HS256",
                     headers={"pad": "x" * 20_000})  # over 8 KiB; under the 64 KiB head bound (431)
    status, _, body = raw_connect(gateway.port, f"{upstream.name}:{upstream.port}", basic(big))
    assert status == 407
    assert rule_of(body) == "identity.too_large"
    assert "fleetgate_jwt_max_bytes" in json.loads(body)["fleetgate"]["reason"]
    assert upstream.connections == 0


def _encode_d(times: int) -> str:
    text = "delete"
    for _ in range(times):
        text = "".join(f"%{ord(c):02X}" if c == "d" else c.replace("%", "%25") for c in text)
    return text


def test_path_encoded_many_times_is_judged_decoded_or_refused(gateway: Gateway,
                                                              upstream: Upstream) -> None:
    with gateway.client(token()) as c:
        five = c.get(upstream.url + "/a/" + _encode_d(5))
        nine = c.get(upstream.url + "/a/" + _encode_d(9))
    assert five.status_code == 403  # decoded to /a/delete: the seed deny rule applies
    assert five.json()["fleetgate"]["rule"].startswith("rules.authorization[")
    assert nine.status_code == 400 and nine.json()["fleetgate"]["rule"] == "request.path"
    assert upstream.seen == []
