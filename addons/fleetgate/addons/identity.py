"""AgentIdentity: who is this? Verifies the JWT in the proxy credentials.

Credentials arrive on the CONNECT request only (``HTTPS_PROXY=http://agent:<JWT>@...``),
so the verified identity is bound to the client connection and applies to every request
inside that tunnel; on each of them the token's expiry is re-checked, and so is its key
(:meth:`~fleetgate.identity.tokens.Verifier.check_key`): a tunnel whose key was rotated out
(``identity.key_retired``) or came from a JWKS URL now stale past its bound is refused.
Plain-HTTP proxy requests carry their own ``Proxy-Authorization``. The credential header is
always removed before anything is forwarded: it never reaches an upstream. Two
``Proxy-Authorization`` headers are refused (``identity.ambiguous``): which one is "the"
identity would depend on the reader. Tokens are bounded (``fleetgate_jwt_max_bytes``,
``identity.too_large``).

Keys rotate without a restart: the secret file (several secrets, the current one first)
and the JWKS file are re-read when they change; the JWKS URL is refreshed in the background
(:class:`~fleetgate.runtime.jwks_source.JwksSource`), and fetched again at once (rate-limited)
for a token naming a key it does not have: that flow waits for the fetch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http

from fleetgate.addons.flowtools import deny, fail_closed, settled
from fleetgate.addons.state import decision_id, set_identity
from fleetgate.durations import parse_duration
from fleetgate.identity.remote_keys import RefreshPolicy
from fleetgate.identity.tokens import (
    Identity,
    IdentityError,
    Verifier,
    VerifierConfig,
    load_jwks,
    parse_proxy_authorization,
    parse_secrets,
)
from fleetgate.metrics import GatewayMetrics
from fleetgate.runtime.identity import IdentityRegistry
from fleetgate.runtime.jwks_source import Fetcher, JwksSource, fetch_jwks

log = logging.getLogger(__name__)

REALM = 'Basic realm="fleetgate", Bearer realm="fleetgate"'
# the errors a fresh fetch of the JWKS URL may cure
REFETCHABLE = frozenset({"unknown_key", "jwks_unavailable", "jwks_stale"})
# the errors a key file written a moment ago may cure
KEY_MISSES = frozenset({"bad_signature", "unknown_key", "algorithm_not_allowed"})
URL_OPTIONS = frozenset({"fleetgate_jwks_url", "fleetgate_jwks_refresh",
                         "fleetgate_jwks_max_stale", "fleetgate_jwks_kid_refetch",
                         "fleetgate_jwks_ca_file"})

Admit = Callable[[http.HTTPFlow, Identity], None]


class AgentIdentity:
    """Writes the verifier and the tunnels' identities to the :class:`IdentityRegistry` it is
    handed (a fresh one when none is: a stand-alone addon)."""

    def __init__(self, metrics: GatewayMetrics, registry: IdentityRegistry | None = None,
                 fetcher: Callable[[str], Fetcher] = fetch_jwks,
                 clock: Callable[[], float] = time.time) -> None:
        self.metrics = metrics
        self.clock = clock  # wall clock of the JWKS URL's schedule and staleness (tests)
        self.registry = registry if registry is not None else IdentityRegistry()
        self.fetcher = fetcher  # ca_file -> Fetcher (tests inject a fake)
        self._stats: dict[str, tuple[int, int]] = {}
        self._files_checked = 0.0
        self._secrets: tuple[bytes, ...] = ()
        self._jwks_file: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._running = False

    def load(self, loader: Any) -> None:
        loader.add_option("fleetgate_jwt_secret_file", str, "",
                          "File holding the HS256 secrets agents' tokens are signed with: one "
                          "per line, the current one first (it signs), previous ones after it "
                          "(still accepted); re-read when it changes.")
        loader.add_option("fleetgate_jwt_secret_env", str, "FLEETGATE_JWT_SECRET",
                          "Environment variable holding the HS256 secret(s), one per line "
                          "(used when fleetgate_jwt_secret_file is empty).")
        loader.add_option("fleetgate_jwks_file", str, "",
                          "JWKS file with the public keys for RS256/ES256/EdDSA tokens; "
                          "re-read when it changes.")
        loader.add_option("fleetgate_jwks_url", str, "",
                          "JWKS URL (your IdP's jwks_uri; https, or http to a loopback "
                          "address) whose keys verify RS256/ES256/EdDSA tokens, beside "
                          "fleetgate_jwks_file's; fetched in the background.")
        loader.add_option("fleetgate_jwks_refresh", str, "5m",
                          "How often the JWKS URL is fetched again (a shorter Cache-Control "
                          "max-age from the IdP is honoured, down to 30s).")
        loader.add_option("fleetgate_jwks_max_stale", str, "1h",
                          "Keys last fetched from the JWKS URL longer ago than this are not "
                          "used: their tokens are refused (407 identity.jwks_stale) until a "
                          "fetch succeeds. Must be longer than fleetgate_jwks_refresh.")
        loader.add_option("fleetgate_jwks_kid_refetch", str, "30s",
                          "Least time between two fetches of the JWKS URL triggered by tokens "
                          "naming a key id it does not hold.")
        loader.add_option("fleetgate_jwks_ca_file", str, "",
                          "CA bundle to verify the JWKS URL's certificate with (empty: the "
                          "system's trust store).")
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
        if not any(k.startswith(("fleetgate_jwt", "fleetgate_jwks")) for k in updated):
            return
        try:
            self._read_files()
            if updated & URL_OPTIONS:
                self._configure_url()
            self._install()
        except (OSError, ValueError) as exc:
            raise exceptions.OptionsError(f"fleetgate identity: {exc}") from None

    # -- keys ---------------------------------------------------------------------------

    def _read_files(self) -> None:
        """Read the secret(s) and the JWKS file (raises: the caller keeps the old keys)."""
        o = ctx.options
        secrets: tuple[bytes, ...] = ()
        stats: dict[str, tuple[int, int]] = {}
        if o.fleetgate_jwt_secret_file:
            path = o.fleetgate_jwt_secret_file
            try:
                secrets = parse_secrets(Path(path).read_bytes())
            except ValueError as exc:
                raise ValueError(f"fleetgate_jwt_secret_file {path}: {exc}") from None
            stats[path] = _stat(path)
        elif o.fleetgate_jwt_secret_env and os.environ.get(o.fleetgate_jwt_secret_env):
            secrets = parse_secrets(os.environ[o.fleetgate_jwt_secret_env].encode())
        jwks = None
        if o.fleetgate_jwks_file:
            jwks = load_jwks(Path(o.fleetgate_jwks_file).read_text())
            stats[o.fleetgate_jwks_file] = _stat(o.fleetgate_jwks_file)
        if not secrets and jwks is None and not o.fleetgate_jwks_url:
            raise ValueError(
                "no token verification key: set fleetgate_jwt_secret_file, the "
                f"{o.fleetgate_jwt_secret_env or 'FLEETGATE_JWT_SECRET'} environment variable, "
                "fleetgate_jwks_file or fleetgate_jwks_url")
        self._secrets, self._jwks_file, self._stats = secrets, jwks, stats

    def _configure_url(self) -> None:
        o = ctx.options
        self._stop_task()
        self.registry.jwks = None
        if not o.fleetgate_jwks_url:
            self.metrics.jwks_usable.set(1)
            return
        try:
            policy = RefreshPolicy(
                refresh=float(parse_duration(o.fleetgate_jwks_refresh)),
                max_stale=float(parse_duration(o.fleetgate_jwks_max_stale)),
                kid_refetch=float(parse_duration(o.fleetgate_jwks_kid_refetch)))
        except ValueError as exc:
            raise ValueError(f"fleetgate_jwks_*: {exc}") from None
        if o.fleetgate_jwks_ca_file and not Path(o.fleetgate_jwks_ca_file).is_file():
            raise ValueError(f"fleetgate_jwks_ca_file {o.fleetgate_jwks_ca_file}: no such file")
        self.registry.jwks = JwksSource(o.fleetgate_jwks_url, policy,
                                        self.fetcher(o.fleetgate_jwks_ca_file), self.metrics,
                                        on_change=self._install, clock=self.clock)
        self.metrics.jwks_usable.set(0)
        if self._running:
            self._start_task()

    def _install(self) -> None:
        """Build the verifier from the keys read and fetched, and make it the one in force."""
        o = ctx.options
        if o.fleetgate_jwt_leeway < 0:
            raise ValueError("fleetgate_jwt_leeway must be >= 0")
        if o.fleetgate_jwt_max_bytes < 256:
            raise ValueError("fleetgate_jwt_max_bytes must be >= 256 (a JWT is never smaller)")
        source = self.registry.jwks
        self.registry.verifier = Verifier(VerifierConfig(
            hs_secret=self._secrets[0] if self._secrets else None,
            hs_previous=self._secrets[1:],
            jwks=self._jwks_file,
            issuer=tuple(i.strip() for i in o.fleetgate_jwt_issuer.split(",") if i.strip()),
            audience=o.fleetgate_jwt_audience or None,
            leeway=float(o.fleetgate_jwt_leeway),
            max_bytes=o.fleetgate_jwt_max_bytes,
        ), remote=source.schedule.keys if source is not None else None, clock=self.clock)

    def _maybe_reload_files(self, now_please: bool = False) -> bool:
        """Pick up a rotated secret or JWKS file (checked at most once a second, or at once
        when a token failed to verify: it may be signed with a key just written). True when
        new keys were installed."""
        now = time.monotonic()
        if not self._stats or (now - self._files_checked < 1.0 and not now_please):
            return False
        self._files_checked = now
        try:
            if all(_stat(p) == st for p, st in self._stats.items()):
                return False
            self._read_files()
            self._install()
        except (OSError, ValueError) as exc:
            log.error("fleetgate: key files %s could not be reloaded (%s); keeping the previous "
                      "keys", ", ".join(self._stats), exc)
            return False
        log.info("fleetgate: keys reloaded from %s (%d HS256 secret(s))",
                 ", ".join(self._stats), len(self._secrets))
        return True

    # -- the background refresh ---------------------------------------------------------

    def running(self) -> None:
        self._running = True
        self._start_task()

    def done(self) -> None:
        self._running = False
        self._stop_task()

    def _start_task(self) -> None:
        source = self.registry.jwks
        if source is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(source.run())

    def _stop_task(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    # -- verification -------------------------------------------------------------------

    def _verifier(self) -> Verifier:
        self._maybe_reload_files()
        verifier = self.registry.verifier
        if verifier is None:
            raise IdentityError("no_verifier", "gateway has no token verification key configured")
        return verifier

    def _token(self, headers: list[str]) -> str:
        if len(headers) > 1:
            raise IdentityError("ambiguous", f"{len(headers)} Proxy-Authorization headers: "
                                             "send exactly one")
        return parse_proxy_authorization(headers[0] if headers else None,
                                         self._verifier().config.max_bytes)

    def _judge(self, flow: http.HTTPFlow, headers: list[str],
               admit: Admit) -> Coroutine[Any, Any, None] | None:
        """Verify the credentials and admit or refuse the flow; a coroutine (the hook's
        answer) when the verdict waits for the JWKS URL to be fetched again."""
        try:
            token = self._token(headers)
        except IdentityError as err:
            self._refuse(flow, err)
            return None
        try:
            try:
                ident = self._verifier().verify(token)
            except IdentityError as err:
                if err.code not in KEY_MISSES or not self._maybe_reload_files(now_please=True):
                    raise
                ident = self._verifier().verify(token)  # the key files changed: once more
        except IdentityError as err:
            if self.registry.jwks is not None and err.code in REFETCHABLE:
                return self._judge_after_fetch(flow, token, admit)
            self._refuse(flow, err)
            return None
        admit(flow, ident)
        return None

    @fail_closed
    async def _judge_after_fetch(self, flow: http.HTTPFlow, token: str, admit: Admit) -> None:
        source = self.registry.jwks
        if source is not None:
            await source.refetch_for_unknown_key()
        if settled(flow):
            return
        try:
            ident = self._verifier().verify(token)
        except IdentityError as err:
            self._refuse(flow, err)
            return
        admit(flow, ident)

    def _bind(self, flow: http.HTTPFlow, ident: Identity) -> None:
        self.registry.bind(flow.client_conn, ident)
        set_identity(flow, ident)

    @staticmethod
    def _take_credentials(flow: http.HTTPFlow) -> list[str]:
        """Every Proxy-Authorization value, removed from the request (never forwarded)."""
        values = flow.request.headers.get_all("Proxy-Authorization")
        flow.request.headers.pop("Proxy-Authorization", None)
        return values

    def _refuse(self, flow: http.HTTPFlow, err: IdentityError) -> None:
        if flow.request.method == "CONNECT":
            self.registry.unbind(flow.client_conn)
        self.metrics.identity_failures.labels(code=err.code).inc()
        deny(flow, 407, f"identity.{err.code}", err.message,
             hint="present a valid agent JWT as the proxy password "
                  "(HTTPS_PROXY=http://agent:<JWT>@<gateway>:<port>)",
             headers={"Proxy-Authenticate": REALM})

    @fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        if settled(flow):
            return None
        decision_id(flow)
        return self._judge(flow, self._take_credentials(flow), self._bind)

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        headers = self._take_credentials(flow)
        if settled(flow):
            return None
        decision_id(flow)
        ident = self.registry.bound_to(flow.client_conn)
        if ident is None:
            return self._judge(flow, headers, set_identity)
        try:
            verifier = self._verifier()
            if ident.expired(self.clock(), verifier.config.leeway):
                raise IdentityError("expired", "token expired while its tunnel was open; "
                                               "reconnect with a new token")
            verifier.check_key(ident)
        except IdentityError as err:
            self._refuse(flow, err)
            return None
        set_identity(flow, ident)
        return None


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_mtime_ns)
