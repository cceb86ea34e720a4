"""Keys from a JWKS URL: when to fetch, and whether what was fetched may still be used.

Pure: no clock of its own, no I/O. The runtime fetches (:mod:`fleetgate.runtime.jwks`) and
tells :class:`JwksSchedule` what happened; the schedule answers when to fetch next and hands
out :class:`RemoteKeys` snapshots the :class:`~fleetgate.identity.tokens.Verifier` reads.

The rules, and why:

* **Refresh** every ``refresh`` seconds; a shorter ``Cache-Control: max-age`` from the IdP is
  honoured (down to :data:`MIN_REFRESH`), a longer one is not: the operator's interval bounds
  how long a key the IdP removed is still trusted.
* **Failures** keep the last good keys and are retried sooner (1 s, doubling, at most
  :data:`MAX_RETRY` or ``refresh``): an IdP blip must not cost a refresh interval.
* **Staleness fails closed**: keys last fetched more than ``max_stale`` seconds ago are not
  used (``identity.jwks_stale``), nor are keys never fetched (``identity.jwks_unavailable``).
  A revoked key cannot outlive an IdP outage by more than that bound.
* **Unknown ``kid``** may trigger a fetch at once (a key the IdP just published), but at most
  one per ``kid_refetch`` seconds: a flood of tokens with made-up ids cannot hammer the IdP.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["MAX_RETRY", "MIN_REFRESH", "JwksSchedule", "RefreshPolicy", "RemoteKeys",
           "cache_max_age"]

MIN_REFRESH = 30.0  # the shortest interval a Cache-Control max-age can make us refresh at
MAX_RETRY = 60.0  # the longest wait between retries after a failed fetch
RETRY_FIRST = 1.0


@dataclass(frozen=True)
class RemoteKeys:
    """What a :class:`~fleetgate.identity.tokens.Verifier` knows of a JWKS URL: the last good
    document, when it was fetched (wall clock), and the bound past which it is not used."""

    url: str
    max_stale: float
    jwks: Mapping[str, Any] | None = None  # None: never fetched successfully
    fetched_at: float | None = None
    error: str | None = None  # why the last fetch failed (None: it succeeded)

    def age(self, now: float) -> float | None:
        return None if self.fetched_at is None else max(0.0, now - self.fetched_at)

    def unusable(self, now: float) -> tuple[str, str] | None:
        """``None`` when the keys may be used at ``now``; else ``(code, message)`` for the
        :class:`~fleetgate.identity.tokens.IdentityError` that refuses a token needing them."""
        age = self.age(now)
        if self.jwks is None or age is None:
            why = self.error or "the first fetch has not completed"
            return ("jwks_unavailable",
                    f"the JWKS at {self.url} has not been fetched yet ({why}); tokens signed "
                    "by its keys are refused until it is (the gateway operator sees this in "
                    "/healthz/ready)")
        if age > self.max_stale:
            why = f"; last error: {self.error}" if self.error else ""
            return ("jwks_stale",
                    f"the JWKS at {self.url} was last fetched {age:.0f}s ago, more than "
                    f"fleetgate_jwks_max_stale ({self.max_stale:.0f}s){why}; tokens signed by "
                    "its keys are refused until a fetch succeeds (the gateway operator sees "
                    "this in /healthz/ready)")
        return None


@dataclass(frozen=True)
class RefreshPolicy:
    """The operator's bounds, in seconds (``fleetgate_jwks_*`` options)."""

    refresh: float = 300.0
    max_stale: float = 3600.0
    kid_refetch: float = 30.0
    timeout: float = 10.0

    def __post_init__(self) -> None:
        for name in ("refresh", "max_stale", "timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"fleetgate_jwks_{name} must be > 0")
        if self.kid_refetch < 0:
            raise ValueError("fleetgate_jwks_kid_refetch must be >= 0")
        if self.max_stale <= self.refresh:
            raise ValueError(
                f"fleetgate_jwks_max_stale ({self.max_stale:.0f}s) must be longer than "
                f"fleetgate_jwks_refresh ({self.refresh:.0f}s): otherwise the keys go stale "
                "between two good fetches")


class JwksSchedule:
    """The fetch schedule of one JWKS URL and its latest :class:`RemoteKeys` snapshot."""

    def __init__(self, url: str, policy: RefreshPolicy) -> None:
        self.policy = policy
        self.keys = RemoteKeys(url=url, max_stale=policy.max_stale)
        self.next_at = -math.inf  # fetch at once
        self.failures = 0
        self._kid_fetch_at = -math.inf

    @property
    def url(self) -> str:
        return self.keys.url

    def delay(self, now: float) -> float:
        """Seconds until the next scheduled fetch (<= 0: due)."""
        return self.next_at - now

    def succeeded(self, jwks: Mapping[str, Any], max_age: float | None, now: float) -> None:
        """A fetch returned a valid JWKS (validated by the caller)."""
        self.keys = replace(self.keys, jwks=dict(jwks), fetched_at=now, error=None)
        self.failures = 0
        self.next_at = now + self.interval(max_age)

    def failed(self, error: str, now: float) -> None:
        """A fetch failed (network, status, invalid document): keep the keys, retry sooner."""
        self.keys = replace(self.keys, error=error)
        self.failures += 1
        cap = min(MAX_RETRY, self.policy.refresh)
        self.next_at = now + min(cap, RETRY_FIRST * 2 ** min(self.failures - 1, 16))

    def interval(self, max_age: float | None) -> float:
        """The refresh interval after a good fetch: ``refresh``, shortened by the answer's
        ``max-age`` (to no less than :data:`MIN_REFRESH`, or ``refresh`` when shorter)."""
        refresh = self.policy.refresh
        if max_age is None:
            return refresh
        return min(refresh, max(max_age, min(MIN_REFRESH, refresh)))

    def kid_refetch(self, now: float) -> bool:
        """May a token with an unknown ``kid`` trigger a fetch now? (Takes the slot if so.)"""
        if now - self._kid_fetch_at < self.policy.kid_refetch:
            return False
        self._kid_fetch_at = now
        return True

    def status(self, now: float) -> dict[str, Any]:
        """``state.jwks`` in ``/healthz/ready``: usable keys or not, and why."""
        k = self.keys
        problem = k.unusable(now)
        age = k.age(now)
        return {
            "ok": problem is None,
            # a replica that never had the keys stays out of service (a rolling update keeps
            # the old ones serving); one whose keys went stale stays in (every replica shares
            # the IdP; agents get identity.jwks_stale, which says what is wrong)
            **({"ready": False} if k.fetched_at is None else {}),
            "url": k.url,
            "keys": len(k.jwks.get("keys", [])) if k.jwks else 0,
            "age_seconds": round(age, 1) if age is not None else None,
            "max_stale_seconds": k.max_stale,
            "last_error": k.error,
            **({"error": problem[1], "code": problem[0]} if problem else {}),
        }


_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.I)
_NO_CACHE = re.compile(r"(?:^|,)\s*(?:no-store|no-cache)\s*(?:,|$|=)", re.I)


def cache_max_age(cache_control: str | None) -> float | None:
    """The freshness lifetime a ``Cache-Control`` header gives, in seconds (``no-store`` and
    ``no-cache``: 0); ``None`` when it gives none."""
    if not cache_control:
        return None
    if _NO_CACHE.search(cache_control):
        return 0.0
    m = _MAX_AGE.search(cache_control)
    return float(m.group(1)) if m else None
