"""Keys that rotate, through a real mitmdump: a JWKS served over HTTPS on 127.0.0.1 and edited
during the test, agents connected across the rotation, the IdP down past the staleness bound
and back; the HS256 secret file rotated under a loop of requests that must all succeed."""

from __future__ import annotations

import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from fleetgate.identity.mint import mint_token
from harness import SECRET, Gateway, Upstream, free_port, raw_connect, wait_until

pytestmark = pytest.mark.e2e

NEW_SECRET = b"e2e-rotated-secret-0123456789abcdef012345"


class JwksServer:
    """An IdP's jwks_uri on 127.0.0.1 over TLS: keys the test adds and removes; stop/start."""

    def __init__(self, ca: trustme.CA, port: int | None = None) -> None:
        self.ca = ca
        self.keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        self.fetches = 0
        self.port = port or free_port()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/.well-known/jwks.json"

    def document(self) -> bytes:
        keys = []
        for kid, key in list(self.keys.items()):
            jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
            keys.append({**jwk, "kid": kid, "alg": "ES256", "use": "sig"})
        return json.dumps({"keys": keys}).encode()

    def start(self) -> JwksServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner.fetches += 1
                body = owner.document()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "public, max-age=3600")  # capped by refresh
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1").configure_cert(ctx)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def token(self, kid: str, sub: str, ttl: int = 600) -> str:
        return jwt.encode({"sub": sub, "agent_role": "tester", "exp": int(time.time()) + ttl},
                          self.keys[kid], algorithm="ES256", headers={"kid": kid})


def connect_status(gw: Gateway, up: Upstream, token: str) -> tuple[int, dict[str, Any]]:
    """A fresh CONNECT with ``token``: the gateway's status and (on refusal) its JSON body."""
    import base64

    auth = "Basic " + base64.b64encode(f"agent:{token}".encode()).decode()
    status, _, body = raw_connect(gw.port, f"{up.name}:{up.port}", auth)
    return status, (json.loads(body) if status != 200 and body else {})


def jwks_state(gw: Gateway) -> dict[str, Any]:
    return dict(gw.ready().json()["state"]["jwks"])


@pytest.fixture
def idp(upstream_ca: trustme.CA) -> Any:
    server = JwksServer(upstream_ca)
    yield server
    server.stop()


