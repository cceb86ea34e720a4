"""Request bodies are bounded through a real mitmdump (issue 14, item 8).

A large upload to a host nothing inspects is streamed: the gateway's RSS barely moves and the
upstream receives every byte. A body an inspector must read (an LLM route) and cannot, being
over its limit, is refused 413 from Content-Length before it is read, or, chunked, as soon as
the count passes the limit; the upstream never sees it. Small LLM bodies are judged as before.

The upload is 1 GB (``FLEETGATE_BIG_UPLOAD`` bytes to change it): about 4 s here.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme
from llm_upstream import llm_rules_extra

from harness import Gateway, register_name, token, unregister_names, upstream_name, write_rules

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
BIG = int(os.environ.get("FLEETGATE_BIG_UPLOAD", str(1000 * 1000 * 1000)))
RSS_SLACK = 10 * MIB
LLM_LIMIT = 2 * MIB  # fleetgate_llm_max_body for these tests


class _Counting(BaseHTTPRequestHandler):
    """Reads the body in 1 MiB pieces and counts it: the upstream holds none of it either."""

    protocol_version = "HTTP/1.1"
    server: _CountingServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _handle(self) -> None:
        received = 0
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                left = size
                while left:
                    got = len(self.rfile.read(min(left, MIB)))
                    if not got:
                        break
                    left -= got
                    received += got
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                got = len(self.rfile.read(min(left, MIB)))
                if not got:
                    break
                left -= got
                received += got
        with self.server.lock:
            self.server.requests.append((self.command, self.path, received))
        body = json.dumps({"received": received}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT = _handle


class _CountingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, ca: trustme.CA) -> None:
        super().__init__(("127.0.0.1", 0), _Counting)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, int]] = []
        self.port = self.server_address[1]
        self.name = upstream_name(self.port)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(self.name, "127.0.0.1").configure_cert(ctx)
        self.socket = ctx.wrap_socket(self.socket, server_side=True)
        register_name(self.name, self.port, self.port)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    @property
    def url(self) -> str:
        return f"https://{self.name}:{self.port}"

    def stop(self) -> None:
        unregister_names(self.port)
        self.shutdown()
        self.server_close()


@pytest.fixture
def sink(upstream_ca: trustme.CA) -> Iterator[_CountingServer]:
    srv = _CountingServer(upstream_ca)
    yield srv
    srv.stop()


@pytest.fixture
def llm(upstream_ca: trustme.CA) -> Iterator[_CountingServer]:
    srv = _CountingServer(upstream_ca)
    yield srv
    srv.stop()


@pytest.fixture
def gw(make_gateway, tmp_path: Path, sink: _CountingServer, llm: _CountingServer) -> Gateway:
    rules = write_rules(tmp_path / "rules.yaml", [sink.port, llm.port],
                        top=llm_rules_extra(llm.port))
    return make_gateway(rules, fleetgate_llm_max_body=str(LLM_LIMIT))


def _rss(gw: Gateway) -> int:
    assert gw.proc is not None
    for line in Path(f"/proc/{gw.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _zeros(total: int, piece: int = MIB) -> Iterator[bytes]:
    block = b"\0" * piece
    sent = 0
    while sent < total:
        n = min(piece, total - sent)
        yield block if n == piece else block[:n]
        sent += n


def _warm(gw: Gateway, sink: _CountingServer) -> None:
    """One small streamed upload first: the baseline RSS then includes the TLS and hook setup."""
    with gw.client(token("warm")) as c:
        r = c.post(f"{sink.url}/warm", content=_zeros(4 * MIB),
                   headers={"Content-Length": str(4 * MIB)})
        assert r.status_code == 200, r.text


def test_large_upload_to_plain_host_is_streamed_with_bounded_memory(
        gw: Gateway, sink: _CountingServer) -> None:
    _warm(gw, sink)
    before = _rss(gw)
    peak = before
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss(gw))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    with gw.client(token("uploader"), timeout=600) as c:
        r = c.post(f"{sink.url}/upload", content=_zeros(BIG),
                   headers={"Content-Length": str(BIG),
                            "Content-Type": "application/octet-stream"})
    elapsed = time.monotonic() - t0
    done.set()
    watcher.join()
    after = _rss(gw)
    assert r.status_code == 200, r.text
    assert r.json() == {"received": BIG}  # every byte arrived
    assert ("POST", "/upload", BIG) in sink.requests
    assert peak - before <= RSS_SLACK, (
        f"RSS grew {(peak - before) / MIB:.1f} MiB for {BIG / 1e6:.0f} MB ({elapsed:.1f}s)")
    assert after - before <= RSS_SLACK
    print(f"\n{BIG / 1e6:.0f} MB streamed in {elapsed:.1f}s; RSS +{(peak - before) / MIB:.1f} MiB")


def test_chunked_upload_to_plain_host_is_streamed(gw: Gateway, sink: _CountingServer) -> None:
    with gw.client(token("chunker"), timeout=120) as c:
        r = c.post(f"{sink.url}/chunked", content=_zeros(32 * MIB))  # generator: chunked
    assert r.status_code == 200, r.text
    assert r.json() == {"received": 32 * MIB}


def test_streamed_upload_is_still_judged_before_anything_is_forwarded(
        gw: Gateway, sink: _CountingServer) -> None:
    # the rules deny paths containing "delete": a streamed body must not slip past them
    with gw.client(token("judged"), timeout=60) as c:
        r = c.post(f"{sink.url}/delete-all", content=_zeros(16 * MIB),
                   headers={"Content-Length": str(16 * MIB)})
        assert r.status_code == 403
        assert r.headers.get("x-fleetgate-decision-id")
        # the connection is still usable after the refused body was discarded
        ok = c.post(f"{sink.url}/after", content=b"{}")
    assert ok.status_code == 200
    assert [p for _, p, _ in sink.requests] == ["/after"]


def test_upload_over_the_gateway_limit_is_refused_from_content_length(
        make_gateway, tmp_path: Path, sink: _CountingServer, llm: _CountingServer) -> None:
    rules = write_rules(tmp_path / "rules.yaml", [sink.port, llm.port])
    gw = make_gateway(rules, fleetgate_max_request_body=str(8 * MIB))
    with gw.client(token("over"), timeout=60) as c:
        r = c.post(f"{sink.url}/big", content=_zeros(64 * MIB),
                   headers={"Content-Length": str(64 * MIB)})
    assert r.status_code == 413
    assert r.json()["error"]  # the JSON denial, with its decision id
    assert r.headers.get("x-fleetgate-decision-id")
    assert sink.requests == []


def test_oversize_llm_body_gets_413_fast_without_being_read(
        gw: Gateway, llm: _CountingServer) -> None:
    size = 100 * 1000 * 1000
    before = _rss(gw)
    t0 = time.monotonic()
    with gw.client(token("llm-big"), timeout=60) as c:
        r = c.post(f"{llm.url}/v1/chat/completions", content=_zeros(size),
                   headers={"Content-Length": str(size), "Content-Type": "application/json"})
    elapsed = time.monotonic() - t0
    assert r.status_code == 413, r.text
    body = r.json()
    assert "error" in body and r.headers["x-fleetgate-decision-id"] in json.dumps(body)
    assert _rss(gw) - before <= RSS_SLACK
    assert elapsed < 10, f"413 took {elapsed:.1f}s"
    assert llm.requests == []
    decision = gw.wait_for_decision(lambda d: d.get("rule") == "request.body-too-large")
    assert decision["status"] == 413


def test_chunked_oversize_llm_body_is_refused_once_past_the_limit(
        gw: Gateway, llm: _CountingServer) -> None:
    before = _rss(gw)
    with gw.client(token("llm-chunked"), timeout=60) as c:
        r = c.post(f"{llm.url}/v1/chat/completions", content=_zeros(64 * MIB),
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert _rss(gw) - before <= RSS_SLACK
    assert llm.requests == []


def test_small_llm_body_is_still_judged(gw: Gateway, llm: _CountingServer) -> None:
    with gw.client(token("llm-small")) as c:
        bad = c.post(f"{llm.url}/v1/chat/completions", content=b"not json",
                     headers={"Content-Type": "application/json"})
        good = c.post(f"{llm.url}/v1/chat/completions",
                      json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert bad.status_code == 400  # read and refused, as before
    assert good.status_code == 200
    assert [p for _, p, _ in llm.requests] == ["/v1/chat/completions"]
