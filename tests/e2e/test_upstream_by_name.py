"""Upstreams reached by name behave like upstreams reached by IP (issue 13).

Every real provider is a host name. The gateway resolves it itself and dials the checked
address; the connection must still be recognised for reuse afterwards, or each request opens
a new upstream connection and mitmproxy's five-per-address limit makes the sixth request on
a keep-alive tunnel wait forever.
"""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from harness import Gateway, Upstream, token

pytestmark = pytest.mark.e2e


def test_sequential_requests_on_one_tunnel_reuse_one_upstream_connection(
        gateway: Gateway, upstream: Upstream) -> None:
    assert upstream.url.startswith(f"https://{upstream.name}:")
    with gateway.client(token(), timeout=5.0,
                        limits=httpx.Limits(max_connections=1)) as c:
        statuses = [c.post(f"{upstream.url}/v1/chat/completions", json={"n": i}).status_code
                    for i in range(20)]
    assert statuses == [200] * 20
    assert len(upstream.seen) == 20
    assert upstream.connections == 1, f"{upstream.connections} upstream connections for 20 requests"


def test_concurrent_tunnels_each_reuse_their_upstream_connection(
        gateway: Gateway, upstream: Upstream) -> None:
    # The SDKs' HTTP stack (httpx) speaks HTTP/1.1 in a proxy tunnel: concurrency is one
    # tunnel per request in flight.
    # 20 concurrent requests, then 20 more on the same 20 tunnels: each tunnel keeps its one
    # upstream connection (before the fix: 40 connections, and tunnels hung past five).
    with gateway.client(token(), timeout=10.0, limits=httpx.Limits(max_connections=20)) as c:
        def burst(tag: str) -> list[int]:
            with concurrent.futures.ThreadPoolExecutor(20) as pool:
                futures = [pool.submit(c.post, f"{upstream.url}/v1/chat/completions",
                                       json={"n": f"{tag}{i}"}) for i in range(20)]
                return [f.result().status_code for f in futures]

        first = burst("a")
        opened = upstream.connections
        second = burst("b")
    assert first == [200] * 20 and second == [200] * 20
    assert len(upstream.seen) == 40
    assert opened <= 20, opened
    assert upstream.connections == opened, (opened, upstream.connections)


def test_the_dialled_address_is_the_checked_one(make_gateway, tmp_path, upstream: Upstream) -> None:
    """A name mapped (fleetgate_resolve) to an address the rules call internal is refused."""
    from harness import write_rules

    rules = write_rules(tmp_path / "r.yaml", [upstream.port], allow_private='[]')
    gw = make_gateway(rules)
    with gw.client(token()) as c:
        r = c.get(f"{upstream.url}/x")
    assert r.status_code == 502
    assert upstream.seen == []
    d = gw.wait_for_decision(lambda d: d.get("rule") == "destinations.connect")
    assert "127.0.0.1" in d["reason"]
