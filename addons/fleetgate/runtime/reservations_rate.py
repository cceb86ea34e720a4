"""Rate-limit reservations: what each in-flight flow took from which bucket.

A flow's request takes from every bucket that applies (all or nothing: when one refuses or a
limit's ``key``/``when`` cannot be evaluated, what the others took is given back); while its
LLM answer streams, output beyond the reservation is taken as it comes; when the call ends,
token reservations are settled to the metered usage. The buckets are
:class:`fleetgate.limits.bucket.Buckets` (memory, monotonic clock) or, when the fleet shares
its state (``fleetgate_state=redis://…``), Redis (:class:`fleetgate.stores.redis_rate.RedisRates`:
one script takes a request's buckets all or nothing, on Redis's clock); this class keeps the
per-flow holds between those moments, so the rate-limit addon and the meter share them
without reading each other.

On Redis the event loop never waits in a hook that cannot await: settlements are tasks (a
failure is reported, the reservation then stands), and output beyond a reservation is taken
by a task while the stream goes on; the chunk after Redis said a bucket ran out ends the
stream. So a stream may run past its bucket by what arrives during one Redis round trip.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis

from fleetgate.celexpr import Activation, CelError
from fleetgate.limits.bucket import Bucket, Buckets, LimitKind, Take
from fleetgate.policy.model import Policy, RateLimit
from fleetgate.runtime.shared import SharedState
from fleetgate.stores.redis_rate import RedisRates

log = logging.getLogger(__name__)

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
    bucket: Bucket | None  # None: the bucket is in Redis
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
    state_error: str | None = None  # the shared state (Redis) could not answer: refused


@dataclass
class _Stream:
    """A flow's mid-stream takes on Redis: the one in flight, and the verdict it brought."""

    task: asyncio.Task[None] | None = None
    over: Overrun | None = None
    extra: dict[int, int] = field(default_factory=dict)  # hold index -> tokens being taken


def applicable_limits(policy: Policy, profiles: Sequence[str]) -> list[RateLimit]:
    """The top-level limits and those of the agent's profiles, in that order."""
    return [*policy.limits,
            *(lim for p in policy.named(profiles) for lim in p.limits)]


def duration_text(seconds: float) -> str:
    """``60`` -> ``1m``, as the rules write it."""
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


