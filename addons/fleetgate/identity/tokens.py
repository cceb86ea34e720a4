"""Verify an agent's JWT and turn it into an :class:`Identity`.

Why we do not just call ``jwt.decode(token, key, algorithms=[...])``: algorithm confusion.
The key is chosen by the token's ``alg`` *and* must be of the matching kind: HMAC
algorithms only ever use the shared secret, asymmetric ones only keys from the JWKS, so an
RS256 public key can never be used as an HS256 secret and ``alg: none`` is never accepted.
Every failure maps to one :class:`IdentityError` code with a sentence an operator (and the
agent's developer) can act on.

Keys rotate, so several are trusted at once: HS256 tokens verify against the current secret or
any previous one (``hs_previous``), asymmetric tokens against the JWKS file's keys and the keys
last fetched from the JWKS URL (:class:`~fleetgate.identity.remote_keys.RemoteKeys`). A token
with a ``kid`` uses the keys of that id; one without tries each compatible key. The verified
:class:`Identity` remembers *which* key signed it (``Identity.key``, a fingerprint), so a
tunnel opened with a key that is later retired can be refused on its next request
(:meth:`Verifier.check_key`), and URL keys older than their staleness bound are not used.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from jwt import PyJWK, PyJWKSet

from fleetgate.errors import FleetgateError
from fleetgate.identity.remote_keys import RemoteKeys

__all__ = [
    "Identity",
    "IdentityError",
    "Verifier",
    "VerifierConfig",
    "jwk_keys",
    "key_fingerprint",
    "parse_proxy_authorization",
    "parse_secrets",
]

HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})
_HMAC_MIN_KEY = {"HS256": 32, "HS384": 48, "HS512": 64}
ASYMMETRIC_ALGS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class IdentityError(FleetgateError):
    """Credentials are missing or invalid. ``code`` is stable; ``str()`` explains."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Identity:
    """A verified agent identity: the token's claims plus the fields fleetgate keys on."""

    claims: Mapping[str, Any]
    agent: str
    role: str | None
    session: str | None
    jti: str | None
    exp: float
    # fingerprint of the key that verified the token (:func:`key_fingerprint`); ``None``
    # for identities built from claims alone
    key: str | None = None

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> Identity:
        agent = claims.get("agent_id") or claims.get("sub")
        if not isinstance(agent, str) or not agent:
            raise IdentityError("missing_claim", "token has no 'sub' (or 'agent_id') claim")
        role = claims.get("agent_role")
        session = claims.get("session_id", claims.get("sid"))
        jti = claims.get("jti")
        return cls(
            claims=dict(claims),
            agent=agent,
            role=str(role) if role is not None else None,
            session=str(session) if session is not None else None,
            jti=str(jti) if jti is not None else None,
            exp=float(claims["exp"]),
        )

    def expired(self, now: float, leeway: float = 0.0) -> bool:
        return now > self.exp + leeway


@dataclass(frozen=True)
class VerifierConfig:
    """How tokens are verified. ``hs_secret`` and/or ``jwks`` (or a remote JWKS) must be given.

    ``hs_secret`` is the current HS256 secret (the one tokens are signed with);
    ``hs_previous`` are older ones still accepted while agents' tokens signed with them live.
    """

    hs_secret: bytes | None = None
    jwks: Mapping[str, Any] | None = None
    hs_previous: tuple[bytes, ...] = ()
    issuer: tuple[str, ...] = ()
    audience: str | None = None
    leeway: float = 30.0
    # A token is parsed (base64, JSON) before its signature can be checked: bound what an
    # unauthenticated client can make the gateway decode. Real agent tokens are < 2 KB.
    max_bytes: int = 8192
    algorithms: frozenset[str] = field(default_factory=lambda: HMAC_ALGS | ASYMMETRIC_ALGS)


