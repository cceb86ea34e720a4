"""AgentIdentity while keys rotate: a JWKS URL (fake fetcher, injected clock) refreshed,
fetched again for an unknown kid (rate-limited), stale past its bound; HS256 secrets rotated
in the secret file with tunnels open."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from mitmproxy import connection
from mitmproxy.test import taddons, tflow

from fleetgate.addons.identity import AgentIdentity
from fleetgate.addons.state import IDENTITY
from fleetgate.identity.mint import mint_token
from fleetgate.metrics import GatewayMetrics
from fleetgate.runtime.jwks_source import Fetched, Fetcher

URL = "https://idp.example/jwks"
OLD = b"old-secret-0123456789abcdef0123456789"
NEW = b"new-secret-0123456789abcdef0123456789"


class FakeIdp:
    """The JWKS URL: a key set the test edits, a switch to fail, and a count of fetches."""

    def __init__(self) -> None:
        self.keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        self.down = False
        self.fetches = 0

    def fetcher(self, ca_file: str) -> Fetcher:
        def fetch(url: str, timeout: float) -> Fetched:
            assert url == URL
            self.fetches += 1
            if self.down:
                raise OSError("connection refused")
            keys = []
            for kid, key in self.keys.items():
                jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
                keys.append({**jwk, "kid": kid})
            return Fetched(json.dumps({"keys": keys}), "max-age=300")
        return fetch

    def token(self, kid: str, sub: str = "agent-1") -> str:
        return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, self.keys[kid],
                          algorithm="ES256", headers={"kid": kid})


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def connect(token: str, client: connection.Client | None = None) -> Any:
    f = tflow.tflow()
    if client is not None:
        f.client_conn = client
    f.request.method = "CONNECT"
    f.request.headers["Proxy-Authorization"] = "Basic " + base64.b64encode(
        f"agent:{token}".encode()).decode()
    return f


def inner(client: connection.Client) -> Any:
    """A request inside the tunnel ``client`` opened (no credentials of its own)."""
    f = tflow.tflow()
    f.client_conn = client
    return f


async def run_hook(result: Any) -> None:
    if result is not None:
        await result


def rule_of(flow: Any) -> str | None:
    if flow.response is None:
        return None
    return str(json.loads(flow.response.content)["fleetgate"]["rule"])


def scenario(body: Callable[..., Any]) -> None:
    asyncio.run(body())


def test_unknown_kid_fetches_once_and_the_connect_waits_for_it(monkeypatch: Any) -> None:
    monkeypatch.delenv("FLEETGATE_JWT_SECRET", raising=False)
    idp = FakeIdp()
    idp.keys["k1"] = ec.generate_private_key(ec.SECP256R1())
    clock = Clock()

    async def body() -> None:
        ident = AgentIdentity(GatewayMetrics(), fetcher=idp.fetcher, clock=clock)
        with taddons.context(ident) as tctx:
            tctx.configure(ident, fleetgate_jwks_url=URL, fleetgate_jwt_secret_env="",
                           fleetgate_jwks_kid_refetch="30s")
            assert ident.registry.jwks_status()["ready"] is False  # nothing fetched yet
            f = connect(idp.token("k1"))
            await run_hook(ident.http_connect(f))  # waits for the (first) fetch
            assert f.response is None and f.metadata[IDENTITY]["agent"] == "agent-1"
            assert idp.fetches == 1 and ident.registry.jwks_status()["ok"] is True

            idp.keys["k2"] = ec.generate_private_key(ec.SECP256R1())  # published at the IdP
            clock.now += 31  # past the kid-refetch interval (the refresh is 5m away)
            f = connect(idp.token("k2"))
            await run_hook(ident.http_connect(f))
            assert f.response is None and idp.fetches == 2

            bogus = []  # a flood of made-up kids: refused, and at most one fetch
            for i in range(20):
                f = connect(jwt.encode({"sub": "x", "exp": int(time.time()) + 60},
                                       idp.keys["k1"], algorithm="ES256",
                                       headers={"kid": f"bogus-{i}"}))
                await run_hook(ident.http_connect(f))
                bogus.append(rule_of(f))
            assert bogus == ["identity.unknown_key"] * 20
            assert idp.fetches == 2  # within 30s of the last kid-triggered fetch: none

    scenario(body)


def test_a_key_removed_at_the_idp_refuses_its_open_tunnels(monkeypatch: Any) -> None:
    monkeypatch.delenv("FLEETGATE_JWT_SECRET", raising=False)
    idp = FakeIdp()
    idp.keys["old"] = ec.generate_private_key(ec.SECP256R1())
    clock = Clock()

    async def body() -> None:
        ident = AgentIdentity(GatewayMetrics(), fetcher=idp.fetcher, clock=clock)
        with taddons.context(ident) as tctx:
            tctx.configure(ident, fleetgate_jwks_url=URL, fleetgate_jwt_secret_env="")
            source = ident.registry.jwks
            assert source is not None
            await source.fetch()
            old_tunnel = connect(idp.token("old"))
            ident.http_connect(old_tunnel)
            assert old_tunnel.response is None

            idp.keys["new"] = ec.generate_private_key(ec.SECP256R1())  # rotation, step 1
            await source.fetch()
            new_tunnel = connect(idp.token("new"))
            ident.http_connect(new_tunnel)
            assert new_tunnel.response is None
            for client in (old_tunnel.client_conn, new_tunnel.client_conn):
                f = inner(client)
                ident.requestheaders(f)
                assert f.response is None  # both keys trusted: nothing lost

            del idp.keys["old"]  # retired at the IdP, then refreshed
            await source.fetch()
            f = inner(new_tunnel.client_conn)
            ident.requestheaders(f)
            assert f.response is None
            f = inner(old_tunnel.client_conn)
            ident.requestheaders(f)
            assert rule_of(f) == "identity.key_retired"

    scenario(body)


def test_stale_keys_refuse_tokens_loudly_and_recover(monkeypatch: Any,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("FLEETGATE_JWT_SECRET", raising=False)
    idp = FakeIdp()
    idp.keys["k1"] = ec.generate_private_key(ec.SECP256R1())
    clock = Clock()
    metrics = GatewayMetrics()

    async def body() -> None:
        ident = AgentIdentity(metrics, fetcher=idp.fetcher, clock=clock)
        with taddons.context(ident) as tctx:
            tctx.configure(ident, fleetgate_jwks_url=URL, fleetgate_jwt_secret_env="",
                           fleetgate_jwks_refresh="1m", fleetgate_jwks_max_stale="10m")
            source = ident.registry.jwks
            assert source is not None
            assert await source.fetch() is True
            tunnel = connect(idp.token("k1"))
            ident.http_connect(tunnel)
            assert tunnel.response is None

            idp.down = True
            clock.now += 599
            assert await source.fetch() is False  # failed, but the keys are fresh enough
            f = connect(idp.token("k1"))
            await run_hook(ident.http_connect(f))
            assert f.response is None

            clock.now += 2  # 601 s since the last good fetch: past max_stale
            f = connect(idp.token("k1"))
            await run_hook(ident.http_connect(f))  # tries a fetch, which fails
            assert rule_of(f) == "identity.jwks_stale"
            assert f.response is not None and f.response.status_code == 407
            message = json.loads(f.response.content)["error"]["message"]
            assert URL in message and "ago" in message and "connection refused" in message
            f = inner(tunnel.client_conn)  # the open tunnel with that key: refused too
            ident.requestheaders(f)
            assert rule_of(f) == "identity.jwks_stale"
            status = ident.registry.jwks_status()
            assert status["ok"] is False and status["code"] == "jwks_stale"
            assert metrics.jwks_usable._value.get() == 0
            assert any(r.levelname == "ERROR" and URL in r.getMessage() for r in caplog.records)

            idp.down = False
            assert await source.fetch() is True
            f = connect(idp.token("k1"))
            await run_hook(ident.http_connect(f))
            assert f.response is None
            assert ident.registry.jwks_status()["ok"] is True
            assert metrics.jwks_usable._value.get() == 1

    scenario(body)


def test_secret_file_rotation_keeps_every_tunnel(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("FLEETGATE_JWT_SECRET", raising=False)
    secret = tmp_path / "jwt.secret"
    secret.write_bytes(OLD + b"\n")
    ident = AgentIdentity(GatewayMetrics())
    with taddons.context(ident) as tctx:
        tctx.configure(ident, fleetgate_jwt_secret_file=str(secret))
        old_tunnel = connect(mint_token(OLD, "old-agent"))
        ident.http_connect(old_tunnel)
        assert old_tunnel.response is None

        tmp = tmp_path / "jwt.secret.tmp"  # step 1: the new secret current, the old previous
        tmp.write_bytes(b"# rotating\n" + NEW + b"\n" + OLD + b"\n")
        tmp.replace(secret)
        ident._files_checked = 0.0  # skip the once-a-second throttle
        new_tunnel = connect(mint_token(NEW, "new-agent"))
        ident.http_connect(new_tunnel)
        assert new_tunnel.response is None
        assert ident.registry.hs_secret() == NEW  # what child tokens are signed with
        late = connect(mint_token(OLD, "late-agent"))  # an old token, a new tunnel
        ident.http_connect(late)
        assert late.response is None
        f = inner(old_tunnel.client_conn)
        ident.requestheaders(f)
        assert f.response is None

        tmp.write_bytes(NEW + b"\n")  # step 3: the old secret dropped
        tmp.replace(secret)
        ident._files_checked = 0.0
        f = inner(new_tunnel.client_conn)
        ident.requestheaders(f)
        assert f.response is None
        f = inner(old_tunnel.client_conn)
        ident.requestheaders(f)
        assert rule_of(f) == "identity.key_retired"
        f = connect(mint_token(OLD, "old-agent"))
        ident.http_connect(f)
        assert rule_of(f) == "identity.bad_signature"


def test_a_broken_secret_file_keeps_the_keys_in_force(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("FLEETGATE_JWT_SECRET", raising=False)
    secret = tmp_path / "jwt.secret"
    secret.write_bytes(OLD + b"\n")
    ident = AgentIdentity(GatewayMetrics())
    with taddons.context(ident) as tctx:
        tctx.configure(ident, fleetgate_jwt_secret_file=str(secret))
        secret.write_bytes(b"# emptied by mistake\n")
        ident._files_checked = 0.0
        f = connect(mint_token(OLD, "agent"))
        ident.http_connect(f)
        assert f.response is None  # the previous keys stay; an ERROR line says why


def test_jwks_url_options_are_checked_at_startup(monkeypatch: Any) -> None:
    from mitmproxy import exceptions

    monkeypatch.setenv("FLEETGATE_JWT_SECRET", NEW.decode())  # a valid start to roll back to
    ident = AgentIdentity(GatewayMetrics(), fetcher=FakeIdp().fetcher)
    with taddons.context(ident) as tctx:
        for bad, needle in [
            ({"fleetgate_jwks_url": "http://idp.example/jwks"}, "only accepted to a loopback"),
            ({"fleetgate_jwks_url": "ftp://idp.example/jwks"}, "not an https:// URL"),
            ({"fleetgate_jwks_url": URL, "fleetgate_jwks_max_stale": "1m"}, "longer than"),
            ({"fleetgate_jwks_url": URL, "fleetgate_jwks_refresh": "soon"}, "bad duration"),
        ]:
            with pytest.raises(exceptions.OptionsError, match=needle):
                tctx.configure(ident, **bad)
        tctx.configure(ident, fleetgate_jwks_url="http://127.0.0.1:9/jwks",
                       fleetgate_jwks_max_stale="1h",
                       fleetgate_jwks_refresh="5m")
        assert ident.registry.jwks is not None
        assert ident.registry.jwks.url == "http://127.0.0.1:9/jwks"
