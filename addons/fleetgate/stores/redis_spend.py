"""Budget spend and in-flight reservations in Redis, shared by every gateway of a fleet.

Why Redis scripts: N replicas admitting calls against one hard budget must see each other's
reservations at the moment they check, or N calls that each fit can together overspend. One
Lua script per operation makes read-check-write atomic across the fleet; the window math
(:func:`fleetgate.limits.budget.window`, :func:`~fleetgate.limits.budget.counted_since`) stays
in Python and reaches the scripts as numbers, so there is one definition of a window.

Layout (every key under the one hash tag of :meth:`fleetgate.runtime.shared.SharedState.key`,
so the multi-key scripts run on Redis Cluster too):

- ``budget:spend:<len>.<budget>:<key>`` (hash): field ``<window start>:usd`` /
  ``<window start>:tok`` per window, and ``r:usd`` / ``r:tok``, the running total of what calls
  in flight reserved. Windows that no longer count are pruned by the reserve script; the hash
  expires a day after its current window ends.
- ``budget:res:<flow>`` (hash): one call's reservation: flow, replica, created, and per budget
  (``<i>:k`` spend hash, ``<i>:b``, ``<i>:key``, ``<i>:w`` window, ``<i>:usd``, ``<i>:tok``).
- ``budget:expiry`` (sorted set): flow -> when its reservation is due (epoch seconds). The
  replica serving the call renews it while the call lives; a replica that died stops renewing,
  and the first sweep of any replica after the expiry charges the reserved amount, once.
- ``budget:keys:<budget>`` (set): the keys that ever spent, for ``GET /budgets``.

Settling is idempotent: a settle (or release) of a reservation that is unknown, already
settled or already swept adds nothing, so no spend is ever counted twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis
import redis.asyncio as aioredis

from fleetgate.limits.budget import Amount

__all__ = ["HoldRequest", "RedisSpendStore", "Refused", "SettleCharge", "Swept"]

Keys = Callable[..., str]


class HoldRequest(NamedTuple):
    """One budget a call reserves against; the window math already done in Python."""

    budget: str
    key: str
    since: int  # counted_since(spec, now): windows at or after it count
    window_start: int  # window(spec, now)[0]: where a sweep charges the reservation
    amount: Amount
    hard_usd: float | None
    hard_tokens: int | None
    keep_until: int  # epoch seconds the spend hash must outlive


class SettleCharge(NamedTuple):
    """Metered spend to add to one budget key's window (``since``: for the spend before)."""

    budget: str
    key: str
    since: int
    window_start: int
    amount: Amount
    keep_until: int


class Refused(NamedTuple):
    """The hold at ``at`` would pass its hard ``unit``; spend and others' reservations."""

    at: int  # which hold (0-based)
    unit: str
    spent: Amount
    promised: Amount


class Swept(NamedTuple):
    """A reservation a sweep charged because its expiry passed (its gateway died)."""

    flow: str
    replica: str
    created: float
    budget: str
    key: str
    amount: Amount


_SUM = """
local function spent(k, since, prune)
  local flat = redis.call('HGETALL', k)
  local su, st, pu, pt = 0, 0, 0, 0
  local stale = {}
  for j = 1, #flat, 2 do
    local f, v = flat[j], flat[j + 1]
    local w, unit = string.match(f, '^(%d+):(%a+)$')
    if w then
      if tonumber(w) >= since then
        if unit == 'usd' then su = su + tonumber(v) else st = st + tonumber(v) end
      elseif prune then
        stale[#stale + 1] = f
      end
    elseif f == 'r:usd' then pu = tonumber(v)
    elseif f == 'r:tok' then pt = tonumber(v) end
  end
  if #stale > 0 then redis.call('HDEL', k, unpack(stale)) end
  return su, st, pu, pt
end
local function fmt(x) return string.format('%.17g', x) end
local function keep(k, untl)
  local cur = redis.call('EXPIRETIME', k)
  if cur >= 0 and cur < untl then redis.call('EXPIREAT', k, untl) end
  if cur == -1 then redis.call('EXPIREAT', k, untl) end
end
local function unreserve(k, usd, tok)
  local u = tonumber(redis.call('HINCRBYFLOAT', k, 'r:usd', -usd))
  local t = redis.call('HINCRBY', k, 'r:tok', -tok)
  if t <= 0 and u <= 1e-9 then redis.call('HDEL', k, 'r:usd', 'r:tok') end
end
"""

