"""Token buckets as the seed's ``localRateLimit`` defines them. No I/O, injected clock.

A bucket holds at most ``max_tokens``; every ``fill_interval`` seconds ``tokens_per_fill`` are
added (Envoy's local rate limit: discrete fills, not a continuous trickle). ``type: requests``
takes 1 per request; ``type: tokens`` counts LLM tokens.

LLM tokens are not known before the answer, so a request **reserves** its estimate (input
estimate + ``max_tokens``) atomically before it is forwarded and **settles** to the real
usage afterwards: a refund when it used less, an extra debit (the bucket may go below zero,
delaying the next requests) when it used more. Because taking is atomic on the gateway's
event loop, N concurrent requests can never together take more than the bucket holds; the
only overshoot is what requests use beyond their reservation (input underestimated by the
tokenizer, or output beyond the reserved default when a request sets no ``max_tokens``).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Bucket", "BucketSpec", "Buckets", "LimitKind", "Take"]


class LimitKind(StrEnum):
    REQUESTS = "requests"
    TOKENS = "tokens"


@dataclass(frozen=True)
class BucketSpec:
    """One ``localRateLimit`` entry's numbers."""

    max_tokens: int
    tokens_per_fill: int
    fill_interval: float  # seconds
    kind: LimitKind = LimitKind.REQUESTS

    def __post_init__(self) -> None:
        if self.max_tokens <= 0 or self.tokens_per_fill <= 0 or self.fill_interval <= 0:
            raise ValueError("maxTokens, tokensPerFill and fillInterval must be > 0")


@dataclass(frozen=True)
class Take:
    """The outcome of a take: whether it passed, what is left, when the next fill comes and
    (refused) how long until the request could pass."""

    ok: bool
    remaining: int
    reset_after: float  # seconds until the next fill
    retry_after: float  # refused: seconds until enough tokens; 0 when ok
    never: bool = False  # refused and can never pass: asks for more than max_tokens


class Bucket:
    __slots__ = ("last_fill", "spec", "tokens")

    def __init__(self, spec: BucketSpec, now: float) -> None:
        self.spec = spec
        self.tokens = float(spec.max_tokens)
        self.last_fill = now

    def _refill(self, now: float) -> None:
        s = self.spec
        if now < self.last_fill:  # clock stepped back: do not mint tokens
            self.last_fill = now
            return
        fills = math.floor((now - self.last_fill) / s.fill_interval)
        if fills > 0:
            self.tokens = min(float(s.max_tokens), self.tokens + fills * s.tokens_per_fill)
            self.last_fill += fills * s.fill_interval

    def _reset_after(self, now: float) -> float:
        return max(0.0, self.last_fill + self.spec.fill_interval - now)

    def take(self, n: int, now: float) -> Take:
        """Take ``n`` if the bucket holds them (all or nothing)."""
        self._refill(now)
        s = self.spec
        reset = self._reset_after(now)
        if n > s.max_tokens:
            return Take(False, max(0, int(self.tokens)), reset, 0.0, never=True)
        if self.tokens >= n:
            self.tokens -= n
            return Take(True, max(0, int(self.tokens)), reset, 0.0)
        missing = n - self.tokens
        fills = math.ceil(missing / s.tokens_per_fill)
        return Take(False, max(0, int(self.tokens)), reset, reset + (fills - 1) * s.fill_interval)

    def settle(self, delta: int, now: float) -> None:
        """Adjust after the fact: ``delta`` > 0 debits more (may go below zero), < 0 refunds
        (never above ``max_tokens``)."""
        self._refill(now)
        self.tokens = min(float(self.spec.max_tokens), self.tokens - delta)

    def level(self, now: float) -> float:
        self._refill(now)
        return self.tokens


class Buckets:
    """Buckets by (limit id, key), created full on first use; bounded (least recently used
    forgotten first: a forgotten bucket comes back full, so the bound only errs generous for
    keys idle long enough to be evicted). A reload that changes a limit's numbers keeps the
    bucket's level (clamped to the new maximum): editing the rules never refills a bucket."""

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._buckets: OrderedDict[tuple[str, str], Bucket] = OrderedDict()

    def get(self, limit_id: str, key: str, spec: BucketSpec, now: float) -> Bucket:
        k = (limit_id, key)
        with self._lock:
            b = self._buckets.get(k)
            if b is None:
                b = Bucket(spec, now)
                self._buckets[k] = b
                if len(self._buckets) > self.limit:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(k)
                if b.spec != spec:  # numbers changed on reload: keep what was spent
                    b._refill(now)
                    b.spec = spec
                    b.tokens = min(b.tokens, float(spec.max_tokens))
            return b

    def snapshot(self, now: float, top: int = 1000) -> list[dict[str, object]]:
        with self._lock:
            items = list(self._buckets.items())[-top:]
        return [{"limit": lid, "key": key, "level": round(b.level(now), 3),
                 "max": b.spec.max_tokens, "type": b.spec.kind.value} for (lid, key), b in items]
