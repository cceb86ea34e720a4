"""The JWKS URL: fetched off the event loop, refreshed, and handed to the verifier.

:class:`JwksSource` runs one background task (``run``) that fetches on the
:class:`~fleetgate.identity.remote_keys.JwksSchedule`'s schedule; each fetch runs in a thread
(:func:`fetch_jwks`, httpx), so neither DNS, TLS nor a slow IdP ever blocks a flow. Fetches
are single-flight: the refresh loop and a token with an unknown ``kid``
(:meth:`JwksSource.refetch_for_unknown_key`, rate-limited by the schedule) share one.

After every fetch ``on_change`` is called, and the identity addon builds a new verifier from
the schedule's snapshot. A failed fetch keeps the last good keys; the verifier stops using
them once they are older than ``fleetgate_jwks_max_stale`` (fail closed), and this service
says so: an ERROR line when they go stale, ``fleetgate_jwks_fetches_total{result}``,
``fleetgate_jwks_last_success_timestamp_seconds``, ``fleetgate_jwks_usable`` and
``state.jwks`` in ``/healthz/ready``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fleetgate.identity.remote_keys import JwksSchedule, RefreshPolicy, cache_max_age
from fleetgate.identity.tokens import jwk_keys, load_jwks
from fleetgate.metrics import GatewayMetrics

__all__ = ["Fetched", "Fetcher", "JwksSource", "check_jwks_url", "fetch_jwks"]

log = logging.getLogger("fleetgate.addons.identity")

MAX_JWKS_BYTES = 1 << 20  # a JWKS is a few KB; a megabyte is an IdP gone wrong


@dataclass(frozen=True)
class Fetched:
    """What a fetch brought back: the body and its ``Cache-Control`` header."""

    text: str
    cache_control: str | None = None


# (url, timeout seconds) -> Fetched; raises any Exception with a readable message
Fetcher = Callable[[str, float], Fetched]


def check_jwks_url(url: str) -> str:
    """``url`` if it may serve keys: ``https``, or ``http`` to a loopback address (a sidecar,
    a test); ``ValueError`` otherwise (keys over plain HTTP could be swapped on the way)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname:
        host = parts.hostname
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if loopback:
            return url
        raise ValueError(f"fleetgate_jwks_url {url!r}: plain http is only accepted to a "
                         "loopback address; use https")
    raise ValueError(f"fleetgate_jwks_url {url!r} is not an https:// URL")


def fetch_jwks(ca_file: str = "") -> Fetcher:
    """A blocking :data:`Fetcher` over httpx: no proxy from the environment (the gateway's
    own ``HTTPS_PROXY`` may point at itself), no redirects, TLS verified against ``ca_file``
    (else the system's trust store), at most :data:`MAX_JWKS_BYTES`."""
    verify: ssl.SSLContext | bool = (ssl.create_default_context(cafile=ca_file) if ca_file
                                     else True)

    def fetch(url: str, timeout: float) -> Fetched:
        import httpx  # here: a gateway without fleetgate_jwks_url never loads it (~4 MiB RSS)

        with httpx.Client(verify=verify, trust_env=False, follow_redirects=False,
                          timeout=timeout) as client, \
                client.stream("GET", url, headers={"Accept": "application/json"}) as resp:
            if resp.status_code != 200:
                raise OSError(f"HTTP {resp.status_code} from {url}")
            body = b""
            for chunk in resp.iter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise OSError(f"answer larger than {MAX_JWKS_BYTES} bytes")
            return Fetched(body.decode("utf-8"), resp.headers.get("Cache-Control"))

    return fetch


