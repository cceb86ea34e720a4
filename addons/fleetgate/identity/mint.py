"""Mint development tokens (``fleetgate token mint``). Production tokens come from your IdP."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

import jwt

from fleetgate.durations import parse_duration

__all__ = ["mint_token", "parse_ttl"]

# ``--ttl 15m``: the one durations parser (kept under its old name for the CLI).
parse_ttl = parse_duration


def mint_token(
    secret: bytes,
    sub: str,
    ttl: int = 3600,
    claims: Mapping[str, Any] | None = None,
    issuer: str | None = None,
    audience: str | None = None,
    now: float | None = None,
) -> str:
    """An HS256 token for ``sub`` valid ``ttl`` seconds, with a fresh ``jti``."""
    now = time.time() if now is None else now
    payload: dict[str, Any] = {"sub": sub, "iat": int(now), "exp": int(now) + ttl,
                               "jti": uuid.uuid4().hex}
    if issuer:
        payload["iss"] = issuer
    if audience:
        payload["aud"] = audience
    payload.update(claims or {})
    return jwt.encode(payload, secret, algorithm="HS256")
