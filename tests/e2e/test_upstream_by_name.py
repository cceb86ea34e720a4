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


def test_concurrent_requests_on_one_tunnel_all_answered(gateway: Gateway, upstream: Upstream) -> None:
    # HTTP/2 to the gateway: 20 streams on one tunnel; HTTP/1.1 upstream, so the gateway needs
    # one upstream connection per request in flight, never more than mitmproxy's five.
    with gateway.client(token(), timeout=10.0, http2=True,
                        limits=httpx.Limits(max_connections=1)) as c:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            futures = [pool.submit(c.post, f"{upstream.url}/v1/chat/completions", json={"n": i})
                       for i in range(20)]
            statuses = [f.result().status_code for f in futures]
        # then sequential requests on the same tunnel reuse what is open
        before = upstream.connections
        more = [c.get(f"{upstream.url}/again/{i}").status_code for i in range(10)]
    assert statuses == [200] * 20
    assert more == [200] * 10
    assert 1 <= before <= 5, before
    assert upstream.connections == before


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
