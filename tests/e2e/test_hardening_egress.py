"""End to end: a wildcard egress entry never reaches an internal address.

``destinations.allowPrivate`` admits 127.0.0.1, where the recording upstreams listen. A
profile whose egress is ``*`` (or ``*.fleetgate.test``) must not reach them by IP, by
``localhost`` or by a name that resolves there; a profile that names the destination
explicitly can. Every refusal is checked on the upstream: it recorded nothing.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from harness import Gateway, Upstream, register_name, token

pytestmark = pytest.mark.e2e

INTERNAL = "internal.fleetgate.test"  # served by the upstream's cert, on port 443
OTHER = "db.fleetgate.test"  # registered by hand: a name resolving to 127.0.0.1


def rules(path: Path, up: Upstream, plain: Upstream) -> Path:
    path.write_text(f"""apiVersion: fleetgate/v1
destinations:
  allowPrivate: ["127.0.0.1/32"]
agents:
- name: wide
  match: 'jwt.agent_role == "wide"'
  egress: {{hosts: ["*"]}}
  authorization: {{rules: [{{id: wide.any, allow: 'true'}}]}}
- name: subdomains
  match: 'jwt.agent_role == "subdomains"'
  egress: {{hosts: ["*.fleetgate.test"]}}
  authorization: {{rules: [{{id: subdomains.any, allow: 'true'}}]}}
- name: explicit
  match: 'jwt.agent_role == "explicit"'
  egress:
    hosts: ["*", "127.0.0.1:{up.port}", "localhost:{up.port}", "{INTERNAL}:443",
            "{up.name}:{up.port}", "{plain.name}:{plain.port}"]
  authorization: {{rules: [{{id: explicit.any, allow: 'true'}}]}}
""")
    return path


@pytest.fixture
def internal(upstream_ca: trustme.CA) -> Iterator[Upstream]:
    up = Upstream(upstream_ca, names=(INTERNAL,))
    register_name(OTHER, 443, up.port)  # removed with the upstream's own names
    yield up
    up.stop()


@pytest.fixture
def gw(make_gateway, tmp_path: Path, internal: Upstream, plain_upstream: Upstream) -> Gateway:
    return make_gateway(rules(tmp_path / "rules.yaml", internal, plain_upstream))


def targets(up: Upstream) -> dict[str, str]:
    return {
        "ip": f"https://127.0.0.1:{up.port}",
        "localhost": f"https://localhost:{up.port}",
        "upstream-name": up.url,
        "name": f"https://{INTERNAL}",
        "other-name": f"https://{OTHER}",
    }


@pytest.mark.parametrize("role", ["wide", "subdomains"])
def test_wildcard_profile_reaches_no_internal_destination(
        gw: Gateway, internal: Upstream, role: str) -> None:
    refused = []
    with gw.client(token(f"agent-{role}", role=role)) as c:
        for how, base in targets(internal).items():
            r = c.get(f"{base}/{role}-{how}")
            refused.append((how, r.status_code))
            if how == "ip":
                if role == "wide":
                    assert r.status_code == 403, r.text
                    assert r.json()["fleetgate"]["rule"] == "egress.private", r.text
                else:  # '*.fleetgate.test' does not even match an IP
                    assert r.status_code == 403 and r.json()["fleetgate"]["rule"] == "egress"
            elif how == "localhost" and role == "subdomains":
                assert r.status_code == 403 and r.json()["fleetgate"]["rule"] == "egress"
            else:  # a name: allowed by the rules, refused when it resolved to 127.0.0.1
                assert r.status_code == 502, (how, r.status_code, r.text)
                assert "fleetgate refused to connect" in r.text
                assert "wildcard" in r.text
    assert internal.seen == [], refused
    assert internal.connections == 0
    d = gw.wait_for_decision(lambda d: d["path"] == f"/{role}-name")
    assert d["result"] == "deny" and d["rule"] == "destinations.connect"


def test_explicit_profile_reaches_the_same_destinations(gw: Gateway, internal: Upstream) -> None:
    with gw.client(token("agent-explicit", role="explicit")) as c:
        for how, base in targets(internal).items():
            r = c.get(f"{base}/explicit-{how}")
            if how == "other-name":  # named by no explicit entry: '*' alone admits it
                assert r.status_code == 502 and "wildcard" in r.text, r.text
            else:
                assert r.status_code == 200, (how, r.text)
    assert internal.paths() == ["/explicit-ip", "/explicit-localhost",
                                "/explicit-upstream-name", "/explicit-name"]


def basic(tok: str) -> str:
    return "Basic " + base64.b64encode(f"agent:{tok}".encode()).decode()


def http_exchange(s: socket.socket, url: str, tok: str) -> tuple[int, bytes]:
    """One absolute-form request on an open proxy connection; (status, body)."""
    host = url.split("/")[2]
    s.sendall(f"GET {url} HTTP/1.1\r\nHost: {host}\r\nProxy-Authorization: {basic(tok)}\r\n"
              "\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(v) for k, _, v in (ln.partition(":") for ln in lines[1:])
                  if k.strip().lower() == "content-length")
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk
        body += chunk
    return int(lines[0].split()[1]), body


def test_wildcard_request_cannot_ride_an_open_internal_connection(
        gw: Gateway, plain_upstream: Upstream) -> None:
    """The explicit agent opens a connection to the internal name; a wildcard agent's
    request on the same client connection would reuse it without a new dial."""
    url = plain_upstream.url
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        status, _ = http_exchange(s, url + "/explicit", token("e", role="explicit"))
        assert status == 200
        status, body = http_exchange(s, url + "/wide", token("w", role="wide"))
        assert status == 403, body
        assert b"egress.private" in body
        status, _ = http_exchange(s, url + "/explicit-again", token("e", role="explicit"))
        assert status == 200
    assert plain_upstream.paths() == ["/explicit", "/explicit-again"]
