"""JWT verification: every failure has a stable code, and no algorithm confusion."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from fleetgate.identity.mint import mint_token, parse_ttl
from fleetgate.identity.tokens import (
    Identity,
    IdentityError,
    Verifier,
    VerifierConfig,
    load_jwks,
    parse_proxy_authorization,
)

SECRET = b"s" * 32
OTHER_SECRET = b"o" * 32


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """Build a token by hand, so PyJWT's own guards cannot stop a hostile one."""
    signing_input = (_b64(json.dumps(header).encode()) + "." +
                     _b64(json.dumps(payload).encode()))
    sig = b"" if hmac_key is None else hmac.new(
        hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(sig)


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "agent-1", "iat": now, "exp": now + 600}
    base.update(extra)
    return base


def code_of(verifier: Verifier, token: str) -> str:
    with pytest.raises(IdentityError) as info:
        verifier.verify(token)
    assert info.value.message
    assert str(info.value) == info.value.message
    return info.value.code


# -- keys ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def _jwk(algorithm: Any, public_key: Any, kid: str, alg: str | None = None) -> dict[str, Any]:
    jwk: dict[str, Any] = algorithm.to_jwk(public_key, as_dict=True)
    jwk["kid"] = kid
    if alg:
        jwk["alg"] = alg
    return jwk


@pytest.fixture(scope="module")
def jwks(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey,
         ed_key: ed25519.Ed25519PrivateKey) -> dict[str, Any]:
    return {"keys": [
        _jwk(RSAAlgorithm, rsa_key.public_key(), "rsa-1", "RS256"),
        _jwk(ECAlgorithm, ec_key.public_key(), "ec-1", "ES256"),
        _jwk(OKPAlgorithm, ed_key.public_key(), "ed-1", "EdDSA"),
    ]}


@pytest.fixture(scope="module")
def rsa_public_pem(rsa_key: rsa.RSAPrivateKey) -> bytes:
    return rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def hs() -> Verifier:
    return Verifier(VerifierConfig(hs_secret=SECRET))


# -- HS256 --------------------------------------------------------------------------------


def test_hs256_happy_path(hs: Verifier) -> None:
    token = jwt.encode(claims(agent_role="security", jti="t-1", session_id="s-9"), SECRET,
                       algorithm="HS256")
    ident = hs.verify(token)
    assert ident.agent == "agent-1"
    assert ident.role == "security"
    assert ident.jti == "t-1"
    assert ident.session == "s-9"
    assert ident.claims["agent_role"] == "security"
    assert ident.exp > time.time()


def test_expired_token(hs: Verifier) -> None:
    now = int(time.time())
    token = jwt.encode(claims(iat=now - 7200, exp=now - 3600), SECRET, algorithm="HS256")
    assert code_of(hs, token) == "expired"


def test_not_yet_valid_token(hs: Verifier) -> None:
    token = jwt.encode(claims(nbf=int(time.time()) + 3600), SECRET, algorithm="HS256")
    assert code_of(hs, token) == "not_yet_valid"


def test_leeway_is_honoured_for_exp() -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 10), SECRET, algorithm="HS256")
    lenient = Verifier(VerifierConfig(hs_secret=SECRET, leeway=30))
    strict = Verifier(VerifierConfig(hs_secret=SECRET, leeway=0))
    assert lenient.verify(token).agent == "agent-1"
    assert code_of(strict, token) == "expired"


def test_leeway_is_honoured_for_nbf() -> None:
    token = jwt.encode(claims(nbf=int(time.time()) + 10), SECRET, algorithm="HS256")
    lenient = Verifier(VerifierConfig(hs_secret=SECRET, leeway=30))
    strict = Verifier(VerifierConfig(hs_secret=SECRET, leeway=0))
    assert lenient.verify(token).agent == "agent-1"
    assert code_of(strict, token) == "not_yet_valid"


def test_default_leeway_is_30_seconds() -> None:
    assert VerifierConfig(hs_secret=SECRET).leeway == 30.0


def test_missing_exp(hs: Verifier) -> None:
    token = jwt.encode({"sub": "agent-1"}, SECRET, algorithm="HS256")
    assert code_of(hs, token) == "missing_claim"


