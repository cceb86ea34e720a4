"""Rate-limit reservations: what each in-flight flow took from which bucket.

A flow's request takes from every bucket that applies (all or nothing: when one refuses or a
limit's ``key``/``when`` cannot be evaluated, what the others took is given back); while its
LLM answer streams, output beyond the reservation is taken as it comes; when the call ends,
token reservations are settled to the metered usage. The buckets are
:class:`fleetgate.limits.bucket.Buckets` (memory, monotonic clock); this class keeps the
per-flow holds between those moments, so the rate-limit addon and the meter share them
without reading each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from fleetgate.celexpr import Activation, CelError
from fleetgate.limits.bucket import Bucket, Buckets, LimitKind, Take
from fleetgate.policy.model import Policy, RateLimit

__all__ = ["Overrun", "RateHold", "RateOutcome", "RateReservations", "applicable_limits",
           "duration_text"]


@dataclass(frozen=True)
class Overrun:
    """Why a streaming answer must end now: the ``rule`` (budget or limit id) it ran past."""

    kind: str  # "budget" or "ratelimit": which rejection counter it counts in
    rule: str
    reason: str


@dataclass
class RateHold:
    """One bucket a flow took from: ``taken`` at admission, ``extra`` mid-stream."""

    limit: RateLimit
    key: str
    bucket: Bucket
    taken: int
    take: Take
    extra: int = 0  # taken mid-stream beyond the reservation

    def as_dict(self) -> dict[str, Any]:
        """What ``flow.metadata["fleetgate.limits"]`` and the decision log show."""
        return {"limit": self.limit.id, "key": self.key, "type": self.limit.spec.kind.value,
                "taken": self.taken, "remaining": self.take.remaining}


class RateOutcome(NamedTuple):
    """A request's reservation. ``failed`` is ``None`` when every limit passed; otherwise it
    is the limit that refused (``take``, ``key`` and ``needed`` say how) or could not be
    evaluated (``error``), and ``held`` was given back already."""

    held: tuple[RateHold, ...] = ()
    failed: RateLimit | None = None
    key: str = ""
    needed: int = 0
    take: Take | None = None
    error: str | None = None


def applicable_limits(policy: Policy, profiles: Sequence[str]) -> list[RateLimit]:
    """The top-level limits and those of the agent's profiles, in that order."""
    return [*policy.limits,
            *(lim for p in policy.agents if p.name in profiles for lim in p.limits)]


def duration_text(seconds: float) -> str:
    """``60`` -> ``1m``, as the rules write it."""
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


class RateReservations:
    """The buckets and the holds of the flows in flight (one event loop: no locking)."""

    def __init__(self, clock: Callable[[], float], buckets: Buckets | None = None) -> None:
        self.clock = clock
        self.buckets = buckets if buckets is not None else Buckets()
        self._held: dict[str, list[RateHold]] = {}
        self._counting: set[str] = set()  # flows holding tokens of a token limit

    def reserve(self, flow_id: str, limits: Sequence[RateLimit], *, agent: str,
                llm_tokens: int | None, act: Activation | None) -> RateOutcome:
        """Take for ``flow_id`` from every limit that applies: 1 for a ``requests`` limit,
        ``llm_tokens`` (estimated input + reserved output) for a ``tokens`` limit, which an
        LLM call only (``llm_tokens`` not ``None``) is subject to. ``act`` (``None`` when no
        limit has a ``key`` or ``when``) is what those CEL expressions see; without a ``key``
        the bucket is the agent's."""
        now = self.clock()
        held: list[RateHold] = []
        counting = False  # holds tokens of a token limit
        for lim in limits:
            if lim.spec.kind is LimitKind.TOKENS and llm_tokens is None:
                continue  # token limits count LLM tokens
            try:
                if lim.when is not None and act is not None and not lim.when.evaluate(act):
                    continue
                key = agent if lim.key is None or act is None else str(lim.key.value(act))
            except CelError as exc:
                self._give_back(held, now)
                return RateOutcome(tuple(held), lim, error=str(exc))
            n = 1
            if lim.spec.kind is LimitKind.TOKENS and llm_tokens is not None:
                n, counting = llm_tokens, True
            bucket = self.buckets.get(lim.id, key, lim.spec, now)
            take = bucket.take(n, now)
            if not take.ok:
                self._give_back(held, now)
                return RateOutcome(tuple(held), lim, key, n, take)
            held.append(RateHold(lim, key, bucket, n, take))
        if held:
            self._held[flow_id] = held
            if counting:
                self._counting.add(flow_id)
        return RateOutcome(tuple(held))

    @staticmethod
    def _give_back(held: list[RateHold], now: float) -> None:
        for h in held:
            h.bucket.settle(-h.taken, now)

    def counting(self, flow_id: str) -> bool:
        """Whether the flow holds tokens of a token limit (its output is counted as it streams)."""
        return flow_id in self._counting  # asked for every chunk of a stream: a set lookup

    def overrun(self, flow_id: str, est_in: int, out: int) -> Overrun | None:
        """While an LLM answer streams: tokens beyond the reservation are taken as they come;
        when a bucket has none left, the stream must end there."""
        held = self._held.get(flow_id)
        if not held:
            return None
        now = self.clock()
        for h in held:
            if h.limit.spec.kind is not LimitKind.TOKENS:
                continue
            over = est_in + out - (h.taken + h.extra)
            if over <= 0:
                continue
            if not h.bucket.take(over, now).ok:
                spec = h.limit.spec
                return Overrun("ratelimit", h.limit.id, (
                    f"rate limit {h.limit.id} for {h.key!r} ({spec.tokens_per_fill} tokens every "
                    f"{duration_text(spec.fill_interval)}) ran out after {out} output tokens; the "
                    "rest of the answer was not sent"))
            h.extra += over
        return None

    def settle(self, flow_id: str, used: int | None) -> list[tuple[RateHold, float]] | None:
        """The call ended: forget its holds and settle token reservations to ``used`` (input +
        output tokens metered). ``None`` when it held nothing or no usage is known (the
        reservation then stands); else each token hold with its bucket's level now."""
        held = self._held.pop(flow_id, None)
        self._counting.discard(flow_id)
        if not held or used is None:
            return None
        now = self.clock()
        settled = []
        for h in held:
            if h.limit.spec.kind is LimitKind.TOKENS:
                h.bucket.settle(used - h.taken - h.extra, now)
                settled.append((h, h.bucket.level(now)))
        return settled

    def snapshot(self) -> dict[str, Any]:
        """Bucket levels (``GET /limits``)."""
        return {"buckets": self.buckets.snapshot(self.clock())}
