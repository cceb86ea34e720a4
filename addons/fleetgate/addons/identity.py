"""AgentIdentity: who is this? Verifies the JWT in the proxy credentials.

Credentials arrive on the CONNECT request only (``HTTPS_PROXY=http://agent:<JWT>@...``),
so the verified identity is bound to the client connection and applies to every request
inside that tunnel; the token's expiry is re-checked on each of them. Plain-HTTP proxy
requests carry their own ``Proxy-Authorization``. The credential header is always removed
before anything is forwarded: it never reaches an upstream. Two ``Proxy-Authorization``
headers are refused (``identity.ambiguous``): which one is "the" identity would depend on
the reader. Tokens are bounded (``fleetgate_jwt_max_bytes``, ``identity.too_large``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http

from fleetgate.addons.flowtools import deny, fail_closed, settled
from fleetgate.addons.state import decision_id, set_identity
from fleetgate.identity.tokens import (
    Identity,
    IdentityError,
    Verifier,
    VerifierConfig,
    load_jwks,
    parse_proxy_authorization,
)
from fleetgate.metrics import GatewayMetrics
from fleetgate.runtime.identity import IdentityRegistry

log = logging.getLogger(__name__)

REALM = 'Basic realm="fleetgate", Bearer realm="fleetgate"'


class AgentIdentity:
    """Writes the verifier and the tunnels' identities to the :class:`IdentityRegistry` it is
    handed (a fresh one when none is: a stand-alone addon)."""

    def __init__(self, metrics: GatewayMetrics, registry: IdentityRegistry | None = None) -> None:
        self.metrics = metrics
        self.registry = registry if registry is not None else IdentityRegistry()
        self._jwks_stat: tuple[int, int] | None = None
        self._jwks_checked = 0.0

    def load(self, loader: Any) -> None:
        loader.add_option("fleetgate_jwt_secret_file", str, "",
                          "File holding the HS256 secret agents' tokens are signed with.")
        loader.add_option("fleetgate_jwt_secret_env", str, "FLEETGATE_JWT_SECRET",
                          "Environment variable holding the HS256 secret (used when "
                          "fleetgate_jwt_secret_file is empty).")
        loader.add_option("fleetgate_jwks_file", str, "",
                          "JWKS file with the public keys for RS256/ES256/EdDSA tokens; "
                          "re-read when it changes.")
        loader.add_option("fleetgate_jwt_issuer", str, "",
                          "Accepted 'iss' values, comma-separated (empty: not checked).")
        loader.add_option("fleetgate_jwt_audience", str, "",
                          "Required 'aud' value (empty: not checked).")
        loader.add_option("fleetgate_jwt_leeway", int, 30,
                          "Clock skew tolerated on exp/nbf, in seconds.")
        loader.add_option("fleetgate_jwt_max_bytes", int, 8192,
                          "Largest agent token accepted, in bytes; a larger one is refused "
                          "with 407 identity.too_large before it is decoded.")

    def configure(self, updated: set[str]) -> None:
        if any(k.startswith("fleetgate_jwt") or k == "fleetgate_jwks_file" for k in updated):
            try:
                self.registry.verifier = self._build_verifier()
            except (OSError, ValueError) as exc:
                raise exceptions.OptionsError(f"fleetgate identity: {exc}") from None

    def _build_verifier(self) -> Verifier:
        o = ctx.options
        secret: bytes | None = None
        if o.fleetgate_jwt_secret_file:
            secret = Path(o.fleetgate_jwt_secret_file).read_bytes().strip()
        elif o.fleetgate_jwt_secret_env and os.environ.get(o.fleetgate_jwt_secret_env):
            secret = os.environ[o.fleetgate_jwt_secret_env].encode()
        jwks = None
        if o.fleetgate_jwks_file:
            p = Path(o.fleetgate_jwks_file)
            jwks = load_jwks(p.read_text())
            st = p.stat()
            self._jwks_stat = (st.st_ino, st.st_mtime_ns)
        if secret is None and jwks is None:
            raise ValueError(
                "no token verification key: set fleetgate_jwt_secret_file, the "
                f"{o.fleetgate_jwt_secret_env or 'FLEETGATE_JWT_SECRET'} environment variable, "
                "or fleetgate_jwks_file")
        if o.fleetgate_jwt_leeway < 0:
            raise ValueError("fleetgate_jwt_leeway must be >= 0")
        if o.fleetgate_jwt_max_bytes < 256:
            raise ValueError("fleetgate_jwt_max_bytes must be >= 256 (a JWT is never smaller)")
        return Verifier(VerifierConfig(
            hs_secret=secret, jwks=jwks,
            issuer=tuple(i.strip() for i in o.fleetgate_jwt_issuer.split(",") if i.strip()),
            audience=o.fleetgate_jwt_audience or None,
            leeway=float(o.fleetgate_jwt_leeway),
            max_bytes=o.fleetgate_jwt_max_bytes,
        ))

    def _maybe_reload_jwks(self) -> None:
        """Pick up a rotated JWKS file (checked at most once a second)."""
        path = ctx.options.fleetgate_jwks_file
        now = time.monotonic()
        if not path or now - self._jwks_checked < 1.0:
            return
        self._jwks_checked = now
        try:
            st = os.stat(path)
            if (st.st_ino, st.st_mtime_ns) != self._jwks_stat:
                self.registry.verifier = self._build_verifier()
                log.info("fleetgate: JWKS reloaded from %s", path)
        except (OSError, ValueError) as exc:
            log.error("fleetgate: JWKS %s could not be reloaded (%s); keeping the previous keys",
                      path, exc)

    def _verify(self, headers: list[str]) -> Identity:
        self._maybe_reload_jwks()
        if len(headers) > 1:
            raise IdentityError("ambiguous", f"{len(headers)} Proxy-Authorization headers: "
                                             "send exactly one")
        verifier = self.registry.verifier
        if verifier is None:
            raise IdentityError("no_verifier", "gateway has no token verification key configured")
        token = parse_proxy_authorization(headers[0] if headers else None,
                                          verifier.config.max_bytes)
        return verifier.verify(token)

    @staticmethod
    def _take_credentials(flow: http.HTTPFlow) -> list[str]:
        """Every Proxy-Authorization value, removed from the request (never forwarded)."""
        values = flow.request.headers.get_all("Proxy-Authorization")
        flow.request.headers.pop("Proxy-Authorization", None)
        return values

    def _refuse(self, flow: http.HTTPFlow, err: IdentityError) -> None:
        self.metrics.identity_failures.labels(code=err.code).inc()
        deny(flow, 407, f"identity.{err.code}", err.message,
             hint="present a valid agent JWT as the proxy password "
                  "(HTTPS_PROXY=http://agent:<JWT>@<gateway>:<port>)",
             headers={"Proxy-Authenticate": REALM})

    @fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if settled(flow):
            return
        decision_id(flow)
        try:
            ident = self._verify(self._take_credentials(flow))
        except IdentityError as err:
            self.registry.unbind(flow.client_conn)
            self._refuse(flow, err)
            return
        self.registry.bind(flow.client_conn, ident)
        set_identity(flow, ident)

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        headers = self._take_credentials(flow)
        if settled(flow):
            return
        decision_id(flow)
        ident = self.registry.bound_to(flow.client_conn)
        verifier = self.registry.verifier
        if ident is None:
            try:
                ident = self._verify(headers)
            except IdentityError as err:
                self._refuse(flow, err)
                return
        elif verifier is not None and ident.expired(time.time(), verifier.config.leeway):
            self._refuse(flow, IdentityError(
                "expired", "token expired while its tunnel was open; reconnect with a new token"))
            return
        set_identity(flow, ident)

