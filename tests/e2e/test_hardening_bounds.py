"""Bounds on time and header size through a real mitmdump (issue 14, items 6-8).

An upstream that accepts and never answers gets the agent a 504 ``upstream.timeout`` at the
configured time; a stream that stalls mid-way is cut; connections that trickle their headers
(slowloris) are closed while a normal agent keeps working; too many or too large request
headers get 431. Timeouts are set to seconds here; the time windows are asserted loosely,
the behaviour strictly.
"""

from __future__ import annotations

import base64
import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import pytest

from harness import (
    Gateway,
    Seen,
    Upstream,
    register_name,
    sse_stream,
    token,
    unregister_names,
    upstream_name,
    write_rules,
)

pytestmark = pytest.mark.e2e

TIMEOUT = 2  # every bound under test, in seconds
SLACK = 3.0  # the scan tick, a loaded 2-core machine, TLS: generous, never a behaviour change


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at teardown so upstream handlers blocked "forever" return and their threads end."""
    ev = threading.Event()
    yield ev
    ev.set()


@pytest.fixture
def hanging(upstream: Upstream, release: threading.Event) -> Upstream:
    def never_answer(h: BaseHTTPRequestHandler, seen: Seen) -> None:
        release.wait(60)  # accepted, request read, no response

    def stall_after_first_event(h: BaseHTTPRequestHandler, seen: Seen) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        chunk = b'data: {"n": 0}\n\n'
        h.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        h.wfile.flush()
        release.wait(60)  # headers sent, then silence
        h.close_connection = True

    upstream.route("/hang", never_answer)
    upstream.route("/stall", stall_after_first_event)
    # slower than nothing, but never silent for TIMEOUT: must not be cut
    upstream.route("/slow-stream", sse_stream(events=8, interval=TIMEOUT / 4))
    return upstream


@pytest.fixture
def gw(make_gateway, tmp_path: Path, hanging: Upstream) -> Gateway:
    return make_gateway(write_rules(tmp_path / "rules.yaml", [hanging.port]),
                        fleetgate_upstream_response_timeout=str(TIMEOUT),
                        fleetgate_upstream_idle_timeout=str(TIMEOUT),
                        fleetgate_client_header_timeout=str(TIMEOUT))


def _metric(gw: Gateway, name: str, **labels: str) -> float:
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}\{{{re.escape(sel)}\}} (\S+)$", gw.metrics(), re.MULTILINE)
    return float(m.group(1)) if m else 0.0


# -- upstream first byte ---------------------------------------------------------------


def test_upstream_that_never_answers_gets_504_at_the_configured_time(
        gw: Gateway, hanging: Upstream) -> None:
    with gw.client(token(), timeout=TIMEOUT * 10) as c:
        t0 = time.monotonic()
        r = c.get(f"{hanging.url}/hang")
        elapsed = time.monotonic() - t0
    assert r.status_code == 504, r.text
    assert TIMEOUT * 0.9 <= elapsed <= TIMEOUT + SLACK, elapsed
    body = r.json()
    assert body["error"]["code"] == "upstream.timeout"
    assert body["fleetgate"]["rule"] == "upstream.timeout"
    did = r.headers["X-Fleetgate-Decision-Id"]
    assert body["fleetgate"]["decision_id"] == did
    assert "/hang" in hanging.paths()  # it was allowed and reached the upstream
    d = gw.wait_for_decision(lambda d: d.get("decision_id") == did)
    assert d["status"] == 504
    assert _metric(gw, "fleetgate_upstream_failures_total", rule="upstream.timeout") == 1


def test_agent_connection_survives_an_upstream_timeout(gw: Gateway, hanging: Upstream) -> None:
    with gw.client(token(), timeout=TIMEOUT * 10) as c:
        assert c.get(f"{hanging.url}/hang").status_code == 504
        r = c.get(f"{hanging.url}/after")  # same pooled agent connection, a fresh upstream one
    assert r.status_code == 200 and r.json()["path"] == "/after"


# -- idle between chunks ---------------------------------------------------------------


def test_stream_that_stalls_is_cut_after_the_idle_timeout(gw: Gateway, hanging: Upstream) -> None:
    got: list[str] = []
    with gw.client(token(), timeout=TIMEOUT * 10) as c, \
            c.stream("GET", f"{hanging.url}/stall") as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got.append(next(lines))  # the first event arrives
        t0 = time.monotonic()
        with pytest.raises(httpx.HTTPError):  # the gateway closes the stream, not our timeout
            for line in lines:
                got.append(line)
        elapsed = time.monotonic() - t0
    assert got[0].startswith("data:") and not any("n\": 1" in g for g in got)
    assert elapsed <= TIMEOUT + SLACK, elapsed
    assert _metric(gw, "fleetgate_flows_cut_total", rule="upstream.idle") == 1
    gw.wait_for_output("cut (upstream.idle)")
    gw.wait_for_decision(lambda d: d.get("rule") == "upstream.idle")


def test_slow_but_steady_stream_is_not_cut(gw: Gateway, hanging: Upstream) -> None:
    with gw.client(token(), timeout=TIMEOUT * 10) as c, \
            c.stream("GET", f"{hanging.url}/slow-stream") as r:
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    assert len(events) == 8  # ran 2x the idle bound in total, never idle for it
    assert _metric(gw, "fleetgate_flows_cut_total", rule="upstream.idle") == 0


# -- slowloris -------------------------------------------------------------------------


def test_slowloris_connections_are_closed_while_an_agent_keeps_working(
        gw: Gateway, hanging: Upstream) -> None:
    target = f"{hanging.name}:{hanging.port}"
    socks: list[socket.socket] = []
    for i in range(50):
        s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
        if i % 5:  # most trickle a CONNECT; some send nothing at all
            s.sendall(f"CONNECT {target} HTTP/1.1\r\n".encode())
        socks.append(s)
    opened = time.monotonic()
    closed_at: dict[int, float] = {}
    agent_status: list[int] = []
    stop = threading.Event()

    def agent() -> None:
        with gw.client(token(), timeout=10) as c:
            while not stop.is_set():
                agent_status.append(c.get(f"{hanging.url}/ok").status_code)
                time.sleep(0.1)

    worker = threading.Thread(target=agent)
    worker.start()
    try:
        deadline = opened + TIMEOUT + SLACK + 2
        while len(closed_at) < len(socks) and time.monotonic() < deadline:
            for i, s in enumerate(socks):
                if i in closed_at:
                    continue
                try:  # one header byte at a time, never the blank line
                    s.sendall(b"X")
                    s.settimeout(0.001)
                    if s.recv(1024) == b"":
                        closed_at[i] = time.monotonic()
                except TimeoutError:
                    pass
                except OSError:
                    closed_at[i] = time.monotonic()
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join(15)
        for s in socks:
            s.close()
    assert len(closed_at) == 50, f"{50 - len(closed_at)} slowloris connections left open"
    assert max(closed_at.values()) - opened <= TIMEOUT + SLACK
    assert min(closed_at.values()) - opened >= TIMEOUT * 0.9  # not before the bound
    assert len(agent_status) >= 5 and set(agent_status) == {200}, agent_status
    assert _metric(gw, "fleetgate_connections_refused_total",
                   reason="client.header_timeout") >= 50


def test_request_in_flight_longer_than_the_header_timeout_is_not_closed(
        make_gateway, tmp_path: Path, hanging: Upstream) -> None:
    """The header clock stops at a request's headers: a slow answer is the upstream clock's."""
    gw = make_gateway(write_rules(tmp_path / "rules2.yaml", [hanging.port]),
                      fleetgate_upstream_response_timeout="20",
                      fleetgate_client_header_timeout="1")
    hanging.route("/slow", lambda h, seen: (time.sleep(2.5), _ok(h)))
    with gw.client(token(), timeout=20) as c:
        r = c.get(f"{hanging.url}/slow")
        again = c.get(f"{hanging.url}/slow")  # and the next one on the same client
    assert r.status_code == 200 and r.text == "ok"
    assert again.status_code == 200


def _ok(h: BaseHTTPRequestHandler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", "2")
    h.end_headers()
    h.wfile.write(b"ok")


# -- header count and size -------------------------------------------------------------


def test_too_many_headers_get_431_and_never_reach_upstream(gw: Gateway, hanging: Upstream) -> None:
    headers = {f"x-h{i}": "v" for i in range(300)}
    with gw.client(token()) as c:
        r = c.get(f"{hanging.url}/many", headers=headers)
        # http.server itself refuses more than 100 header fields
        ok = c.get(f"{hanging.url}/fewer", headers=dict(list(headers.items())[:90]))
    assert r.status_code == 431, r.text
    body = r.json()
    assert body["fleetgate"]["rule"] == "request.headers" and "header fields" in body["error"]["message"]
    assert body["fleetgate"]["decision_id"] == r.headers["X-Fleetgate-Decision-Id"]
    assert ok.status_code == 200
    assert "/many" not in hanging.paths() and "/fewer" in hanging.paths()
    d = gw.wait_for_decision(lambda d: d.get("decision_id") == body["fleetgate"]["decision_id"])
    assert d["status"] == 431


def test_too_large_header_gets_431_and_never_reaches_upstream(
        gw: Gateway, hanging: Upstream) -> None:
    with gw.client(token()) as c:
        r = c.get(f"{hanging.url}/big", headers={"x-big": "a" * 70_000})
    assert r.status_code == 431, r.text
    assert r.json()["fleetgate"]["rule"] == "request.headers"
    assert "/big" not in hanging.paths()


def test_unfinished_huge_head_is_answered_431_before_it_is_buffered(
        gw: Gateway, hanging: Upstream) -> None:
    """A 1 MB header line sent without ever ending: refused once it passes 64 KiB."""
    auth = base64.b64encode(f"agent:{token()}".encode()).decode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(f"GET http://{hanging.name}:{hanging.port}/huge HTTP/1.1\r\n"
                  f"Host: {hanging.name}:{hanging.port}\r\nProxy-Authorization: Basic {auth}\r\n"
                  "X-Huge: ".encode())
        sent = 0
        answer = b""
        try:
            while sent < 1_000_000 and not answer:
                s.sendall(b"a" * 16_384)
                sent += 16_384
                s.settimeout(0.05)
                with contextlib.suppress(TimeoutError):
                    answer = s.recv(65536)
            s.settimeout(5)
            while chunk := s.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b'"rule": "request.headers"' in answer and b"X-Fleetgate-Decision-Id" in answer
    assert sent < 200_000  # refused near the bound, not after the whole line
    assert "/huge" not in hanging.paths()


def test_a_slow_streamed_upload_is_not_an_upstream_timeout(
        make_gateway, tmp_path: Path, hanging: Upstream) -> None:
    """The first-byte clock restarts with every chunk of a streamed upload: an upload longer than
    the bound is still answered (the upstream answers once it has read it all)."""
    gw = make_gateway(write_rules(tmp_path / "r.yaml", [hanging.port]),
                      fleetgate_upstream_response_timeout=str(TIMEOUT),
                      fleetgate_stream_min_bytes="1")  # stream even this small body

    def body() -> Iterator[bytes]:
        for _ in range(6):  # 3x the bound in all, never silent for half of it
            yield b"x" * 1000
            time.sleep(TIMEOUT / 2)

    with gw.client(token(), timeout=TIMEOUT * 10) as c:
        r = c.post(f"{hanging.url}/upload", content=body(),
                   headers={"Content-Length": "6000", "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert hanging.seen[-1].body == b"x" * 6000


# -- upstream connect --------------------------------------------------------------------


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port on 127.0.0.1 whose accept queue is full: a new connect to it never completes
    (the kernel drops its SYNs), as with a firewalled or vanished upstream. Named like the
    other upstreams (``up<port>.fleetgate.test``)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)  # never accepted: one queued connection fills the queue
    port = server.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=2)
    register_name(upstream_name(port), port, port)
    try:
        yield port
    finally:
        unregister_names(port)
        filler.close()
        server.close()


def test_upstream_that_never_accepts_gets_504_at_the_connect_timeout(
        make_gateway, tmp_path: Path, hanging: Upstream, blackhole: int) -> None:
    gw = make_gateway(write_rules(tmp_path / "r.yaml", [hanging.port, blackhole]),
                      fleetgate_upstream_connect_timeout=str(TIMEOUT),
                      fleetgate_upstream_response_timeout=str(TIMEOUT * 10))
    with gw.client(token(), timeout=TIMEOUT * 10) as c:
        t0 = time.monotonic()
        r = c.get(f"https://{upstream_name(blackhole)}:{blackhole}/v1/models")
        elapsed = time.monotonic() - t0
        assert r.status_code == 504, r.text
        assert TIMEOUT * 0.9 <= elapsed <= TIMEOUT + SLACK, elapsed
        body = r.json()
        assert body["fleetgate"]["rule"] == "upstream.timeout"
        assert "fleetgate_upstream_connect_timeout" in body["error"]["message"]
        assert r.headers.get("x-should-retry") != "false"  # a retry may find it up
        did = r.headers["X-Fleetgate-Decision-Id"]
        # the agent's connection keeps working for the next request
        after = c.get(f"{hanging.url}/after")
    assert after.status_code == 200 and after.json()["path"] == "/after"
    d = gw.wait_for_decision(lambda d: d.get("decision_id") == did)
    assert d["status"] == 504
    assert _metric(gw, "fleetgate_upstream_failures_total", rule="upstream.timeout") == 1


def test_pending_connect_at_the_response_timeout_gets_504(
        make_gateway, tmp_path: Path, blackhole: int) -> None:
    """The response bound counts from the request being sent, connect included: when it runs
    out while the dial is still pending, the dial is given up and the agent gets 504 (not a
    dropped connection)."""
    gw = make_gateway(write_rules(tmp_path / "r.yaml", [blackhole]),
                      fleetgate_upstream_connect_timeout=str(TIMEOUT * 10),
                      fleetgate_upstream_response_timeout=str(TIMEOUT))
    with gw.client(token(), timeout=TIMEOUT * 10) as c:
        t0 = time.monotonic()
        r = c.post(f"https://{upstream_name(blackhole)}:{blackhole}/v1/chat/completions",
                   json={"model": "gpt-4o-mini", "messages": []})
        elapsed = time.monotonic() - t0
    assert r.status_code == 504, r.text
    assert TIMEOUT * 0.9 <= elapsed <= TIMEOUT + SLACK, elapsed
    assert "fleetgate_upstream_response_timeout" in r.json()["error"]["message"]
