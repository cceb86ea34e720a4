"""The identity registry: the token verifier in force and the tunnels bound to identities.

Credentials arrive on a tunnel's CONNECT only, so the identity verified there is bound to the
client connection and applies to every request inside it. The identity addon writes here
(verifier on configure, bindings on CONNECT); the kill switch reads the bindings to close the
tunnels of a stopped identity, and the control endpoint reads the verifier's HS256 secret to
sign child tokens (the current one: the first in the secret file), and ``/healthz/ready``
reads the JWKS URL's state (``state.jwks``). Nobody reaches into the identity addon for these.

Bindings are weak: a binding disappears with its client connection, so the registry never
keeps a closed connection alive. The connection object is opaque here (mitmproxy's
``connection.Client``; anything hashable and weak-referenceable).
"""

from __future__ import annotations

import weakref
from typing import Any

from fleetgate.identity.tokens import Identity, Verifier
from fleetgate.runtime.jwks_source import JwksSource

__all__ = ["IdentityRegistry"]


class IdentityRegistry:
    def __init__(self) -> None:
        self.verifier: Verifier | None = None
        self.jwks: JwksSource | None = None  # the JWKS URL, when fleetgate_jwks_url names one
        self._bound: weakref.WeakKeyDictionary[object, Identity] = weakref.WeakKeyDictionary()

    # -- verification ------------------------------------------------------------------

    def hs_secret(self) -> bytes | None:
        """The HS256 secret agents' tokens are verified with (``None``: none configured)."""
        return self.verifier.config.hs_secret if self.verifier is not None else None

    def jwks_status(self) -> dict[str, Any]:
        """``state.jwks`` in ``/healthz/ready``: the JWKS URL's keys usable or not, and why
        (unready until its first fetch succeeds; degraded while its keys are stale)."""
        if self.jwks is None:
            return {"ok": True, "url": None}
        return self.jwks.status()

    # -- tunnels bound to identities ---------------------------------------------------

    def bind(self, client: object, ident: Identity) -> None:
        self._bound[client] = ident

    def unbind(self, client: object) -> None:
        self._bound.pop(client, None)

    def bound_to(self, client: object) -> Identity | None:
        return self._bound.get(client)

    def tunnels(self) -> list[tuple[object, Identity]]:
        """A snapshot of every (client connection, identity) binding, safe to edit under."""
        return list(self._bound.items())

    def __len__(self) -> int:
        return len(self._bound)
