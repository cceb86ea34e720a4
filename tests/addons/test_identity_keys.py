"""AgentIdentity with asymmetric keys: JWKS from a file, picked up again when it rotates."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from mitmproxy.test import taddons, tflow

from fleetgate.addons.identity import AgentIdentity
from fleetgate.addons.state import IDENTITY
from fleetgate.metrics import GatewayMetrics


def jwk(private: Any, kid: str) -> dict[str, Any]:
    pub = private.public_key()
    if isinstance(private, ed25519.Ed25519PrivateKey):
        data = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(pub))
    else:
        data = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(pub))
    data["kid"] = kid
    return data


def connect_flow(token: str) -> Any:
    f = tflow.tflow()
    f.request.method = "CONNECT"
    f.request.headers["Proxy-Authorization"] = "Basic " + base64.b64encode(
        f"agent:{token}".encode()).decode()
    return f


def test_jwks_file_is_reloaded_when_keys_rotate(tmp_path: Path,
                                                monkeypatch: Any) -> None:
    monkeypatch.delenv("FLEETGATE_JWT_SECRET", raising=False)
    old = ec.generate_private_key(ec.SECP256R1())
    new = ed25519.Ed25519PrivateKey.generate()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk(old, "k1")]}))
    claims = {"sub": "rs-agent", "exp": int(time.time()) + 600}
    old_token = jwt.encode(claims, old, algorithm="ES256", headers={"kid": "k1"})
    new_token = jwt.encode(claims, new, algorithm="EdDSA", headers={"kid": "k2"})

    ident = AgentIdentity(GatewayMetrics())
    with taddons.context(ident) as tctx:
        tctx.configure(ident, fleetgate_jwks_file=str(jwks), fleetgate_jwt_secret_env="")
        f = connect_flow(old_token)
        ident.http_connect(f)
        assert f.response is None and f.metadata[IDENTITY]["agent"] == "rs-agent"
        f = connect_flow(new_token)
        ident.http_connect(f)
        assert f.response is not None and f.response.status_code == 407
        assert b"unknown_key" in f.response.content

        tmp = tmp_path / "jwks.tmp"
        tmp.write_text(json.dumps({"keys": [jwk(new, "k2")]}))
        tmp.replace(jwks)  # rotate atomically, as a Secret update does
        ident._files_checked = 0.0  # skip the once-a-second throttle
        f = connect_flow(new_token)
        ident.http_connect(f)
        assert f.response is None and f.metadata[IDENTITY]["agent"] == "rs-agent"
        ident._files_checked = 0.0
        f = connect_flow(old_token)
        ident.http_connect(f)
        assert f.response is not None and f.response.status_code == 407


def test_hs256_token_signed_with_the_public_key_is_rejected(tmp_path: Path,
                                                            monkeypatch: Any) -> None:
    """Algorithm confusion: the JWKS public key used as an HMAC secret must not verify."""
    monkeypatch.delenv("FLEETGATE_JWT_SECRET", raising=False)
    key = ec.generate_private_key(ec.SECP256R1())
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk(key, "k1")]}))
    from cryptography.hazmat.primitives import serialization

    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    import hashlib
    import hmac

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    payload = b64(json.dumps({"sub": "forger", "exp": int(time.time()) + 600}).encode())
    sig = b64(hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    forged = f"{header}.{payload}.{sig}"

    ident = AgentIdentity(GatewayMetrics())
    with taddons.context(ident) as tctx:
        tctx.configure(ident, fleetgate_jwks_file=str(jwks), fleetgate_jwt_secret_env="")
        f = connect_flow(forged)
        ident.http_connect(f)
        assert f.response is not None and f.response.status_code == 407
        assert json.loads(f.response.content)["fleetgate"]["rule"] == \
            "identity.algorithm_not_allowed"
