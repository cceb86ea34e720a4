"""Mint development tokens (``fleetgate token mint``). Production tokens come from your IdP."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

import jwt

__all__ = ["mint_token", "parse_ttl"]

_TTL = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """``90`` / ``90s`` / ``15m`` / ``1h`` / ``7d`` -> seconds."""
    m = _TTL.match(text.strip())
    if not m:
        raise ValueError(f"bad duration {text!r}: use e.g. 30s, 15m, 1h, 7d")
    return int(m.group(1)) * _UNITS[m.group(2)]


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