def test_missing_sub(hs: Verifier) -> None:
    token = jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    assert code_of(hs, token) == "missing_claim"


def test_bad_signature(hs: Verifier) -> None:
    token = jwt.encode(claims(), OTHER_SECRET, algorithm="HS256")
    assert code_of(hs, token) == "bad_signature"


def test_tampered_payload_is_a_bad_signature(hs: Verifier) -> None:
    token = jwt.encode(claims(agent_role="general"), SECRET, algorithm="HS256")
    head, _, sig = token.split(".")
    evil = _b64(json.dumps(claims(agent_role="cloud")).encode())
    assert code_of(hs, f"{head}.{evil}.{sig}") == "bad_signature"


@pytest.mark.parametrize("garbage", ["", "not-a-jwt", "a.b.c", "eyJ.eyJ."])
def test_garbage_is_malformed(hs: Verifier, garbage: str) -> None:
    assert code_of(hs, garbage) == "malformed_token"


def test_wrong_issuer() -> None:
    v = Verifier(VerifierConfig(hs_secret=SECRET, issuer=("https://idp.example",)))
    ok = jwt.encode(claims(iss="https://idp.example"), SECRET, algorithm="HS256")
    bad = jwt.encode(claims(iss="https://evil.example"), SECRET, algorithm="HS256")
    assert v.verify(ok).agent == "agent-1"
    assert code_of(v, bad) == "unknown_issuer"


def test_any_of_several_issuers_is_accepted() -> None:
    v = Verifier(VerifierConfig(hs_secret=SECRET, issuer=("https://a", "https://b")))
    assert v.verify(jwt.encode(claims(iss="https://b"), SECRET, algorithm="HS256"))
    assert code_of(v, jwt.encode(claims(iss="https://c"), SECRET, algorithm="HS256")) == (
        "unknown_issuer")


def test_missing_issuer_when_one_is_required() -> None:
    v = Verifier(VerifierConfig(hs_secret=SECRET, issuer=("https://idp.example",)))
    assert code_of(v, jwt.encode(claims(), SECRET, algorithm="HS256")) == "missing_claim"


def test_wrong_audience() -> None:
    v = Verifier(VerifierConfig(hs_secret=SECRET, audience="fleetgate"))
    ok = jwt.encode(claims(aud="fleetgate"), SECRET, algorithm="HS256")
    ok_list = jwt.encode(claims(aud=["other", "fleetgate"]), SECRET, algorithm="HS256")
    bad = jwt.encode(claims(aud="someone-else"), SECRET, algorithm="HS256")
    assert v.verify(ok).agent == "agent-1"
    assert v.verify(ok_list).agent == "agent-1"
    assert code_of(v, bad) == "bad_audience"


def test_audience_not_checked_when_not_configured(hs: Verifier) -> None:
    assert hs.verify(jwt.encode(claims(aud="anything"), SECRET, algorithm="HS256"))


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_rejected(hs: Verifier, alg: str) -> None:
    token = forge({"alg": alg, "typ": "JWT"}, claims(), None)
    assert code_of(hs, token) == "algorithm_not_allowed"


def test_missing_alg_is_rejected(hs: Verifier) -> None:
    token = forge({"typ": "JWT"}, claims(), SECRET)
    assert code_of(hs, token) == "algorithm_not_allowed"


def test_algorithm_outside_the_configured_set_is_rejected() -> None:
    v = Verifier(VerifierConfig(hs_secret=SECRET, algorithms=frozenset({"HS256"})))
    token = jwt.encode(claims(), b"x" * 64, algorithm="HS512")
    assert code_of(v, token) == "algorithm_not_allowed"


def test_forged_token_with_right_secret_verifies(hs: Verifier) -> None:
    # sanity check of the forge() helper used by the confusion tests below
    assert hs.verify(forge({"alg": "HS256", "typ": "JWT"}, claims(), SECRET)).agent == "agent-1"


# -- algorithm confusion -------------------------------------------------------------------


