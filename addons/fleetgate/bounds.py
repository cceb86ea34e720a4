"""Time and size bounds on what agents and upstreams may hold open (pure, no mitmproxy).

Three clocks run on the gateway's connections (issue 14: an upstream that accepts and never
answers held an agent 45 s with nothing from the gateway; 500 slowloris connections were never
closed):

- ``client.header_timeout``: a client connection must complete a request's headers (or a
  CONNECT) within the bound after it connected or after its previous request finished;
- ``upstream.timeout``: an allowed request's upstream must send response headers within the
  bound after the request was sent (connect and TLS included);
- ``upstream.idle``: a response that started must keep sending; silence longer than the bound
  ends it.

:class:`Deadlines` keeps them all in one dict scanned by one periodic task: arming, touching
and disarming are a dict write each, so a request costs no task, no timer handle and no heap
entry. A scan is linear in what is open, once per tick (well under a millisecond for
thousands of entries). The clock is injected so the logic is tested without sleeping.

:func:`header_excess` is the request-head bound (count and bytes), checked on every request
whatever its HTTP version: mitmproxy 12.3.1 bounds neither (``_http1.py`` buffers a head until
its blank line, "FIXME: protect against header size DoS").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Final

__all__ = ["CLIENT_HEADERS", "UPSTREAM_FIRST_BYTE", "UPSTREAM_IDLE", "Deadlines", "Expired",
           "head_bytes", "header_excess", "tick_seconds"]

CLIENT_HEADERS: Final = "client.header_timeout"
UPSTREAM_FIRST_BYTE: Final = "upstream.timeout"
UPSTREAM_IDLE: Final = "upstream.idle"


@dataclass(frozen=True, slots=True)
class Expired[T]:
    key: Hashable
    kind: str
    seconds: float  # the bound that was exceeded
    subject: T


class Deadlines[T]:
    """Named deadlines, one per key; :meth:`expired` pops those that passed."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        # key -> (deadline, kind, seconds, subject)
        self._due: dict[Hashable, tuple[float, str, float, T]] = {}

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._due

    def kind(self, key: Hashable) -> str | None:
        entry = self._due.get(key)
        return entry[1] if entry else None

    def arm(self, key: Hashable, kind: str, seconds: float, subject: T) -> None:
        """Start (or restart) ``key``'s clock: it expires ``seconds`` from now."""
        self._due[key] = (self.clock() + seconds, kind, seconds, subject)

    def touch(self, key: Hashable, kind: str) -> None:
        """Push ``key``'s deadline a full bound away if it is armed for ``kind`` (activity)."""
        entry = self._due.get(key)
        if entry is not None and entry[1] == kind:
            self._due[key] = (self.clock() + entry[2], kind, entry[2], entry[3])

    def disarm(self, key: Hashable, kind: str | None = None) -> bool:
        """Stop ``key``'s clock (only if armed for ``kind``, when given)."""
        entry = self._due.get(key)
        if entry is None or (kind is not None and entry[1] != kind):
            return False
        del self._due[key]
        return True

    def expired(self, limit: int | None = None) -> list[Expired[T]]:
        """Pop and return the deadlines that have passed, oldest first, at most ``limit``
        (the rest stay for the next call)."""
        now = self.clock()
        late = sorted((entry[0], key) for key, entry in self._due.items() if entry[0] <= now)
        out = []
        for _, key in late[:limit]:
            _, kind, seconds, subject = self._due.pop(key)
            out.append(Expired(key, kind, seconds, subject))
        return out


def tick_seconds(bounds: Iterable[float]) -> float:
    """How often to scan: a tenth of the shortest bound, between 50 ms and 1 s, so a
    deadline is acted on at most ~10 % (or 1 s) late."""
    return min(1.0, max(0.05, min(bounds, default=10.0) / 10))


def head_bytes(request_line: int, fields: Iterable[tuple[bytes, bytes]]) -> int:
    """Bytes of a request head as HTTP/1 frames it: the request line, ``name: value`` lines
    and the blank line (HTTP/2 heads are counted the same way, so one bound fits both)."""
    return request_line + 2 + sum(len(k) + len(v) + 4 for k, v in fields) + 2


def header_excess(count: int, size: int, max_count: int, max_bytes: int) -> str | None:
    """Why a request head is refused, or ``None`` when it is within both bounds."""
    if count > max_count:
        return f"the request has {count} header fields; at most {max_count} are accepted"
    if size > max_bytes:
        return f"the request head is {size} bytes; at most {max_bytes} are accepted"
    return None