class RateReservations:
    """The buckets and the holds of the flows in flight (one event loop: no locking)."""

    def __init__(self, clock: Callable[[], float], buckets: Buckets | None = None,
                 shared: SharedState | None = None) -> None:
        self.clock = clock
        self.buckets = buckets if buckets is not None else Buckets()
        self.shared = shared
        self.redis = RedisRates()
        self.on_level: Callable[[str, str, float], None] | None = None  # a settled level
        self._held: dict[str, list[RateHold]] = {}
        self._counting: set[str] = set()  # flows holding tokens of a token limit
        self._streams: dict[str, _Stream] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._touched: OrderedDict[tuple[str, str], RateLimit] = OrderedDict()  # GET /limits
        self._touched_lock = threading.Lock()

    @property
    def on_redis(self) -> bool:
        """Whether the buckets are the fleet's, in Redis."""
        return self.shared is not None and self.shared.enabled

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

    async def reserve_shared(self, flow_id: str, limits: Sequence[RateLimit], *, agent: str,
                             llm_tokens: int | None, act: Activation | None,
                             wait: float) -> RateOutcome:
        """:meth:`reserve` on the fleet's buckets in Redis: one script takes them all or none,
        within ``wait`` seconds; when Redis fails or is slower, ``state_error`` says why and
        ``failed`` is the first limit (nothing is let through unchecked)."""
        want: list[tuple[RateLimit, str, int]] = []
        counting = False
        for lim in limits:
            if lim.spec.kind is LimitKind.TOKENS and llm_tokens is None:
                continue
            try:
                if lim.when is not None and act is not None and not lim.when.evaluate(act):
                    continue
                key = agent if lim.key is None or act is None else str(lim.key.value(act))
            except CelError as exc:
                return RateOutcome((), lim, error=str(exc))
            n = 1
            if lim.spec.kind is LimitKind.TOKENS and llm_tokens is not None:
                n, counting = llm_tokens, True
            want.append((lim, key, n))
        if not want:
            return RateOutcome()
        assert self.shared is not None
        shared = self.shared
        try:
            reply = await asyncio.wait_for(self.redis.take(
                shared.async_client(), [shared.key("rl", lim.id, key) for lim, key, _ in want],
                [lim.spec for lim, _, _ in want], [n for _, _, n in want]), wait)
        except TimeoutError:
            cause = f"Redis did not answer within {wait * 1000:g} ms"
            shared.failed("ratelimit.take", cause)
            return RateOutcome((), want[0][0], want[0][1], want[0][2], state_error=cause)
        except (redis.RedisError, OSError) as exc:
            shared.failed("ratelimit.take", exc)
            return RateOutcome((), want[0][0], want[0][1], want[0][2],
                               state_error=f"{type(exc).__name__}: {exc}")
        shared.worked()
        self._touch(want)
        if reply.failed is not None:
            lim, key, n = want[reply.failed]
            return RateOutcome((), lim, key, n, reply.takes[reply.failed])
        held = [RateHold(lim, key, None, n, take)
                for (lim, key, n), take in zip(want, reply.takes, strict=True)]
        self._held[flow_id] = held
        if counting:
            self._counting.add(flow_id)
        return RateOutcome(tuple(held))

    def _touch(self, want: Sequence[tuple[RateLimit, str, int]]) -> None:
        with self._touched_lock:
            for lim, key, _ in want:
                self._touched[(lim.id, key)] = lim
                self._touched.move_to_end((lim.id, key))
            while len(self._touched) > 1000:
                self._touched.popitem(last=False)

    @staticmethod
    def _give_back(held: list[RateHold], now: float) -> None:
        for h in held:
            assert h.bucket is not None
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
        if held[0].bucket is None:
            return self._overrun_shared(flow_id, held, est_in, out)
        now = self.clock()
        for h in held:
            if h.limit.spec.kind is not LimitKind.TOKENS:
                continue
            over = est_in + out - (h.taken + h.extra)
            if over <= 0:
                continue
            assert h.bucket is not None
            if not h.bucket.take(over, now).ok:
                return _ran_out(h, out)
            h.extra += over
        return None

    def _overrun_shared(self, flow_id: str, held: list[RateHold], est_in: int,
                        out: int) -> Overrun | None:
        """Redis: the verdict of the last take (the chunk path never awaits); when output
        ran past the reservation and no take is in flight, start one."""
        st = self._streams.setdefault(flow_id, _Stream())
        if st.over is not None or (st.task is not None and not st.task.done()):
            return st.over
        over = {i: est_in + out - (h.taken + h.extra) for i, h in enumerate(held)
                if h.limit.spec.kind is LimitKind.TOKENS}
        st.extra = {i: n for i, n in over.items() if n > 0}
        if st.extra:
            st.task = self._spawn(self._take_more(held, st, out), "ratelimit.overrun")
        return None

    async def _take_more(self, held: list[RateHold], st: _Stream, out: int) -> None:
        assert self.shared is not None
        shared = self.shared
        idx = list(st.extra)
        hs = [held[i] for i in idx]
        try:
            reply = await self.redis.take(
                shared.async_client(), [shared.key("rl", h.limit.id, h.key) for h in hs],
                [h.limit.spec for h in hs], [st.extra[i] for i in idx])
        except (redis.RedisError, OSError) as exc:
            shared.failed("ratelimit.overrun", exc)
            h = hs[0]
            st.over = Overrun("ratelimit", h.limit.id, (
                f"rate limit {h.limit.id} for {h.key!r} could not count output beyond the "
                f"reservation: the shared state (Redis) failed ({type(exc).__name__}: {exc}); "
                "the rest of the answer was not sent"))
            return
        shared.worked()
        if reply.failed is not None:
            st.over = _ran_out(hs[reply.failed], out)
            return
        for i in idx:
            held[i].extra += st.extra[i]

    def settle(self, flow_id: str,
               used: int | None) -> list[tuple[RateHold, float | None]] | None:
        """The call ended: forget its holds and settle token reservations to ``used`` (input +
        output tokens metered). ``None`` when it held nothing or no usage is known (the
        reservation then stands); else each token hold with its bucket's level now (``None``
        on Redis: the settlement is a task, which reports the level to :attr:`on_level`)."""
        held = self._held.pop(flow_id, None)
        self._counting.discard(flow_id)
        stream = self._streams.pop(flow_id, None)
        if not held or used is None:
            return None
        if held[0].bucket is None:
            tokens = [h for h in held if h.limit.spec.kind is LimitKind.TOKENS]
            if tokens:
                self._spawn(self._settle_shared(tokens, used, stream), "ratelimit.settle")
            return [(h, None) for h in tokens]
        now = self.clock()
        settled: list[tuple[RateHold, float | None]] = []
        for h in held:
            if h.limit.spec.kind is LimitKind.TOKENS and h.bucket is not None:
                h.bucket.settle(used - h.taken - h.extra, now)
                settled.append((h, h.bucket.level(now)))
        return settled

    async def _settle_shared(self, held: list[RateHold], used: int,
                             stream: _Stream | None) -> None:
        """Settle on Redis once any mid-stream take has landed (its tokens count as taken)."""
        if stream is not None and stream.task is not None:
            await asyncio.wait([stream.task])
        assert self.shared is not None
        shared = self.shared
        try:
            levels = await self.redis.adjust(
                shared.async_client(), [shared.key("rl", h.limit.id, h.key) for h in held],
                [h.limit.spec for h in held], [used - h.taken - h.extra for h in held])
        except (redis.RedisError, OSError) as exc:
            shared.failed("ratelimit.settle", exc)
            return  # the reservation stands: the bucket errs strict
        shared.worked()
        if self.on_level is not None:
            for h, level in zip(held, levels, strict=True):
                self.on_level(h.limit.id, h.key, level)

    def _spawn(self, coro: Any, op: str) -> asyncio.Task[None]:
        """Run ``coro`` on the event loop without waiting for it; a crash is logged."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("fleetgate: rate limits: %s failed", op, exc_info=t.exception())
        task.add_done_callback(done)
        return task

    def snapshot(self) -> dict[str, Any]:
        """Bucket levels (``GET /limits``; a thread). On Redis: the fleet's levels of the
        buckets this replica used (the last 1,000)."""
        if not self.on_redis:
            return {"buckets": self.buckets.snapshot(self.clock())}
        assert self.shared is not None
        with self._touched_lock:
            items = list(self._touched.items())
        try:
            levels = self.redis.levels(self.shared.sync_client(),
                                       [self.shared.key("rl", lid, key) for (lid, key), _ in items],
                                       [lim.spec for _, lim in items])
        except (redis.RedisError, OSError) as exc:
            self.shared.failed("ratelimit.levels", exc)
            return {"buckets": [], "engine": "redis",
                    "error": f"Redis could not be read: {type(exc).__name__}: {exc}"}
        self.shared.worked()
        return {"engine": "redis", "buckets": [
            {"limit": lid, "key": key, "level": round(level, 3), "max": lim.spec.max_tokens,
             "type": lim.spec.kind.value} for ((lid, key), lim), level in zip(items, levels, strict=True)]}


def _ran_out(h: RateHold, out: int) -> Overrun:
    spec = h.limit.spec
    return Overrun("ratelimit", h.limit.id, (
        f"rate limit {h.limit.id} for {h.key!r} ({spec.tokens_per_fill} tokens every "
        f"{duration_text(spec.fill_interval)}) ran out after {out} output tokens; the "
        "rest of the answer was not sent"))