def test_hs256_signed_with_rsa_public_key_rejected_with_jwks_only(
        jwks: dict[str, Any], rsa_public_pem: bytes) -> None:
    v = Verifier(VerifierConfig(jwks=jwks))
    token = forge({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims(), rsa_public_pem)
    assert code_of(v, token) == "algorithm_not_allowed"


def test_hs256_signed_with_rsa_public_key_rejected_with_secret_and_jwks(
        jwks: dict[str, Any], rsa_public_pem: bytes) -> None:
    v = Verifier(VerifierConfig(hs_secret=SECRET, jwks=jwks))
    token = forge({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims(), rsa_public_pem)
    assert code_of(v, token) == "bad_signature"
    # ...while a genuine HS256 token still works on that gateway
    assert v.verify(jwt.encode(claims(), SECRET, algorithm="HS256")).agent == "agent-1"


def test_hs256_signed_with_the_jwk_json_is_rejected(jwks: dict[str, Any]) -> None:
    v = Verifier(VerifierConfig(jwks=jwks))
    token = forge({"alg": "HS256"}, claims(), json.dumps(jwks["keys"][0]).encode())
    assert code_of(v, token) == "algorithm_not_allowed"


# -- asymmetric via JWKS -------------------------------------------------------------------


def test_rs256_via_jwks(jwks: dict[str, Any], rsa_key: rsa.RSAPrivateKey) -> None:
    v = Verifier(VerifierConfig(jwks=jwks))
    token = jwt.encode(claims(agent_role="cloud"), rsa_key, algorithm="RS256",
                       headers={"kid": "rsa-1"})
    ident = v.verify(token)
    assert ident.agent == "agent-1"
    assert ident.role == "cloud"


def test_es256_via_jwks(jwks: dict[str, Any], ec_key: ec.EllipticCurvePrivateKey) -> None:
    v = Verifier(VerifierConfig(jwks=jwks))
    token = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    assert v.verify(token).agent == "agent-1"


def test_eddsa_via_jwks(jwks: dict[str, Any], ed_key: ed25519.Ed25519PrivateKey) -> None:
    v = Verifier(VerifierConfig(jwks=jwks))
    token = jwt.encode(claims(), ed_key, algorithm="EdDSA", headers={"kid": "ed-1"})
    assert v.verify(token).agent == "agent-1"


def test_rs256_signed_by_another_key_is_a_bad_signature(jwks: dict[str, Any]) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    v = Verifier(VerifierConfig(jwks=jwks))
    token = jwt.encode(claims(), other, algorithm="RS256", headers={"kid": "rsa-1"})
    assert code_of(v, token) == "bad_signature"


def test_unknown_kid(jwks: dict[str, Any], rsa_key: rsa.RSAPrivateKey) -> None:
    v = Verifier(VerifierConfig(jwks=jwks))
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "nope"})
    assert code_of(v, token) == "unknown_key"


def test_kid_of_a_key_of_another_type_is_unknown(
        jwks: dict[str, Any], rsa_key: rsa.RSAPrivateKey) -> None:
    v = Verifier(VerifierConfig(jwks=jwks))
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "ec-1"})
    assert code_of(v, token) == "unknown_key"


def test_no_kid_with_a_single_matching_key(jwks: dict[str, Any],
                                           rsa_key: rsa.RSAPrivateKey) -> None:
    v = Verifier(VerifierConfig(jwks=jwks))
    assert v.verify(jwt.encode(claims(), rsa_key, algorithm="RS256")).agent == "agent-1"


def test_no_kid_tries_each_compatible_key(rsa_key: rsa.RSAPrivateKey) -> None:
    """Several keys at once (a rotation): a token without ``kid`` verifies with whichever
    compatible key signed it; one signed by none of them is a bad signature."""
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    v = Verifier(VerifierConfig(jwks={"keys": [
        _jwk(RSAAlgorithm, rsa_key.public_key(), "a", "RS256"),
        _jwk(RSAAlgorithm, other.public_key(), "b", "RS256"),
    ]}))
    first = v.verify(jwt.encode(claims(), rsa_key, algorithm="RS256"))
    second = v.verify(jwt.encode(claims(), other, algorithm="RS256"))
    assert first.agent == second.agent == "agent-1"
    assert first.key != second.key  # which key verified it is remembered
    assert code_of(v, jwt.encode(claims(), stranger, algorithm="RS256")) == "bad_signature"
    good = jwt.encode(claims(), other, algorithm="RS256", headers={"kid": "b"})
    assert v.verify(good).agent == "agent-1"
    wrong_kid = jwt.encode(claims(), other, algorithm="RS256", headers={"kid": "a"})
    assert code_of(v, wrong_kid) == "bad_signature"  # a kid picks its key: no fallback


