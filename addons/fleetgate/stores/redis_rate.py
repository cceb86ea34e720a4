"""Rate-limit buckets on Redis: the same token buckets as :class:`fleetgate.limits.bucket.Bucket`,
shared by every gateway of a fleet (``fleetgate_state=redis://…``).

A bucket is one hash (``t``: tokens, ``f``: time of the last fill) under the fleet's hash tag,
so every bucket of a request is in one Cluster slot. The arithmetic runs inside Redis, in Lua:

* :data:`TAKE` takes ``n`` from SEVERAL buckets at once, all or nothing (a request's limits):
  it evaluates them in order and, at the first that refuses, takes nothing from any. Redis runs a
  script alone, so fifty requests spread over any number of gateways can never together take
  more than a bucket holds.
* :data:`ADJUST` adds or removes tokens (settlement to the metered usage: may go below zero,
  never above the maximum).
* :data:`PEEK` reads levels without writing (``GET /limits``).

The clock is Redis's own (``TIME`` in the script), so replicas whose clocks disagree still
agree on when a bucket fills; tests pass an explicit ``now`` instead. A bucket that does not
exist is full (Bucket starts full); every write sets a TTL of the time the bucket needs to be
full again plus a margin, so an idle key expires exactly when forgetting it changes nothing.
Numbers in the hash are written with 17 significant digits: a double survives the round trip,
so the Lua results equal :class:`Bucket`'s bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript, Script

from fleetgate.limits.bucket import BucketSpec, Take

__all__ = ["ADJUST", "PEEK", "TAKE", "TTL_MARGIN", "RedisRates", "TakeReply", "parse_take"]

TTL_MARGIN = 60  # seconds a bucket key outlives the moment it is full again

_PRELUDE = """
local function clock()
  if ARGV[1] ~= '' then return tonumber(ARGV[1]) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function num(x) return string.format('%.17g', x) end
-- the bucket at KEYS[i] as of now (Bucket._refill), full when it does not exist
local function load(key, max, tpf, fi, now)
  local v = redis.call('HMGET', key, 't', 'f')
  local tokens, last = tonumber(v[1]), tonumber(v[2])
  if tokens == nil or last == nil then return max, now end
  if now < last then return math.min(tokens, max), now end
  local fills = math.floor((now - last) / fi)
  if fills > 0 then
    tokens = math.min(max, tokens + fills * tpf)
    last = last + fills * fi
  end
  return math.min(tokens, max), last  -- a reload that lowered the maximum: clamp
end
local function store(key, tokens, last, max, tpf, fi, now)
  redis.call('HSET', key, 't', num(tokens), 'f', num(last))
  local fills = 0
  if tokens < max then fills = math.ceil((max - tokens) / tpf) end
  local ttl = last + fills * fi - now + tonumber(ARGV[2])
  redis.call('PEXPIRE', key, math.max(1000, math.ceil(ttl * 1000)))
end
local function spec(i)
  local b = 2 + (i - 1) * 4
  return tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
end
"""

# ARGV: now ('' = Redis TIME), ttl margin, then per key: max_tokens, tokens_per_fill,
# fill_interval, n. Reply: failed index (1-based, 0 = all taken), now, then per bucket
# evaluated: ok, remaining, reset_after, retry_after, never (Bucket.take).
TAKE = _PRELUDE + """
local now = clock()
local out = {0, num(now)}
local seen = {}
local function keep(upto, after)
  -- write what was evaluated: the takes when all passed; else each bucket as it was (a refill
  -- changes no level, and a new bucket starts its fill clock now, as Buckets.get does)
  for i = 1, upto do
    local max, tpf, fi = spec(i)
    store(KEYS[i], seen[i][after], seen[i][3], max, tpf, fi, now)
  end
end
for i = 1, #KEYS do
  local max, tpf, fi, n = spec(i)
  local tokens, last = load(KEYS[i], max, tpf, fi, now)
  local reset = math.max(0, last + fi - now)
  local remaining = math.max(0, math.floor(tokens))
  seen[i] = {tokens, tokens - n, last}
  local ok, retry, never = 0, 0, 0
  if n > max then
    never = 1
  elseif tokens >= n then
    ok = 1
    remaining = math.max(0, math.floor(tokens - n))
  else
    retry = reset + (math.ceil((n - tokens) / tpf) - 1) * fi
  end
  for _, x in ipairs({ok, remaining, num(reset), num(retry), never}) do table.insert(out, x) end
  if ok == 0 then
    out[1] = i
    keep(i, 1)  -- all or nothing: nothing taken
    return out
  end
