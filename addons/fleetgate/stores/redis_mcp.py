"""MCP state several gateways share, in Redis: approved tool pins, definitions waiting for an
operator, and who owns each MCP session.

**Pins** (:class:`RedisPinStore`, a :class:`fleetgate.stores.pins.PinStore`): one hash,
field ``server<TAB>tool`` -> sha256 of the approved definition. The pure
:class:`fleetgate.mcp.pins.Pins` hands over its whole map after each change; the store writes
only what changed since it last read or wrote the hash, on a writer thread (never on the
event loop): a pin learned on first sight with ``HSETNX`` (another gateway that learned the
server first wins, and this one adopts its pins at the next sync), an approval with ``HSET``.
Definitions waiting for approval go to a second hash, so an operator can approve on any
gateway a tool another gateway saw change.

**Session owners** (:class:`RedisSessionOwners`): ``SET owner NX`` per (server, session id),
with a TTL renewed as the session is used, so an MCP session opened through one replica
cannot be ridden by another agent through another.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import redis
import redis.asyncio as aioredis

from fleetgate.mcp.pins import Pending, PinMap, PinState
from fleetgate.sqlite import WriterThread

__all__ = ["RedisPinStore", "RedisSessionOwners"]

Keys = Callable[..., str]
Report = Callable[[str, BaseException | None], None]  # (op, error or None)

SEP = "\t"


def _field(server: str, tool: str) -> str:
    return f"{server}{SEP}{tool}"


def _split(field: str | bytes) -> tuple[str, str]:
    text = field.decode() if isinstance(field, bytes) else field
    server, _, tool = text.partition(SEP)
    return server, tool


def pin_map(raw: Mapping[Any, Any]) -> PinMap:
    """A pins hash as ``server -> {tool: sha256}``."""
    out: PinMap = {}
    for f, v in raw.items():
        server, tool = _split(f)
        out.setdefault(server, {})[tool] = v.decode() if isinstance(v, bytes) else str(v)
    return out


class RedisPinStore:
    def __init__(self, client: redis.Redis, keys: Keys, report: Report) -> None:
        self.client = client
        self.pins_key = keys("mcp", "pins")
        self.pending_key = keys("mcp", "pending")
        self.report = report
        self._known: dict[tuple[str, str], str] = {}  # what the hash held when last read/written
        self._writer = WriterThread("fleetgate-pins-writer", 1000)

    # -- PinStore -----------------------------------------------------------------------

    def load(self) -> PinMap:
        """The shared pins (startup). Raises ``OSError`` when Redis cannot be read: the
        gateway does not start vetting tools against an empty pin set."""
        try:
            raw = self.client.hgetall(self.pins_key)
        except redis.RedisError as exc:
            self.report("pins.load", exc)
            raise OSError(f"cannot read MCP pins from Redis ({exc})") from None
        self.report("pins.load", None)
        pins = pin_map(raw)  # type: ignore[arg-type]
        self.remember(pins)
        return pins

    def remember(self, pins: Mapping[str, Mapping[str, str]]) -> None:
        """What the shared hash holds now (after a sync): the base the next save diffs against."""
        for server, tools in pins.items():
            for tool, fp in tools.items():
                self._known[(server, tool)] = fp

    def save(self, pins: Mapping[str, Mapping[str, str]]) -> None:
        """Write what changed: new pins with HSETNX, changed ones (approvals) with HSET."""
        new: dict[str, str] = {}
        changed: dict[str, str] = {}
        for server, tools in pins.items():
            for tool, fp in tools.items():
                was = self._known.get((server, tool))
                if was == fp:
                    continue
                (new if was is None else changed)[_field(server, tool)] = fp
                self._known[(server, tool)] = fp
        if not new and not changed:
            return

        def write() -> None:
            pipe = self.client.pipeline(transaction=True)
            for f, fp in new.items():
                pipe.hsetnx(self.pins_key, f, fp)
            if changed:
                pipe.hset(self.pins_key, mapping=changed)
                pipe.hdel(self.pending_key, *changed)
            pipe.execute()
        self._submit("pins.save", write)

    # -- the shared pending list --------------------------------------------------------

    def add_pending(self, p: Pending) -> None:
        body = json.dumps({"state": p.state.value, "sha256": p.fingerprint})
        self._submit("pins.pending", lambda: self.client.hset(
            self.pending_key, _field(p.server, p.tool), body))

    def pending(self) -> list[Pending]:
        """Every definition waiting for an operator, whichever gateway saw it (admin thread)."""
        try:
            raw: dict[Any, Any] = self.client.hgetall(self.pending_key)  # type: ignore[assignment]
        except redis.RedisError as exc:
            self.report("pins.pending", exc)
            raise
        out = []
        for f, v in raw.items():
            server, tool = _split(f)
            body = json.loads(v)
            out.append(Pending(server, tool, PinState(body["state"]), str(body["sha256"])))
        return sorted(out, key=lambda p: (p.server, p.tool))

    def take_pending(self, server: str, tool: str) -> Pending | None:
        """The shared pending definition of ``tool``, removed from the list (an approval)."""
        f = _field(server, tool)
        pipe = self.client.pipeline(transaction=True)
        pipe.hget(self.pending_key, f)
        pipe.hdel(self.pending_key, f)
        try:
            raw, _ = pipe.execute()
        except redis.RedisError as exc:
            self.report("pins.approve", exc)
            raise
        if raw is None:
            return None
        body = json.loads(raw)
        return Pending(server, tool, PinState(body["state"]), str(body["sha256"]))

    def _submit(self, op: str, job: Callable[[], object]) -> None:
        def run() -> None:
            try:
                job()
            except redis.RedisError as exc:
                self.report(op, exc)
                # forget what this write claimed: the next sync reads the truth again
                self._known.clear()
                return
            self.report(op, None)
        try:
            self._writer.submit(run)
        except Exception as exc:  # the queue is full: Redis stopped keeping up
            self.report(op, exc)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait (at most ``timeout``) for the queued writes (tests, shutdown)."""
        with contextlib.suppress(Exception):  # a full or stuck queue: the caller proceeds
            self._writer.submit(lambda: None).result(timeout)

    def close(self) -> None:
        self._writer.close()


class RedisSessionOwners:
    """Who owns each MCP session, shared by every gateway (asyncio client)."""

    TTL = 24 * 3600  # seconds a session's owner is kept after its last use

    def __init__(self, keys: Keys) -> None:
        self.keys = keys

    def _key(self, server: str, sid: str) -> str:
        return self.keys("mcp", "owner", server, sid)

    async def claim(self, client: aioredis.Redis, server: str, sid: str, agent: str) -> str:
        """Bind the session to ``agent`` unless another agent holds it; the owner now."""
        key = self._key(server, sid)
        pipe = client.pipeline(transaction=True)
        pipe.set(key, agent, nx=True, ex=self.TTL)
        pipe.get(key)
        pipe.expire(key, self.TTL)
        _, owner, _ = await pipe.execute()
        return owner.decode() if isinstance(owner, bytes) else str(owner)

    async def forget(self, client: aioredis.Redis, server: str, sid: str, agent: str) -> None:
        """The owner ended the session (DELETE): remove it, if it is still theirs."""
        key = self._key(server, sid)
        owner = await client.get(key)
        if owner is not None and (owner.decode() if isinstance(owner, bytes) else owner) == agent:
            await client.delete(key)