def test_jwks_url_rotation_with_agents_connected(make_gateway: Any, rules_file: Path,
                                                 upstream: Upstream, idp: JwksServer,
                                                 upstream_ca_file: Path) -> None:
    idp.keys["k1"] = ec.generate_private_key(ec.SECP256R1())
    idp.start()
    gw = make_gateway(rules_file, fleetgate_jwks_url=idp.url,
                      fleetgate_jwks_ca_file=str(upstream_ca_file),
                      fleetgate_jwks_refresh="2s", fleetgate_jwks_max_stale="6s",
                      fleetgate_jwks_kid_refetch="1s")
    assert wait_until(lambda: jwks_state(gw)["ok"], 10), gw.text()
    assert gw.ready().status_code == 200

    # an agent connected with the old key, its tunnel kept open
    old_agent = gw.client(idp.token("k1", "old-agent"))
    assert old_agent.get(upstream.url + "/a").status_code == 200

    # step 1: the new key published beside the old one; a new agent uses it at once
    idp.keys["k2"] = ec.generate_private_key(ec.SECP256R1())
    new_agent = gw.client(idp.token("k2", "new-agent"))
    assert new_agent.get(upstream.url + "/b").status_code == 200  # unknown kid: refetched
    for _ in range(5):
        assert old_agent.get(upstream.url + "/a").status_code == 200
        assert new_agent.get(upstream.url + "/b").status_code == 200
    assert connect_status(gw, upstream, idp.token("k1", "late-old"))[0] == 200

    # step 3: the old key retired at the IdP; after the next refresh...
    late_old = idp.token("k1", "late-old")
    del idp.keys["k1"]
    assert wait_until(lambda: jwks_state(gw)["keys"] == 1, 10), gw.text()
    status, body = connect_status(gw, upstream, late_old)
    assert status == 407 and body["fleetgate"]["rule"] == "identity.unknown_key"
    r = old_agent.get(upstream.url + "/a")  # ...its open tunnel is refused on the next request
    assert r.status_code == 407 and r.json()["fleetgate"]["rule"] == "identity.key_retired"
    assert new_agent.get(upstream.url + "/b").status_code == 200

    # the IdP down past fleetgate_jwks_max_stale: refused, loudly
    idp.stop()
    assert wait_until(lambda: not jwks_state(gw)["ok"], 15), gw.text()
    status, body = connect_status(gw, upstream, idp.token("k2", "new-agent-2"))
    assert status == 407 and body["fleetgate"]["rule"] == "identity.jwks_stale"
    message = body["error"]["message"]
    assert idp.url in message and "s ago" in message and "fleetgate_jwks_max_stale" in message
    try:  # its open tunnel: refused on the next request...
        r = new_agent.get(upstream.url + "/b")
        assert r.status_code == 407 and r.json()["fleetgate"]["rule"] == "identity.jwks_stale"
    except httpx.ProxyError as exc:  # ...or, if the idle tunnel was closed, its new CONNECT
        assert "407" in str(exc)
    ready = gw.ready()
    assert ready.status_code == 200  # degraded, not unready: the refusals say what is wrong
    assert ready.json()["degraded"] is True and ready.json()["state"]["jwks"]["code"] == \
        "jwks_stale"
    assert "fleetgate_jwks_usable 0.0" in gw.metrics()
    assert 'fleetgate_identity_failures_total{code="jwks_stale"}' in gw.metrics()
    gw.wait_for_output("more than fleetgate_jwks_max_stale")  # the ERROR line
    # HS256 agents are not affected
    with gw.client(mint_token(SECRET, "hs-agent", 600, {"agent_role": "tester"})) as hs:
        assert hs.get(upstream.url + "/c").status_code == 200

    # back: it recovers on its own
    idp.start()
    assert wait_until(lambda: jwks_state(gw)["ok"], 15), gw.text()
    with gw.client(idp.token("k2", "new-agent-3")) as again:
        assert again.get(upstream.url + "/b").status_code == 200
    assert new_agent.get(upstream.url + "/b").status_code == 200
    assert "fleetgate_jwks_usable 1.0" in gw.metrics()
    old_agent.close()
    new_agent.close()


def test_starts_unready_while_the_jwks_url_is_unreachable(make_gateway: Any, rules_file: Path,
                                                          upstream: Upstream,
                                                          upstream_ca: trustme.CA,
                                                          upstream_ca_file: Path) -> None:
    idp = JwksServer(upstream_ca)  # not started: nothing listens on its port
    idp.keys["k1"] = ec.generate_private_key(ec.SECP256R1())
    gw = make_gateway(rules_file, fleetgate_jwks_url=idp.url,
                      fleetgate_jwks_ca_file=str(upstream_ca_file),
                      fleetgate_jwks_refresh="2s", fleetgate_jwks_max_stale="6s",
                      fleetgate_jwks_kid_refetch="0s")
    try:
        ready = gw.ready()
        assert ready.status_code == 503
        state = ready.json()["state"]["jwks"]
        assert state["ok"] is False and state["code"] == "jwks_unavailable"
        status, body = connect_status(gw, upstream, idp.token("k1", "es-agent"))
        assert status == 407 and body["fleetgate"]["rule"] == "identity.jwks_unavailable"
        assert idp.url in body["error"]["message"]
        assert gw.proc is not None and gw.proc.poll() is None  # running, not exited
        with gw.client(mint_token(SECRET, "hs-agent", 600, {"agent_role": "tester"})) as hs:
            assert hs.get(upstream.url + "/c").status_code == 200

        idp.start()  # the IdP comes up: fetched on the next retry
        assert wait_until(lambda: gw.ready().status_code == 200, 15), gw.text()
        with gw.client(idp.token("k1", "es-agent")) as es:
            assert es.get(upstream.url + "/a").status_code == 200
    finally:
        idp.stop()