# KEYS: record, expiry zset, spend hash x n, keys set x n
# ARGV: flow, replica, now, expires, n, then per hold: since, window, usd, tok, hard_usd,
#       hard_tok ('' = none), keep_until, budget, key
_RESERVE = _SUM + """
local n = tonumber(ARGV[5])
local pend, snap = {}, {}
for i = 1, n do
  local b = 5 + (i - 1) * 9
  local k = KEYS[2 + i]
  local usd, tok = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local su, st, pu, pt = spent(k, tonumber(ARGV[b + 1]), true)
  local p = pend[k] or {0, 0}
  pu, pt = pu + p[1], pt + p[2]
  if ARGV[b + 5] ~= '' and su + pu + usd > tonumber(ARGV[b + 5]) + 1e-12 then
    return {0, i, 'usd', fmt(su), fmt(st), fmt(pu), fmt(pt)}
  end
  if ARGV[b + 6] ~= '' and st + pt + tok > tonumber(ARGV[b + 6]) then
    return {0, i, 'tokens', fmt(su), fmt(st), fmt(pu), fmt(pt)}
  end
  snap[#snap + 1] = fmt(su + pu)
  snap[#snap + 1] = fmt(st + pt)
  pend[k] = {p[1] + usd, p[2] + tok}
end
local rec = KEYS[1]
redis.call('HSET', rec, 'flow', ARGV[1], 'replica', ARGV[2], 'created', ARGV[3], 'n', n)
for i = 1, n do
  local b = 5 + (i - 1) * 9
  local k = KEYS[2 + i]
  redis.call('HINCRBYFLOAT', k, 'r:usd', ARGV[b + 3])
  redis.call('HINCRBY', k, 'r:tok', ARGV[b + 4])
  keep(k, tonumber(ARGV[b + 7]))
  redis.call('SADD', KEYS[2 + n + i], ARGV[b + 9])
  redis.call('HSET', rec, i .. ':k', k, i .. ':b', ARGV[b + 8], i .. ':key', ARGV[b + 9],
             i .. ':w', ARGV[b + 2], i .. ':usd', ARGV[b + 3], i .. ':tok', ARGV[b + 4])
end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
return {1, unpack(snap)}
"""

# KEYS: record, expiry zset, spend hash x n (the charges)
# ARGV: flow, n, then per charge: since, window, usd, tok, keep_until
_SETTLE = _SUM + """
local rec = KEYS[1]
if redis.call('EXISTS', rec) == 0 then return {0} end
local m = tonumber(redis.call('HGET', rec, 'n'))
for i = 1, m do
  local h = redis.call('HMGET', rec, i .. ':k', i .. ':usd', i .. ':tok')
  unreserve(h[1], tonumber(h[2]), tonumber(h[3]))
end
redis.call('DEL', rec)
redis.call('ZREM', KEYS[2], ARGV[1])
local out = {1}
local n = tonumber(ARGV[2])
for i = 1, n do
  local b = 2 + (i - 1) * 5
  local k = KEYS[2 + i]
  local su, st = spent(k, tonumber(ARGV[b + 1]), false)
  out[#out + 1] = fmt(su)
  out[#out + 1] = fmt(st)
  redis.call('HINCRBYFLOAT', k, ARGV[b + 2] .. ':usd', ARGV[b + 3])
  redis.call('HINCRBY', k, ARGV[b + 2] .. ':tok', ARGV[b + 4])
  keep(k, tonumber(ARGV[b + 5]))
end
return out
"""