def test_rs256_token_rejected_by_secret_only_gateway(rsa_key: rsa.RSAPrivateKey) -> None:
    v = Verifier(VerifierConfig(hs_secret=SECRET))
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    assert code_of(v, token) == "unknown_key"


def test_expired_rs256_token(jwks: dict[str, Any], rsa_key: rsa.RSAPrivateKey) -> None:
    now = int(time.time())
    v = Verifier(VerifierConfig(jwks=jwks))
    token = jwt.encode(claims(exp=now - 3600), rsa_key, algorithm="RS256",
                       headers={"kid": "rsa-1"})
    assert code_of(v, token) == "expired"


# -- configuration -------------------------------------------------------------------------


def test_no_key_at_all_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="no verification key"):
        Verifier(VerifierConfig())


@pytest.mark.parametrize("secret", [b"short", b"x" * 31])
def test_short_secret_is_a_value_error(secret: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Verifier(VerifierConfig(hs_secret=secret))


def test_32_byte_secret_is_enough() -> None:
    assert Verifier(VerifierConfig(hs_secret=b"x" * 32))


def test_jwks_with_oct_key_is_a_value_error(jwks: dict[str, Any]) -> None:
    oct_key = {"kty": "oct", "k": _b64(b"k" * 32), "kid": "sym", "alg": "HS256"}
    with pytest.raises(ValueError, match="oct"):
        Verifier(VerifierConfig(jwks={"keys": [*jwks["keys"], oct_key]}))


def test_invalid_jwks_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="JWKS"):
        Verifier(VerifierConfig(jwks={"keys": [{"kty": "RSA", "n": "!!", "e": "AQAB"}]}))


def test_load_jwks_accepts_a_set_or_a_single_key(jwks: dict[str, Any]) -> None:
    assert load_jwks(json.dumps(jwks)) == jwks
    single = jwks["keys"][0]
    assert load_jwks(json.dumps(single)) == {"keys": [single]}
    with pytest.raises(ValueError, match="keys"):
        load_jwks('{"nope": 1}')
    with pytest.raises(ValueError):
        load_jwks("[]")


# -- Proxy-Authorization ------------------------------------------------------------------


def _basic(userpass: str) -> str:
    return "Basic " + base64.b64encode(userpass.encode()).decode()


def test_basic_with_jwt_as_password() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert parse_proxy_authorization(_basic(f"agent:{token}")) == token


def test_basic_password_is_url_decoded() -> None:
    assert parse_proxy_authorization(_basic("agent:a%2Eb%3Ac")) == "a.b:c"


def test_basic_password_may_contain_colons() -> None:
    assert parse_proxy_authorization(_basic("agent:x:y")) == "x:y"


def test_bearer() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert parse_proxy_authorization(f"Bearer {token}") == token
    assert parse_proxy_authorization(f"  bearer   {token}  ") == token


@pytest.mark.parametrize("value", [None, "", "   "])
def test_missing_credentials(value: str | None) -> None:
    with pytest.raises(IdentityError) as info:
        parse_proxy_authorization(value)
    assert info.value.code == "missing_credentials"


@pytest.mark.parametrize(
    "value",
    ["garbage", "Digest abc", "Bearer", "Bearer   ", "Basic", "Basic !!!not-base64!!!",
     "Basic " + base64.b64encode(b"\xff\xfe:x").decode()],
)
def test_malformed_credentials(value: str) -> None:
    with pytest.raises(IdentityError) as info:
        parse_proxy_authorization(value)
    assert info.value.code == "malformed_credentials"


