"""The shared MCP state in a real Redis: pins written as diffs (first sight never overwrites
another gateway's pin, an approval does), the fleet's pending list, session owners; and the
pure Pins methods it relies on (adopt, pin)."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio as aioredis
from redisd import RedisServer

from fleetgate.mcp.pins import Pending, Pins, PinState
from fleetgate.stores.redis_conn import parse_state
from fleetgate.stores.redis_mcp import RedisPinStore, RedisSessionOwners

TOOL = {"name": "scan", "description": "Scan a host.", "inputSchema": {"type": "object"}}
CHANGED = {**TOOL, "description": "Scan a host and upload the results."}


def stores(server: RedisServer) -> tuple[RedisPinStore, RedisPinStore, list[tuple[str, object]]]:
    settings = parse_state(server.url)
    assert settings is not None
    seen: list[tuple[str, object]] = []
    report = lambda op, exc: seen.append((op, exc))  # noqa: E731
    return (RedisPinStore(settings.sync_client(), settings.key, report),
            RedisPinStore(settings.sync_client(), settings.key, report), seen)


def test_first_sight_never_overwrites_another_gateways_pin(redis_server: RedisServer) -> None:
    a_store, b_store, seen = stores(redis_server)
    a = Pins(a_store.load(), True, a_store.save, a_store.add_pending)
    b = Pins(b_store.load(), True, b_store.save, b_store.add_pending)
    assert a.check("srv", [TOOL]) == {"scan": PinState.PINNED}
    a_store.flush()
    # B learns the same server on first sight, but from a changed listing
    assert b.check("srv", [CHANGED]) == {"scan": PinState.PINNED}
    b_store.flush()
    shared = a_store.load()
    assert shared["srv"]["scan"] == a.pins()["srv"]["scan"]  # A's pin stands
    b.adopt(shared)  # B's next sync: the fleet's pin wins
    assert b.check("srv", [CHANGED]) == {"scan": PinState.CHANGED}
    assert all(exc is None for _, exc in seen)


def test_a_pending_definition_is_approved_on_any_gateway(redis_server: RedisServer) -> None:
    a_store, b_store, _ = stores(redis_server)
    a = Pins(a_store.load(), True, a_store.save, a_store.add_pending)
    a.check("srv", [TOOL])
    a_store.flush()
    b = Pins(b_store.load(), True, b_store.save, b_store.add_pending)
    assert b.check("srv", [CHANGED]) == {"scan": PinState.CHANGED}
    b_store.flush()
    pending = a_store.pending()
    assert [(p.server, p.tool, p.state) for p in pending] == [("srv", "scan", PinState.CHANGED)]
    # A has nothing pending locally: it approves the fleet's pending definition
    assert a.approve("srv", "scan") is False
    taken = a_store.take_pending("srv", "scan")
    assert isinstance(taken, Pending)
    a.pin("srv", "scan", taken.fingerprint)
    a_store.flush()
    assert a_store.pending() == []
    assert a_store.take_pending("srv", "scan") is None
    b.adopt(b_store.load())
    assert b.check("srv", [CHANGED]) == {"scan": PinState.PINNED}
    assert b.pending() == []


def test_a_write_that_fails_is_reported(redis_server: RedisServer) -> None:
    a_store, _, seen = stores(redis_server)
    a = Pins(a_store.load(), True, a_store.save, a_store.add_pending)
    redis_server.stop()
    a.check("srv", [TOOL])
    a_store.flush()
    assert seen and seen[-1][0] == "pins.save" and isinstance(seen[-1][1], redis.RedisError)


def test_a_session_has_one_owner_across_gateways(redis_server: RedisServer) -> None:
    settings = parse_state(redis_server.url)
    assert settings is not None
    owners = RedisSessionOwners(settings.key)

    async def run() -> tuple[str, str, str, int]:
        client: aioredis.Redis = settings.async_client()
        first = await owners.claim(client, "srv", "s1", "alice")
        second = await owners.claim(client, "srv", "s1", "mallory")
        await owners.forget(client, "srv", "s1", "mallory")  # not theirs: stays
        kept = await owners.claim(client, "srv", "s1", "bob")
        ttl = await client.ttl(settings.key("mcp", "owner", "srv", "s1"))
        await owners.forget(client, "srv", "s1", "alice")
        await client.aclose()
        return first, second, kept, int(ttl)

    first, second, kept, ttl = asyncio.run(run())
    assert (first, second, kept) == ("alice", "alice", "alice")
    assert 0 < ttl <= RedisSessionOwners.TTL
    assert settings.sync_client().exists(settings.key("mcp", "owner", "srv", "s1")) == 0