class JwksSource:
    """Keeps one JWKS URL's keys fresh (see the module docstring)."""

    def __init__(self, url: str, policy: RefreshPolicy, fetcher: Fetcher,
                 metrics: GatewayMetrics, on_change: Callable[[], None],
                 clock: Callable[[], float] = time.time) -> None:
        self.schedule = JwksSchedule(check_jwks_url(url), policy)
        self.fetcher = fetcher
        self.metrics = metrics
        self.on_change = on_change
        self.clock = clock
        self._wake = asyncio.Event()
        self._inflight: asyncio.Task[bool] | None = None
        self._was_usable: bool | None = None

    @property
    def url(self) -> str:
        return self.schedule.url

    def status(self) -> dict[str, Any]:
        return self.schedule.status(self.clock())

    def usable(self) -> bool:
        return self.schedule.keys.unusable(self.clock()) is None

    async def run(self) -> None:
        """The refresh loop (the identity addon's background task)."""
        while True:
            delay = self.schedule.delay(self.clock())
            if delay > 0:
                self._wake.clear()
                # wake at least every few seconds: the keys going stale is worth a log line
                # even while no fetch is due
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), min(delay, 5.0))
                self._note_usable()
                continue
            await self.fetch()

    async def fetch(self) -> bool:
        """Fetch now, or join the fetch already running; True when it succeeded."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.get_running_loop().create_task(self._fetch())
        return await asyncio.shield(self._inflight)

    async def refetch_for_unknown_key(self) -> bool:
        """A token names a key we do not have: fetch (or join a fetch) if the schedule allows
        it now. False when it does not (rate-limited) or the fetch failed."""
        if self._inflight is not None and not self._inflight.done():
            return await asyncio.shield(self._inflight)
        if not self.schedule.kid_refetch(self.clock()):
            return False
        log.info("fleetgate: a token names a key not in the JWKS at %s; fetching it again",
                 self.url)
        return await self.fetch()

    async def _fetch(self) -> bool:
        timeout = self.schedule.policy.timeout
        try:
            fetched = await asyncio.wait_for(
                asyncio.to_thread(self.fetcher, self.url, timeout), timeout + 1.0)
            jwks = load_jwks(fetched.text)
            if not jwk_keys(jwks):
                raise ValueError("it holds no keys")
        except Exception as exc:  # every failure keeps the last good keys, and says why
            reason = _reason(exc)
            self.schedule.failed(reason, self.clock())
            self.metrics.jwks_fetches.labels(result="error").inc()
            age = self.schedule.keys.age(self.clock())
            # WARNING, not ERROR, while the keys are fresh enough (and at startup: mitmdump
            # exits on an ERROR logged during startup); ERROR when they go stale
            log.warning("fleetgate: JWKS fetch from %s failed (%s); %s", self.url, reason,
                        f"keeping the keys fetched {age:.0f}s ago" if age is not None else
                        "tokens signed by its keys are refused until a fetch succeeds")
            self._changed()
            return False
        self.schedule.succeeded(jwks, cache_max_age(fetched.cache_control), self.clock())
        self.metrics.jwks_fetches.labels(result="ok").inc()
        self.metrics.jwks_last_success.set(self.clock())
        self.metrics.jwks_keys.set(len(jwks["keys"]))
        kids = sorted(str(k.get("kid")) for k in jwks["keys"] if isinstance(k, dict))
        log.info("fleetgate: JWKS fetched from %s: %d key(s) %s", self.url, len(jwks["keys"]),
                 ", ".join(kids))
        self._changed()
        return True

    def _changed(self) -> None:
        try:
            self.on_change()
        except Exception:  # a bad document: the verifier keeps its keys, the fetch says why
            log.exception("fleetgate: JWKS from %s could not be installed", self.url)
        self._note_usable()

    def _note_usable(self) -> None:
        usable = self.usable()
        self.metrics.jwks_usable.set(1 if usable else 0)
        if usable == self._was_usable:
            return
        first = self._was_usable is None
        self._was_usable = usable
        if usable and not first:
            log.warning("fleetgate: JWKS from %s is usable again; its tokens are accepted",
                        self.url)
        elif not usable and not first:
            problem = self.schedule.keys.unusable(self.clock())
            log.error("fleetgate: %s", problem[1] if problem else "JWKS unusable")


def _reason(exc: BaseException) -> str:
    import httpx  # a fetch failed: fetch_jwks loaded it already (or a test's fetcher did not)

    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON: {exc}"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if isinstance(exc, httpx.HTTPError) else text