@pytest.mark.parametrize("userpass", ["agent", "agent:", ":"])
def test_basic_without_password(userpass: str) -> None:
    with pytest.raises(IdentityError) as info:
        parse_proxy_authorization(_basic(userpass))
    assert info.value.code == "malformed_credentials"


# -- Identity ------------------------------------------------------------------------------


def test_identity_prefers_agent_id_over_sub() -> None:
    ident = Identity.from_claims({"sub": "user-7", "agent_id": "agent-7", "exp": 10})
    assert ident.agent == "agent-7"
    assert Identity.from_claims({"sub": "user-7", "exp": 10}).agent == "user-7"
    assert Identity.from_claims({"sub": "user-7", "agent_id": "", "exp": 10}).agent == "user-7"


def test_identity_session_from_session_id_or_sid() -> None:
    assert Identity.from_claims({"sub": "a", "exp": 1, "session_id": "s1"}).session == "s1"
    assert Identity.from_claims({"sub": "a", "exp": 1, "sid": "s2"}).session == "s2"
    both = Identity.from_claims({"sub": "a", "exp": 1, "session_id": "s1", "sid": "s2"})
    assert both.session == "s1"
    assert Identity.from_claims({"sub": "a", "exp": 1}).session is None


def test_identity_stringifies_role_session_and_jti() -> None:
    ident = Identity.from_claims({"sub": "a", "exp": 5, "agent_role": 3, "sid": 4, "jti": 7})
    assert (ident.role, ident.session, ident.jti) == ("3", "4", "7")
    assert ident.exp == 5.0


@pytest.mark.parametrize("bad", [{}, {"sub": ""}, {"sub": 5}, {"agent_id": ["x"]}])
def test_identity_without_agent_is_missing_claim(bad: dict[str, Any]) -> None:
    with pytest.raises(IdentityError) as info:
        Identity.from_claims({**bad, "exp": 1})
    assert info.value.code == "missing_claim"


def test_identity_expired_uses_leeway() -> None:
    ident = Identity.from_claims({"sub": "a", "exp": 100})
    assert not ident.expired(100)
    assert ident.expired(101)
    assert not ident.expired(120, leeway=30)
    assert ident.expired(131, leeway=30)


# -- mint ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604800), (" 30s ", 30),
     ("0", 0)],
)
def test_parse_ttl(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("bad", ["", "1w", "h", "-5m", "1.5h", "10 m", "1hm"])
def test_parse_ttl_rejects_garbage(bad: str) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_ttl(bad)


def test_mint_token_round_trips_through_the_verifier() -> None:
    v = Verifier(VerifierConfig(hs_secret=SECRET, issuer=("fleetgate-dev",),
                                audience="fleetgate"))
    token = mint_token(SECRET, "agent-3", ttl=120, claims={"agent_role": "network"},
                       issuer="fleetgate-dev", audience="fleetgate")
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    ident = v.verify(token)
    assert ident.agent == "agent-3"
    assert ident.role == "network"
    assert ident.jti is not None
    assert len(ident.jti) == 32
    assert ident.claims["iss"] == "fleetgate-dev"
    assert ident.claims["aud"] == "fleetgate"


def test_mint_token_times_and_unique_jti() -> None:
    a = jwt.decode(mint_token(SECRET, "x", ttl=60, now=1_000_000), SECRET,
                   algorithms=["HS256"], options={"verify_exp": False})
    b = jwt.decode(mint_token(SECRET, "x", ttl=60, now=1_000_000), SECRET,
                   algorithms=["HS256"], options={"verify_exp": False})
    assert a["iat"] == 1_000_000
    assert a["exp"] == 1_000_060
    assert a["sub"] == "x"
    assert "iss" not in a
    assert "aud" not in a
    assert a["jti"] != b["jti"]


def test_minted_token_expires(hs: Verifier) -> None:
    token = mint_token(SECRET, "x", ttl=60, now=time.time() - 3600)
    assert code_of(hs, token) == "expired"


def test_mint_token_extra_claims_override_defaults() -> None:
    token = mint_token(SECRET, "x", claims={"sub": "y", "agent_id": "z"})
    payload = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert payload["sub"] == "y"
    assert payload["agent_id"] == "z"
