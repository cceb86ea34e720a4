"""Keys that rotate: several at once, HS256 current + previous, a JWKS URL's schedule and
staleness bound (clock injected), and a tunnel's key re-checked after rotation."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from fleetgate.identity.mint import mint_token
from fleetgate.identity.remote_keys import (
    MAX_RETRY,
    JwksSchedule,
    RefreshPolicy,
    RemoteKeys,
    cache_max_age,
)
from fleetgate.identity.tokens import IdentityError, Verifier, VerifierConfig, parse_secrets

OLD = b"old-secret-0123456789abcdef0123456789"
NEW = b"new-secret-0123456789abcdef0123456789"
URL = "https://idp.example/.well-known/jwks.json"
T0 = 1_800_000_000.0


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk["kid"] = kid
    return jwk


def es256(key: ec.EllipticCurvePrivateKey, kid: str | None, sub: str = "a1") -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "exp": now + 600}, key, algorithm="ES256",
                      headers={"kid": kid} if kid else None)


def code(verifier: Verifier, token: str) -> str:
    with pytest.raises(IdentityError) as info:
        verifier.verify(token)
    return info.value.code


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def k1() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def k2() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# -- HS256: current and previous secrets -------------------------------------------------


def test_secret_file_lists_current_first_and_skips_comments_and_blanks() -> None:
    text = b"# rotated 2025-06-01\n" + NEW + b"\n\n  " + OLD + b"  \n# end\n"
    assert parse_secrets(text) == (NEW, OLD)
    assert parse_secrets(OLD + b"\n") == (OLD,)  # the one-secret file of before still works
    with pytest.raises(ValueError, match="no HS256 secret"):
        parse_secrets(b"# nothing\n\n")


def test_previous_secret_still_verifies_and_current_signs() -> None:
    v = Verifier(VerifierConfig(hs_secret=NEW, hs_previous=(OLD,)))
    old = v.verify(mint_token(OLD, "old-agent"))
    new = v.verify(mint_token(NEW, "new-agent"))
    assert (old.agent, new.agent) == ("old-agent", "new-agent")
    assert old.key != new.key and old.key and new.key
    assert code(v, mint_token(b"x" * 40, "forger")) == "bad_signature"
    assert v.config.hs_secret == NEW  # what delegation and `token mint` sign with


def test_dropping_the_previous_secret_retires_its_tunnels() -> None:
    both = Verifier(VerifierConfig(hs_secret=NEW, hs_previous=(OLD,)))
    old_ident = both.verify(mint_token(OLD, "old-agent"))
    new_ident = both.verify(mint_token(NEW, "new-agent"))
    both.check_key(old_ident)
    only_new = Verifier(VerifierConfig(hs_secret=NEW))
    only_new.check_key(new_ident)
    with pytest.raises(IdentityError) as info:
        only_new.check_key(old_ident)
    assert info.value.code == "key_retired" and "reconnect" in info.value.message
    assert code(only_new, mint_token(OLD, "old-agent")) == "bad_signature"


def test_every_secret_must_be_long_enough() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Verifier(VerifierConfig(hs_secret=NEW, hs_previous=(b"short",)))
    with pytest.raises(ValueError, match="need a current one"):
        Verifier(VerifierConfig(hs_previous=(OLD,)))


# -- several asymmetric keys, by kid or tried in turn ------------------------------------


def test_file_and_url_keys_are_both_trusted(k1: Any, k2: Any) -> None:
    remote = RemoteKeys(URL, 3600, {"keys": [ec_jwk(k2, "url-key")]}, fetched_at=T0)
    v = Verifier(VerifierConfig(jwks={"keys": [ec_jwk(k1, "file-key")]}), remote=remote,
                 clock=Clock())
    assert v.verify(es256(k1, "file-key")).agent == "a1"
    assert v.verify(es256(k2, "url-key")).agent == "a1"
    assert v.verify(es256(k2, None)).agent == "a1"  # no kid: each compatible key is tried
    assert code(v, es256(k2, "file-key")) == "bad_signature"
    assert code(v, es256(k1, "nope")) == "unknown_key"


# -- the JWKS URL: stale past a bound fails closed -----------------------------------------


def test_url_keys_never_fetched_are_unavailable_naming_the_url(k1: Any) -> None:
    v = Verifier(VerifierConfig(), remote=RemoteKeys(URL, 3600, error="connection refused"),
                 clock=Clock())
    with pytest.raises(IdentityError) as info:
        v.verify(es256(k1, "k1"))
    assert info.value.code == "jwks_unavailable"
    assert URL in info.value.message and "connection refused" in info.value.message


def test_url_keys_older_than_max_stale_are_refused_then_accepted_again(k1: Any) -> None:
    clock = Clock()
    jwks = {"keys": [ec_jwk(k1, "k1")]}
    fresh = RemoteKeys(URL, 3600, jwks, fetched_at=T0, error="timed out")
    v = Verifier(VerifierConfig(hs_secret=NEW), remote=fresh, clock=clock)
    ident = v.verify(es256(k1, "k1"))
    clock.now = T0 + 3600  # exactly the bound: still usable
    assert v.verify(es256(k1, "k1")).agent == "a1"
    clock.now = T0 + 3601
    with pytest.raises(IdentityError) as info:
        v.verify(es256(k1, "k1"))
    assert info.value.code == "jwks_stale"
    assert URL in info.value.message and "3601s ago" in info.value.message
    assert "timed out" in info.value.message
    with pytest.raises(IdentityError) as info:  # the tunnel bound with that key too
        v.check_key(ident)
    assert info.value.code == "jwks_stale"
    assert v.verify(mint_token(NEW, "hs-agent")).agent == "hs-agent"  # HS256 unaffected
    refetched = Verifier(VerifierConfig(hs_secret=NEW),
                         remote=RemoteKeys(URL, 3600, jwks, fetched_at=clock.now), clock=clock)
    assert refetched.verify(es256(k1, "k1")).agent == "a1"
    refetched.check_key(ident)


def test_a_key_removed_from_the_url_retires_bound_tunnels(k1: Any, k2: Any) -> None:
    clock = Clock()
    both = Verifier(VerifierConfig(), clock=clock, remote=RemoteKeys(
        URL, 3600, {"keys": [ec_jwk(k1, "old"), ec_jwk(k2, "new")]}, fetched_at=T0))
    old_ident, new_ident = both.verify(es256(k1, "old")), both.verify(es256(k2, "new"))
    after = Verifier(VerifierConfig(), clock=clock, remote=RemoteKeys(
        URL, 3600, {"keys": [ec_jwk(k2, "new")]}, fetched_at=T0 + 300))
    after.check_key(new_ident)
    with pytest.raises(IdentityError) as info:
        after.check_key(old_ident)
    assert info.value.code == "key_retired"
    assert code(after, es256(k1, "old")) == "unknown_key"


# -- the schedule ----------------------------------------------------------------------


def test_refresh_interval_honours_a_shorter_max_age_within_bounds() -> None:
    s = JwksSchedule(URL, RefreshPolicy(refresh=300, max_stale=3600))
    assert s.interval(None) == 300
    assert s.interval(120) == 120
    assert s.interval(86400) == 300  # never longer than the operator's interval
    assert s.interval(0) == 30  # no-store cannot make us fetch on every token
    fast = JwksSchedule(URL, RefreshPolicy(refresh=2, max_stale=10))
    assert fast.interval(0) == 2 and fast.interval(60) == 2


def test_cache_control_parsing() -> None:
    assert cache_max_age("public, max-age=600") == 600
    assert cache_max_age('max-age="60", must-revalidate') == 60
    assert cache_max_age("no-store") == 0
    assert cache_max_age("private, no-cache") == 0
    assert cache_max_age("s-maxage=5") is None
    assert cache_max_age(None) is None and cache_max_age("") is None


def test_failures_keep_the_keys_and_back_off() -> None:
    s = JwksSchedule(URL, RefreshPolicy(refresh=300, max_stale=3600))
    assert s.delay(T0) < 0  # the first fetch is due at once
    s.succeeded({"keys": []}, None, T0)
    assert s.delay(T0) == 300
    waits = []
    for i in range(10):
        s.failed("connection refused", T0 + i)
        waits.append(s.next_at - (T0 + i))
    assert waits[:4] == [1, 2, 4, 8] and max(waits) == MAX_RETRY
    assert s.keys.jwks == {"keys": []} and s.keys.fetched_at == T0
    assert s.keys.error == "connection refused"
    s.succeeded({"keys": []}, None, T0 + 100)
    assert s.failures == 0 and s.keys.error is None and s.delay(T0 + 100) == 300


def test_unknown_kid_refetches_are_rate_limited() -> None:
    s = JwksSchedule(URL, RefreshPolicy(refresh=300, max_stale=3600, kid_refetch=30))
    assert s.kid_refetch(T0) is True
    assert [s.kid_refetch(T0 + d) for d in (0, 1, 29.9)] == [False, False, False]
    assert s.kid_refetch(T0 + 30) is True


def test_status_is_unready_until_the_first_fetch_then_degraded_when_stale() -> None:
    s = JwksSchedule(URL, RefreshPolicy(refresh=300, max_stale=3600))
    st = s.status(T0)
    assert st["ok"] is False and st["ready"] is False and st["code"] == "jwks_unavailable"
    s.succeeded({"keys": [{"kty": "EC"}]}, None, T0)
    st = s.status(T0 + 10)
    assert st["ok"] is True and "ready" not in st and st["age_seconds"] == 10
    assert st["keys"] == 1 and st["url"] == URL
    st = s.status(T0 + 3700)
    assert st["ok"] is False and "ready" not in st and st["code"] == "jwks_stale"


def test_max_stale_must_exceed_refresh() -> None:
    with pytest.raises(ValueError, match="must be longer than"):
        RefreshPolicy(refresh=600, max_stale=300)
    with pytest.raises(ValueError, match="must be > 0"):
        RefreshPolicy(refresh=0, max_stale=300)


# -- the CLI signs with the current secret ----------------------------------------------


def test_token_mint_signs_with_the_first_secret_of_the_file(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from fleetgate.cli import main

    secret = tmp_path / "jwt.secret"
    secret.write_bytes(b"# current first\n" + NEW + b"\n" + OLD + b"\n")
    assert main(["token", "mint", "--sub", "a1", "--secret-file", str(secret)]) == 0
    tok = capsys.readouterr().out.strip()
    assert jwt.decode(tok, NEW, algorithms=["HS256"])["sub"] == "a1"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(tok, OLD, algorithms=["HS256"])
    secret.write_bytes(b"# emptied\n")
    assert main(["token", "mint", "--sub", "a1", "--secret-file", str(secret)]) == 2
    assert "no HS256 secret" in capsys.readouterr().err