# KEYS: expiry zset. ARGV: now, limit, record key prefix. The records and spend hashes are
# named by the records themselves: same hash tag, same Cluster slot.
_SWEEP = _SUM + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, flow in ipairs(due) do
  redis.call('ZREM', KEYS[1], flow)
  local rec = ARGV[3] .. flow
  local head = redis.call('HMGET', rec, 'n', 'replica', 'created')
  if head[1] then
    for i = 1, tonumber(head[1]) do
      local h = redis.call('HMGET', rec, i .. ':k', i .. ':b', i .. ':key', i .. ':w',
                           i .. ':usd', i .. ':tok')
      unreserve(h[1], tonumber(h[5]), tonumber(h[6]))
      redis.call('HINCRBYFLOAT', h[1], h[4] .. ':usd', h[5])
      redis.call('HINCRBY', h[1], h[4] .. ':tok', h[6])
      out[#out + 1] = {flow, head[2], head[3], h[2], h[3], h[5], h[6]}
    end
    redis.call('DEL', rec)
  end
end
return out
"""

# KEYS: expiry zset. ARGV: expires, flow... (only reservations still there: XX)
_RENEW = """
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[i]) end
return #ARGV - 1
"""


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _opt(v: float | int | None) -> str:
    return "" if v is None else repr(v)


@dataclass
class RedisSpendStore:
    """The scripts and key names; the caller passes the client of its thread or loop."""

    keys: Keys

    def __post_init__(self) -> None:
        self.expiry_key = self.keys("budget", "expiry")
        self._scripts: dict[tuple[int, str], Any] = {}

    def spend_key(self, budget: str, key: str) -> str:
        # the budget id's length keeps (budget "a:b", key "c") apart from ("a", "b:c")
        return self.keys("budget", "spend", f"{len(budget)}.{budget}", key)

    def record_key(self, flow: str) -> str:
        return self.keys("budget", "res", flow)

    def keys_key(self, budget: str) -> str:
        return self.keys("budget", "keys", budget)

    def _script(self, client: redis.Redis | aioredis.Redis, name: str, source: str) -> Any:
        s = self._scripts.get((id(client), name))
        if s is None:
            s = self._scripts[(id(client), name)] = client.register_script(source)
        return s

    # -- the event loop's side (async client) -------------------------------------------

    async def reserve(self, client: aioredis.Redis, flow: str, replica: str, now: float,
                      expires: float, holds: Sequence[HoldRequest]
                      ) -> tuple[list[Amount], Refused | None]:
        """Reserve every hold, all or nothing. Returns, per hold, the spend plus what other
        calls reserved at that moment (the mid-stream check's snapshot), or the refusal."""
        keys = [self.record_key(flow), self.expiry_key,
                *(self.spend_key(h.budget, h.key) for h in holds),
                *(self.keys_key(h.budget) for h in holds)]
        args: list[Any] = [flow, replica, repr(now), repr(expires), len(holds)]
        for h in holds:
            args += [h.since, h.window_start, repr(h.amount.usd), h.amount.tokens,
                     _opt(h.hard_usd), _opt(h.hard_tokens), h.keep_until, h.budget, h.key]
        res = await self._script(client, "reserve", _RESERVE)(keys=keys, args=args)
        if int(res[0]) == 0:
            return [], Refused(int(res[1]) - 1, _text(res[2]),
                               Amount(float(res[3]), int(float(res[4]))),
                               Amount(float(res[5]), int(float(res[6]))))
        vals = [float(_text(v)) for v in res[1:]]
        return [Amount(vals[i], int(vals[i + 1])) for i in range(0, len(vals), 2)], None

    async def settle(self, client: aioredis.Redis, flow: str,
                     charges: Sequence[SettleCharge]) -> list[Amount] | None:
        """Remove ``flow``'s reservation and add ``charges`` (none: a release), atomically.
        ``None``: there was no reservation (settled or swept already) and nothing was
        added; else the spend of each charge's key before it."""
        keys = [self.record_key(flow), self.expiry_key,
                *(self.spend_key(c.budget, c.key) for c in charges)]
        args: list[Any] = [flow, len(charges)]
        for c in charges:
            args += [c.since, c.window_start, repr(c.amount.usd), c.amount.tokens, c.keep_until]
        res = await self._script(client, "settle", _SETTLE)(keys=keys, args=args)
        if int(res[0]) == 0:
            return None
        vals = [float(_text(v)) for v in res[1:]]
        return [Amount(vals[i], int(vals[i + 1])) for i in range(0, len(vals), 2)]

    async def renew(self, client: aioredis.Redis, flows: Sequence[str], expires: float) -> None:
        """Push the expiry of live calls' reservations (only those still there)."""
        if flows:
            await self._script(client, "renew", _RENEW)(keys=[self.expiry_key],
                                                        args=[repr(expires), *flows])

    async def sweep(self, client: aioredis.Redis, now: float, limit: int = 100) -> list[Swept]:
        """Charge every reservation whose expiry passed its reserved amount; each is claimed
        by exactly one sweep (the script is atomic), whichever replica runs it first."""
        res = await self._script(client, "sweep", _SWEEP)(
            keys=[self.expiry_key], args=[repr(now), limit, self.record_key("")])
        return [Swept(_text(f), _text(r), float(_text(c)), _text(b), _text(k),
                      Amount(float(_text(u)), int(_text(t)))) for f, r, c, b, k, u, t in res]

    # -- admin threads (sync client) ----------------------------------------------------

    def spent(self, client: redis.Redis, budget: str, key: str, since: int) -> Amount:
        """Spend of one key since ``since`` (not what is reserved)."""
        return _sum(client.hgetall(self.spend_key(budget, key)), since)  # type: ignore[arg-type]

    def reserved(self, client: redis.Redis, budget: str, key: str) -> Amount:
        """What calls in flight reserved against one key."""
        u, t = client.hmget(self.spend_key(budget, key), ["r:usd", "r:tok"])  # type: ignore[misc]
        return Amount(float(_text(u)) if u else 0.0, int(_text(t)) if t else 0)

    def report(self, client: redis.Redis, budget: str, since: int,
               top: int = 1000) -> list[tuple[str, Amount]]:
        """The ``top`` keys of ``budget`` by spend since ``since`` (``GET /budgets``)."""
        members = sorted(_text(m) for m in client.smembers(self.keys_key(budget)))  # type: ignore[union-attr]
        pipe = client.pipeline(transaction=False)
        for k in members:
            pipe.hgetall(self.spend_key(budget, k))
        rows = [(k, _sum(raw, since)) for k, raw in zip(members, pipe.execute(), strict=True)]
        rows = [(k, a) for k, a in rows if a.usd or a.tokens]
        rows.sort(key=lambda r: (-r[1].usd, -r[1].tokens))
        return rows[:top]


def _sum(raw: dict[Any, Any], since: int) -> Amount:
    usd, tok = 0.0, 0
    for f, v in raw.items():
        w, _, unit = _text(f).partition(":")
        if w.isdigit() and int(w) >= since:
            if unit == "usd":
                usd += float(_text(v))
            else:
                tok += int(float(_text(v)))
    return Amount(usd, tok)