def test_hs256_secret_rotation_loses_no_request(make_gateway: Any, rules_file: Path,
                                                upstream: Upstream, tmp_path: Path) -> None:
    secret_file = tmp_path / "jwt.secret"
    secret_file.write_bytes(SECRET + b"\n")
    gw = make_gateway(rules_file, fleetgate_jwt_secret_file=str(secret_file))
    results: list[tuple[str, int]] = []
    lock = threading.Lock()
    stop = threading.Event()
    tokens = {f"agent-{i}": mint_token(SECRET, f"agent-{i}", 600, {"agent_role": "tester"})
              for i in range(3)}

    def agent(name: str) -> None:
        """Requests in a loop on a kept-open tunnel; reconnects when its token changes."""
        current = tokens[name]
        client = gw.client(current)
        try:
            while not stop.is_set():
                if tokens[name] != current:  # the agent got a new token: a new tunnel
                    client.close()
                    current = tokens[name]
                    client = gw.client(current)
                try:
                    status = client.get(upstream.url + f"/{name}").status_code
                except httpx.HTTPError as exc:
                    status = -1
                    print(f"{name}: {exc!r}")
                with lock:
                    results.append((name, status))
                time.sleep(0.02)
        finally:
            client.close()

    threads = [threading.Thread(target=agent, args=(n,), daemon=True) for n in list(tokens)]
    for t in threads:
        t.start()

    def served(n: int) -> bool:
        with lock:
            return len(results) >= n

    assert wait_until(lambda: served(30), 10)
    # step 1: the new secret becomes current, the old one stays as previous
    tmp = tmp_path / "jwt.secret.tmp"
    tmp.write_bytes(b"# current first, then the previous one\n" + NEW_SECRET + b"\n" + SECRET +
                    b"\n")
    tmp.replace(secret_file)
    # step 2: a token signed with the new secret works at once (no wait for a reload)...
    with gw.client(mint_token(NEW_SECRET, "fresh", 600, {"agent_role": "tester"})) as fresh:
        assert fresh.get(upstream.url + "/fresh").status_code == 200
    gw.wait_for_output("keys reloaded from")
    # ...while the agents go on with their old tokens, on their open tunnels and new ones
    with lock:
        n = len(results)
    assert wait_until(lambda: served(n + 30), 10)
    assert connect_status(gw, upstream, mint_token(SECRET, "late-old", 600,
                                                   {"agent_role": "tester"}))[0] == 200
    for name in list(tokens):  # then they get new tokens (as their old ones expire)
        tokens[name] = mint_token(NEW_SECRET, name, 600, {"agent_role": "tester"})
    with lock:
        n = len(results)
    assert wait_until(lambda: served(n + 30), 10)
    # step 3: the old secret dropped once no agent uses it
    tmp.write_bytes(NEW_SECRET + b"\n")
    tmp.replace(secret_file)
    with lock:
        n = len(results)
    assert wait_until(lambda: served(n + 30), 10)
    stop.set()
    for t in threads:
        t.join(10)

    assert results and all(status == 200 for _, status in results), \
        [r for r in results if r[1] != 200]
    assert {name for name, _ in results} == set(tokens)
    # the drop took effect: a token signed with the old secret is refused now
    status, body = connect_status(gw, upstream, mint_token(SECRET, "late", 600,
                                                           {"agent_role": "tester"}))
    assert status == 407 and body["fleetgate"]["rule"] == "identity.bad_signature"
    gw.wait_for_output("keys reloaded from")
