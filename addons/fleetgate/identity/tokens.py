"""Verify an agent's JWT and turn it into an :class:`Identity`.

Why we do not just call ``jwt.decode(token, key, algorithms=[...])``: algorithm confusion.
The key is chosen by the token's ``alg`` *and* must be of the matching kind: HMAC
algorithms only ever use the shared secret, asymmetric ones only keys from the JWKS, so an
RS256 public key can never be used as an HS256 secret and ``alg: none`` is never accepted.
Every failure maps to one :class:`IdentityError` code with a sentence an operator (and the
agent's developer) can act on.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from jwt import PyJWK, PyJWKSet

from fleetgate.errors import FleetgateError

__all__ = [
    "Identity",
    "IdentityError",
    "Verifier",
    "VerifierConfig",
    "parse_proxy_authorization",
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
    """How tokens are verified. ``hs_secret`` and/or ``jwks`` must be given."""

    hs_secret: bytes | None = None
    jwks: Mapping[str, Any] | None = None
    issuer: tuple[str, ...] = ()
    audience: str | None = None
    leeway: float = 30.0
    # A token is parsed (base64, JSON) before its signature can be checked: bound what an
    # unauthenticated client can make the gateway decode. Real agent tokens are < 2 KB.
    max_bytes: int = 8192
    algorithms: frozenset[str] = field(default_factory=lambda: HMAC_ALGS | ASYMMETRIC_ALGS)


class Verifier:
    """Verifies tokens against one :class:`VerifierConfig`. Build a new one to change keys."""

    def __init__(self, config: VerifierConfig) -> None:
        if not config.hs_secret and not config.jwks:
            raise ValueError("no verification key: give an HS256 secret or a JWKS")
        if config.hs_secret is not None and len(config.hs_secret) < 32:
            raise ValueError("HS256 secret must be at least 32 bytes")
        self.config = config
        self._keys: list[PyJWK] = []
        if config.jwks:
            try:
                self._keys = list(PyJWKSet.from_dict(dict(config.jwks)).keys)
            except jwt.PyJWTError as exc:
                raise ValueError(f"JWKS is invalid: {exc}") from None
            for key in self._keys:
                if key.algorithm_name in HMAC_ALGS:
                    raise ValueError("JWKS must hold public keys only, not symmetric ('oct') keys")

    def verify(self, token: str) -> Identity:
        """Return the identity in ``token`` or raise :class:`IdentityError` (wall clock)."""
        if len(token) > self.config.max_bytes:
            raise _too_large(self.config.max_bytes)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise IdentityError("malformed_token", "credential is not a JWT") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.config.algorithms:
            raise IdentityError("algorithm_not_allowed", f"token algorithm {alg!r} is not allowed")
        key: Any
        if alg in HMAC_ALGS:
            if not self.config.hs_secret or len(self.config.hs_secret) < _HMAC_MIN_KEY[alg]:
                # no secret, or one too short for this hash (RFC 7518 3.2)
                raise IdentityError(
                    "algorithm_not_allowed", f"{alg} tokens are not accepted by this gateway"
                )
            key = self.config.hs_secret
        else:
            key = self._pick_key(alg, header.get("kid"))
        cfg = self.config
        try:
            claims = jwt.decode(
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
        return Identity.from_claims(claims)

    def _pick_key(self, alg: str, kid: object) -> Any:
        candidates = [k for k in self._keys if _compatible(k, alg)]
        if kid is not None:
            candidates = [k for k in candidates if k.key_id == kid]
        elif len(candidates) > 1:
            raise IdentityError("unknown_key", "token has no 'kid' and several keys could match")
        if not candidates:
            raise IdentityError("unknown_key", f"no trusted {alg} key for kid {kid!r}")
        return candidates[0].key


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