class Verifier:
    """Verifies tokens against one :class:`VerifierConfig` and one snapshot of the JWKS URL's
    keys. Immutable: build a new one when keys change (file re-read, URL refreshed)."""

    def __init__(self, config: VerifierConfig, remote: RemoteKeys | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if config.hs_previous and config.hs_secret is None:
            raise ValueError("previous HS256 secrets need a current one")
        if not config.hs_secret and not config.jwks and remote is None:
            raise ValueError("no verification key: give an HS256 secret, a JWKS file or a "
                             "JWKS URL")
        secrets = ([config.hs_secret] if config.hs_secret is not None else [])
        secrets += list(config.hs_previous)
        for s in secrets:
            if len(s) < 32:
                raise ValueError("HS256 secret must be at least 32 bytes")
        self.config = config
        self.remote = remote
        self.clock = clock
        self._secrets = [(s, key_fingerprint(s)) for s in secrets]
        self._file_keys = jwk_keys(config.jwks) if config.jwks else []
        self._remote_keys = jwk_keys(remote.jwks) if remote is not None and remote.jwks else []
        self._hs_fps = frozenset(fp for _, fp in self._secrets)
        self._file_fps = frozenset(fp for _, fp in self._file_keys)
        self._remote_fps = frozenset(fp for _, fp in self._remote_keys)

    def verify(self, token: str) -> Identity:
        """Return the identity in ``token`` or raise :class:`IdentityError`."""
        if len(token) > self.config.max_bytes:
            raise _too_large(self.config.max_bytes)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise IdentityError("malformed_token", "credential is not a JWT") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.config.algorithms:
            raise IdentityError("algorithm_not_allowed", f"token algorithm {alg!r} is not allowed")
        candidates: list[tuple[Any, str]]
        if alg in HMAC_ALGS:
            # no secret, or one too short for this hash (RFC 7518 3.2): the secret never
            # verifies a token of another kind, and a JWKS key never verifies an HMAC one
            candidates = [(s, fp) for s, fp in self._secrets if len(s) >= _HMAC_MIN_KEY[alg]]
            if not candidates:
                raise IdentityError(
                    "algorithm_not_allowed", f"{alg} tokens are not accepted by this gateway"
                )
        else:
            candidates = self._pick_keys(alg, header.get("kid"))
        for i, (key, fp) in enumerate(candidates):
            try:
                claims = self._decode(token, key, alg)
            except IdentityError as err:
                # a signature that does not verify may verify with the next key; any other
                # failure means this key verified the signature: it is the answer
                if err.code == "bad_signature" and i + 1 < len(candidates):
                    continue
                raise
            return replace(Identity.from_claims(claims), key=fp)
        raise AssertionError("unreachable: candidates is never empty")  # pragma: no cover

    def check_key(self, ident: Identity) -> None:
        """Raise :class:`IdentityError` unless the key that verified ``ident`` is still trusted
        (a tunnel bound to it is re-checked on each request): ``key_retired`` when rotated out,
        the remote's error when it came from a JWKS URL that is now too stale."""
        fp = ident.key
        if fp is None or fp in self._hs_fps or fp in self._file_fps:
            return
        if fp in self._remote_fps:
            assert self.remote is not None
            err = self.remote.unusable(self.clock())
            if err is not None:
                raise IdentityError(*err)
            return
        raise IdentityError(
            "key_retired", "the key that signed this tunnel's token is no longer trusted "
                           "(rotated out); reconnect with a token signed by a current key")

    def _decode(self, token: str, key: Any, alg: str) -> dict[str, Any]:
        cfg = self.config
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=cfg.audience,
                issuer=list(cfg.issuer) if cfg.issuer else None,
                leeway=cfg.leeway,
                options={
                    "require": ["exp"],
                    "verify_aud": cfg.audience is not None,
                    "verify_iat": False,
                },
            )
        except jwt.ExpiredSignatureError:
            raise IdentityError("expired", "token has expired; mint a new one") from None
        except jwt.ImmatureSignatureError:
            raise IdentityError("not_yet_valid", "token is not valid yet (nbf in the future)") from None
        except jwt.InvalidIssuerError:
            raise IdentityError("unknown_issuer", "token issuer is not trusted") from None
        except jwt.InvalidAudienceError:
            raise IdentityError(
                "bad_audience", f"token audience does not include {cfg.audience!r}"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise IdentityError("missing_claim", f"token has no {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise IdentityError("bad_signature", "token signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise IdentityError("invalid_token", f"token is invalid: {exc}") from None
        if cfg.issuer and "iss" not in claims:
            raise IdentityError("missing_claim", "token has no 'iss' claim")
        # jwt.decode's leeway applies to exp; our Identity keeps exp for per-request checks.
        return claims

    def _pick_keys(self, alg: str, kid: object) -> list[tuple[Any, str]]:
        """The keys that may verify an ``alg`` token with ``kid`` (every compatible one when
        the token names none), file keys first. Raises ``unknown_key``, or the JWKS URL's
        error when only its (unusable) keys could have matched."""
        keys = list(self._file_keys)
        remote_error = None
        if self.remote is not None:
            remote_error = self.remote.unusable(self.clock())
            if remote_error is None:
                keys += self._remote_keys
        candidates = [(k, fp) for k, fp in keys if _compatible(k, alg)]
        if kid is not None:
            candidates = [(k, fp) for k, fp in candidates if k.key_id == kid]
        if not candidates:
            if remote_error is not None:
                raise IdentityError(*remote_error)
            raise IdentityError("unknown_key", f"no trusted {alg} key for kid {kid!r}")
        return [(k.key, fp) for k, fp in candidates]


def jwk_keys(jwks: Mapping[str, Any]) -> list[tuple[PyJWK, str]]:
    """The public keys of a JWKS document with their fingerprints; ``ValueError`` when it is
    invalid or holds a symmetric key (a JWKS is public: an ``oct`` key in it is a leak)."""
    try:
        keys = list(PyJWKSet.from_dict(dict(jwks)).keys)
    except jwt.PyJWTError as exc:
        raise ValueError(f"JWKS is invalid: {exc}") from None
    for key in keys:
        if key.algorithm_name in HMAC_ALGS:
            raise ValueError("JWKS must hold public keys only, not symmetric ('oct') keys")
    return [(k, key_fingerprint(k)) for k in keys]


def key_fingerprint(key: bytes | PyJWK) -> str:
    """A short, non-reversible name for a key: which one verified a tunnel's token (logged
    and compared, never the key). SHA-256 of the secret, or of the public key's DER."""
    if isinstance(key, bytes):
        return "hs:" + hashlib.sha256(key).hexdigest()[:16]
    try:
        der = key.key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    except (AttributeError, ValueError):  # pragma: no cover - every PyJWK public key has it
        der = json.dumps(getattr(key, "_jwk_data", {}), sort_keys=True).encode()
    return "pk:" + hashlib.sha256(der).hexdigest()[:16]


def parse_secrets(data: bytes) -> tuple[bytes, ...]:
    """The HS256 secrets in a secret file (or variable): one per line, the first is the
    current one (tokens are signed with it), the others previous ones (still accepted).
    Blank lines and lines starting with ``#`` are skipped; surrounding spaces are not part
    of a secret. ``ValueError`` when there is none."""
    out = tuple(s for line in data.splitlines()
                if (s := line.strip()) and not s.startswith(b"#"))
    if not out:
        raise ValueError("no HS256 secret in it (one secret per line, the current one first)")
    return out


def _compatible(key: PyJWK, alg: str) -> bool:
    """The key may verify ``alg``: right key type, and its own ``alg`` (if declared) matches."""
    data = getattr(key, "_jwk_data", {})
    if data.get("alg") and data["alg"] != alg:
        return False
    kty = data.get("kty")
    if alg.startswith(("RS", "PS")):
        return bool(kty == "RSA")
    if alg.startswith("ES"):
        return bool(kty == "EC")
    if alg == "EdDSA":
        return bool(kty == "OKP")
    return False


def _too_large(limit: int) -> IdentityError:
    return IdentityError("too_large", f"token is larger than {limit} bytes "
                                      "(fleetgate_jwt_max_bytes)")


def parse_proxy_authorization(value: str | None, max_bytes: int | None = None) -> str:
    """Extract the JWT from a ``Proxy-Authorization`` header value.

    Accepts ``Bearer <jwt>`` and ``Basic base64(user:<jwt>)`` (what
    ``HTTPS_PROXY=http://agent:<jwt>@gateway:8080`` makes clients send). Raises
    :class:`IdentityError` when the header is absent or malformed, or (``max_bytes``) when
    it cannot hold a token of at most that size, before anything is decoded.
    """
    if max_bytes is not None and value and len(value) > 64 + (max_bytes + 2) // 3 * 4:
        raise _too_large(max_bytes)  # what base64 of user:<token> can take, and some
    if not value or not value.strip():
        raise IdentityError(
            "missing_credentials",
            "no proxy credentials: set HTTPS_PROXY=http://agent:<JWT>@<gateway>:<port>",
        )
    scheme, _, rest = value.strip().partition(" ")
    rest = rest.strip()
    if scheme.lower() == "bearer" and rest:
        return rest
    if scheme.lower() == "basic" and rest:
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise IdentityError("malformed_credentials", "Basic credentials are not base64") from None
        _, sep, password = decoded.partition(":")
        if not sep or not password:
            raise IdentityError(
                "malformed_credentials", "Basic credentials carry no password (the JWT goes there)"
            )
        from urllib.parse import unquote

        return unquote(password)
    raise IdentityError(
        "malformed_credentials", "Proxy-Authorization must be 'Basic' (user:<JWT>) or 'Bearer <JWT>'"
    )


def load_jwks(text: str) -> dict[str, Any]:
    """Parse a JWKS document (``{"keys": [...]}``), or a single JWK, as JSON."""
    data = json.loads(text)
    if isinstance(data, dict) and "keys" not in data and "kty" in data:
        data = {"keys": [data]}
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("JWKS must be a JSON object with a 'keys' list")
    return data
