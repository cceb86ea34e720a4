"""The console's sessions: signed cookies, CSRF tokens and flash messages. No I/O.

A session cookie is ``<payload>.<mac>``, both base64url: the payload is JSON
``{"o": operator name, "e": expiry (epoch s), "n": random nonce, "b": credential binding}``
and the MAC is HMAC-SHA256 over the payload under a key drawn at random when the process
starts (a restart ends every session; each replica signs its own). The admin token never
leaves the login form: ``b`` is an HMAC of the token's SHA-256, so a session ends when its
operator's token is rotated or the operator leaves the users file, as the admin API would
refuse the new request.

A form's CSRF token is an HMAC of the session's nonce: bound to one session, useless in
another, checked in constant time. Flash messages (what the last POST did) ride in a second
signed cookie rather than the URL, so a link cannot put words in the console's mouth.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["COOKIE", "FLASH_COOKIE", "LIFETIME", "Flash", "Session", "Signer"]

COOKIE = "fleetgate_console"
FLASH_COOKIE = "fleetgate_console_flash"
LIFETIME = 8 * 3600.0  # a shift
FLASH_LIFETIME = 120.0
MAX_COOKIE = 4096


@dataclass(frozen=True)
class Session:
    """A verified session: whose, until when, and its CSRF nonce and credential binding."""

    operator: str
    expires: float
    nonce: str
    binding: str


@dataclass(frozen=True)
class Flash:
    """The outcome of the last POST, shown once on the next page."""

    text: str
    ok: bool


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Signs and verifies the console's cookies with one key (random unless given)."""

    def __init__(self, key: bytes | None = None, clock: Callable[[], float] = time.time,
                 lifetime: float = LIFETIME) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)
        self.clock = clock
        self.lifetime = lifetime

    def _mac(self, purpose: str, data: bytes) -> bytes:
        return hmac.new(self._key, purpose.encode() + b"\0" + data, hashlib.sha256).digest()

    def _seal(self, purpose: str, doc: dict[str, Any]) -> str:
        payload = _b64(json.dumps(doc, separators=(",", ":"), sort_keys=True).encode())
        return payload + "." + _b64(self._mac(purpose, payload.encode()))

    def _open(self, purpose: str, value: str | None) -> dict[str, Any] | None:
        if not value or len(value) > MAX_COOKIE or value.count(".") != 1:
            return None
        payload, mac = value.split(".")
        try:
            given = _unb64(mac)
            doc = json.loads(_unb64(payload))
        except (ValueError, binascii.Error):
            return None
        if not hmac.compare_digest(given, self._mac(purpose, payload.encode())):
            return None
        return doc if isinstance(doc, dict) else None

    # -- sessions ------------------------------------------------------------------------

    def binding(self, credential_sha256: str) -> str:
        """What a session remembers of the credential it was opened with (not the hash
        itself: an HMAC of it under the process key)."""
        return _b64(self._mac("bind", credential_sha256.encode()))[:22]

    def issue(self, operator: str, credential_sha256: str) -> tuple[str, Session]:
        """A new session cookie value for ``operator``, opened with the credential whose
        SHA-256 is given."""
        s = Session(operator, self.clock() + self.lifetime, secrets.token_urlsafe(16),
                    self.binding(credential_sha256))
        return self._seal("session", {"o": s.operator, "e": s.expires, "n": s.nonce,
                                      "b": s.binding}), s

    def verify(self, value: str | None) -> Session | None:
        """The session in a cookie value; ``None`` when forged, malformed or expired."""
        doc = self._open("session", value)
        if doc is None:
            return None
        name, exp, nonce, bind = doc.get("o"), doc.get("e"), doc.get("n"), doc.get("b")
        if (not isinstance(name, str) or not name or isinstance(exp, bool)
                or not isinstance(exp, int | float) or not isinstance(nonce, str) or not nonce
                or not isinstance(bind, str)):
            return None
        if self.clock() >= exp:
            return None
        return Session(name, float(exp), nonce, bind)

    def csrf(self, session: Session) -> str:
        return _b64(self._mac("csrf", session.nonce.encode()))

    def check_csrf(self, session: Session, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(str(given).encode(),
                                                   self.csrf(session).encode())

    # -- flash messages --------------------------------------------------------------------

    def flash(self, text: str, ok: bool, session: Session) -> str:
        """A flash cookie value, readable only within ``session`` for a short while."""
        return self._seal("flash", {"t": text[:2000], "k": ok, "n": session.nonce,
                                    "e": self.clock() + FLASH_LIFETIME})

    def read_flash(self, value: str | None, session: Session) -> Flash | None:
        doc = self._open("flash", value)
        if doc is None or doc.get("n") != session.nonce:
            return None
        exp = doc.get("e")
        if not isinstance(exp, int | float) or self.clock() >= exp:
            return None
        return Flash(str(doc.get("t") or ""), bool(doc.get("k")))