end
keep(#KEYS, 2)
return out
"""

# ARGV as TAKE, n being the delta: > 0 takes more (may go below zero), < 0 gives back (never
# above max_tokens). Reply: each bucket's level after (Bucket.settle).
ADJUST = _PRELUDE + """
local now = clock()
local out = {}
for i = 1, #KEYS do
  local max, tpf, fi, delta = spec(i)
  local tokens, last = load(KEYS[i], max, tpf, fi, now)
  tokens = math.min(max, tokens - delta)
  store(KEYS[i], tokens, last, max, tpf, fi, now)
  out[i] = num(tokens)
end
return out
"""

# ARGV as TAKE (n ignored). Reply: each bucket's level now (Bucket.level), nothing written.
PEEK = _PRELUDE + """
local now = clock()
local out = {}
for i = 1, #KEYS do
  local max, tpf, fi = spec(i)
  local tokens = load(KEYS[i], max, tpf, fi, now)
  out[i] = num(tokens)
end
return out
"""


@dataclass(frozen=True)
class TakeReply:
    """What :data:`TAKE` answered: ``failed`` is the index of the bucket that refused (its
    take is the last of ``takes``) or ``None`` when every bucket gave ``n``."""

    failed: int | None
    now: float
    takes: tuple[Take, ...]


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def parse_take(reply: Sequence[Any]) -> TakeReply:
    """The script's flat reply as :class:`Take` objects (floats travel as strings: Redis
    truncates a Lua number to an integer)."""
    failed = int(reply[0])
    takes = []
    for i in range(2, len(reply), 5):
        ok, remaining, reset, retry, never = reply[i:i + 5]
        takes.append(Take(bool(int(ok)), int(remaining), float(_text(reset)),
                          float(_text(retry)), never=bool(int(never))))
    return TakeReply(failed - 1 if failed else None, float(_text(reply[1])), tuple(takes))


def _argv(specs: Sequence[BucketSpec], ns: Sequence[int], now: float | None,
          margin: float) -> list[str]:
    args = ["" if now is None else repr(float(now)), repr(float(margin))]
    for spec, n in zip(specs, ns, strict=True):
        args += [str(spec.max_tokens), str(spec.tokens_per_fill), repr(float(spec.fill_interval)),
                 str(int(n))]
    return args


class RedisRates:
    """The three scripts, registered once per client (EVALSHA, EVAL when Redis lost them).

    ``keys`` are built by the caller with ``SharedState.key("rl", limit, key)``; ``specs`` are
    the limits' numbers as the rules say them now; ``now`` is for tests only (and so is a
    ``ttl_margin`` other than :data:`TTL_MARGIN`)."""

    def __init__(self, ttl_margin: float = TTL_MARGIN) -> None:
        self.ttl_margin = ttl_margin
        self._async: tuple[aioredis.Redis, AsyncScript, AsyncScript] | None = None
        self._sync: tuple[redis.Redis, Script] | None = None

    def _async_scripts(self, client: aioredis.Redis) -> tuple[AsyncScript, AsyncScript]:
        if self._async is None or self._async[0] is not client:
            self._async = (client, client.register_script(TAKE),
                           client.register_script(ADJUST))
        return self._async[1], self._async[2]

    async def take(self, client: aioredis.Redis, keys: Sequence[str],
                   specs: Sequence[BucketSpec], ns: Sequence[int],
                   now: float | None = None) -> TakeReply:
        """Take ``ns[i]`` from every bucket ``keys[i]``, all or nothing."""
        script, _ = self._async_scripts(client)
        return parse_take(await script(keys=list(keys), args=_argv(specs, ns, now, self.ttl_margin)))

    async def adjust(self, client: aioredis.Redis, keys: Sequence[str],
                     specs: Sequence[BucketSpec], deltas: Sequence[int],
                     now: float | None = None) -> list[float]:
        """Take ``deltas[i]`` more (> 0) or give it back (< 0); the levels after."""
        _, script = self._async_scripts(client)
        return [float(_text(x)) for x in
                await script(keys=list(keys), args=_argv(specs, deltas, now, self.ttl_margin))]

    def levels(self, client: redis.Redis, keys: Sequence[str], specs: Sequence[BucketSpec],
               now: float | None = None) -> list[float]:
        """The buckets' levels now (the synchronous client: ``GET /limits`` runs in a thread)."""
        if not keys:
            return []
        if self._sync is None or self._sync[0] is not client:
            self._sync = (client, client.register_script(PEEK))
        reply = self._sync[1](keys=list(keys), args=_argv(specs, [0] * len(keys), now, self.ttl_margin))
        return [float(_text(x)) for x in reply]
