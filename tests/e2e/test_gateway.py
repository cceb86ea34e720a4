"""End to end: a real mitmdump running fleetgate, httpx as the agent, local TLS upstreams.

Each test asserts what reached the upstream, not only what the client saw.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import jwt
import pytest

from harness import (
    SECRET,
    Gateway,
    Upstream,
    raw_connect,
    token,
    wait_until,
    write_rules,
)

pytestmark = pytest.mark.e2e


def basic(tok: str) -> str:
    return "Basic " + base64.b64encode(f"agent:{tok}".encode()).decode()


# -- allowed and denied ---------------------------------------------------------------


def test_allowed_request_reaches_upstream_without_proxy_credentials(
        gateway: Gateway, upstream: Upstream) -> None:
    with gateway.client(token("agent-1")) as c:
        r = c.post(upstream.url + "/v1/chat", json={"hi": 1})
    assert r.status_code == 200
    assert r.json()["path"] == "/v1/chat"
    assert upstream.paths() == ["/v1/chat"]
    seen = upstream.seen[0]
    assert "proxy-authorization" not in seen.headers
    assert not any("eyJ" in v for v in seen.headers.values())  # the JWT never leaves
    did = r.headers["x-fleetgate-decision-id"]
    d = gateway.wait_for_decision(lambda d: d["decision_id"] == did)
    assert d["result"] == "allow" and d["rule"] == "tester.allow"
    assert d["agent"] == "agent-1" and d["role"] == "tester" and d["status"] == 200
    assert d["policy_revision"] and d["latency_ms"] is not None
    assert "eyJ" not in gateway.decision_log.read_text()


@pytest.mark.parametrize("path", ["/a/delete", "/a/%64elete", "/x/../delete", "/a/%2564elete",
                                  "/v1/DROP/../drop", "//destroy"])
def test_seed_deny_rules_cannot_be_evaded(gateway: Gateway, upstream: Upstream,
                                          path: str) -> None:
    with gateway.client(token()) as c:
        r = c.get(upstream.url + path)
    assert r.status_code == 403
    body = r.json()
    assert body["error"]["type"] == "permission_error"
    assert body["fleetgate"]["rule"].startswith("rules.authorization[")
    assert body["fleetgate"]["decision_id"] == r.headers["x-fleetgate-decision-id"]
    assert upstream.seen == []


def test_default_deny_and_egress(gateway: Gateway, upstream: Upstream,
                                 plain_upstream: Upstream) -> None:
    with gateway.client(token()) as c:
        put = c.put(upstream.url + "/thing")  # no rule allows PUT
        other = c.get(f"http://127.0.0.1:{plain_upstream.port}/")  # not in egress
        meta = c.get("http://169.254.169.254/latest/meta-data/")
    assert put.status_code == 403 and put.json()["fleetgate"]["rule"] == "default-deny"
    assert other.status_code == 403 and other.json()["fleetgate"]["rule"] == "egress"
    assert meta.status_code == 403
    assert meta.json()["fleetgate"]["rule"] == "destinations.private"
    assert upstream.seen == [] and plain_upstream.seen == []


def test_no_profile_for_identity(gateway: Gateway, upstream: Upstream) -> None:
    with gateway.client(token("stranger", role="intruder")) as c:
        r = c.get(upstream.url + "/")
    assert r.status_code == 403 and r.json()["fleetgate"]["rule"] == "no-profile"
    assert upstream.seen == []


def test_domain_fronting_is_refused(gateway: Gateway, upstream: Upstream) -> None:
    with gateway.client(token()) as c:
        r = c.get(upstream.url + "/", headers={"Host": "evil.example.com"})
    assert r.status_code == 403 and r.json()["fleetgate"]["rule"] == "host-mismatch"
    assert upstream.seen == []


# -- identity ---------------------------------------------------------------------------


def test_connect_without_token_gets_407_with_reason(gateway: Gateway, upstream: Upstream) -> None:
    status, headers, body = raw_connect(gateway.port, f"127.0.0.1:{upstream.port}")
    assert status == 407
    assert "basic" in headers["proxy-authenticate"].lower()
    data = json.loads(body)
    assert data["fleetgate"]["rule"] == "identity.missing_credentials"
    assert "HTTPS_PROXY" in data["error"]["message"]
    with gateway.client(None) as c, pytest.raises(httpx.ProxyError, match="407"):
        c.get(upstream.url + "/")
    assert upstream.seen == []


@pytest.mark.parametrize(("make", "code"), [
    (lambda: token(ttl=-120), "expired"),
    (lambda: jwt.encode({"sub": "a", "exp": time.time() + 60}, b"x" * 40, algorithm="HS256"),
     "bad_signature"),
    (lambda: jwt.encode({"sub": "a", "exp": time.time() + 60}, None, algorithm="none"),
     "algorithm_not_allowed"),
    (lambda: jwt.encode({"sub": "a"}, SECRET, algorithm="HS256"), "missing_claim"),
    (lambda: jwt.encode({"sub": "a", "exp": time.time() + 600, "nbf": time.time() + 300},
                        SECRET, algorithm="HS256"), "not_yet_valid"),
    (lambda: "not-a-jwt", "malformed_token"),
])
def test_bad_tokens_get_407_saying_what_is_wrong(gateway: Gateway, upstream: Upstream,
                                                 make, code: str) -> None:
    status, _headers, body = raw_connect(gateway.port, f"127.0.0.1:{upstream.port}",
                                        basic(make()))
    assert status == 407, body
    assert json.loads(body)["fleetgate"]["rule"] == f"identity.{code}"
    assert "Traceback" not in body.decode()
    assert upstream.seen == []
    d = gateway.wait_for_decision(lambda d: d["rule"] == f"identity.{code}")
    assert d["result"] == "deny" and d["status"] == 407


def test_bearer_proxy_authorization_is_accepted(gateway: Gateway, upstream: Upstream) -> None:
    status, _, _ = raw_connect(gateway.port, f"127.0.0.1:{upstream.port}",
                               f"Bearer {token()}")
    assert status == 200


def test_plain_http_proxying_identifies_each_request(
        make_gateway, tmp_path: Path, plain_upstream: Upstream) -> None:
    gw = make_gateway(write_rules(tmp_path / "plain.yaml", [plain_upstream.port]))
    with gw.client(token("plain-agent")) as c:
        ok = c.get(plain_upstream.url + "/plain")
    with gw.client(None) as c:
        anon = c.get(plain_upstream.url + "/anon")
    assert ok.status_code == 200
    assert anon.status_code == 407
    assert anon.json()["fleetgate"]["rule"] == "identity.missing_credentials"
    assert plain_upstream.paths() == ["/plain"]
    assert "proxy-authorization" not in plain_upstream.seen[0].headers


# -- rules hot reload -------------------------------------------------------------------


def test_hot_reload_applies_without_restart(gateway: Gateway, upstream: Upstream,
                                            rules_file: Path) -> None:
    pid = gateway.proc.pid if gateway.proc else None
    with gateway.client(token()) as c:
        assert c.get(upstream.url + "/reports").status_code == 200
        write_rules(rules_file, [upstream.port], extra="""
- name: no-reports
  match: 'jwt.agent_role == "tester"'
  authorization:
    rules:
    - id: no-reports
      deny: 'request.path.startsWith("/reports")'
""")
        assert wait_until(lambda: c.get(upstream.url + "/reports").status_code == 403, 10)
        r = c.get(upstream.url + "/reports")
        assert r.json()["fleetgate"]["rule"] == "no-reports"
    assert gateway.proc and gateway.proc.pid == pid and gateway.proc.poll() is None
    assert upstream.paths().count("/reports") >= 1
    assert all(p == "/reports" for p in upstream.paths())


def test_broken_edit_keeps_last_good_policy_and_says_why(
        gateway: Gateway, upstream: Upstream, rules_file: Path) -> None:
    before = gateway.ready().json()
    assert before["ready"] is True and before["last_reload_ok"] is True
    text = rules_file.read_text().replace("allow: 'request.method in", "allow: 'request.method in (")
    rules_file.write_text(text)
    assert wait_until(lambda: gateway.ready().json()["last_reload_ok"] is False, 10)
    status = gateway.ready()
    assert status.status_code == 200  # still serving the old policy: still ready
    body = status.json()
    assert body["revision"] == before["revision"]
    assert any("rules.yaml:" in e and "CEL" in e for e in body["last_error"])
    assert "fleetgate_policy_last_reload_ok 0.0" in gateway.metrics()
    gateway.wait_for_output("rules rejected, still running revision")
    with gateway.client(token()) as c:
        assert c.get(upstream.url + "/still-works").status_code == 200
    assert upstream.paths() == ["/still-works"]


def test_broken_rules_at_startup_exit_non_zero(make_gateway, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: fleetgate/v1\nagents:\n- name: x\n  match: 'jwt.a =='\n")
    gw = make_gateway(bad, start=False)
    proc = subprocess.run(gw.argv(), capture_output=True, text=True, timeout=60,
                          cwd=gw.workdir)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "bad.yaml:4" in out and "agents[0].match" in out


@pytest.mark.parametrize("option", ["ignore_hosts=.*", "tcp_hosts=.*", "map_remote=|.*|x|y",
                                    "mode=socks5"])
def test_bypass_options_are_refused_at_startup(make_gateway, rules_file: Path,
                                               option: str) -> None:
    gw = make_gateway(rules_file, start=False)
    argv = [*gw.argv(), "--set", option]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=gw.workdir)
    assert proc.returncode != 0
    assert "fleetgate" in proc.stdout + proc.stderr


# -- revocation -------------------------------------------------------------------------


def test_revoking_an_identity_cuts_its_open_stream_and_denies_the_next_request(
        gateway: Gateway, upstream: Upstream, rules_file: Path) -> None:
    events: dict[str, list[str]] = {"rogue": [], "good": []}
    errors: dict[str, BaseException] = {}
    done: dict[str, float] = {}

    def stream(name: str) -> None:
        try:
            with gateway.client(token(name), timeout=30) as c, \
                    c.stream("GET", upstream.url + "/stream") as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events[name].append(line)
        except Exception as exc:
            errors[name] = exc
        done[name] = time.monotonic()

    threads = [threading.Thread(target=stream, args=(n,)) for n in ("rogue", "good")]
    for t in threads:
        t.start()
    assert wait_until(lambda: len(events["rogue"]) >= 3 and len(events["good"]) >= 3, 10)
    revoked_at = time.monotonic()
    write_rules(rules_file, [upstream.port], revoked=["rogue"])
    assert wait_until(lambda: "rogue" in done, 10), "the revoked stream was not cut"
    cut_after = done["rogue"] - revoked_at
    assert "rogue" in errors, "the rogue stream ended cleanly instead of being cut"
    assert len(events["rogue"]) < 100
    assert cut_after < 3.0  # reload poll 0.2 s + cut; bench/ measures the real latency
    for t in threads:
        t.join(15)
    assert "good" not in errors and len(events["good"]) == 100  # others untouched
    with gateway.client(token("rogue")) as c:
        r = c.get(upstream.url + "/after")
    assert r.status_code == 403 and r.json()["fleetgate"]["rule"] == "revoked"
    assert "/after" not in upstream.paths()
    assert 'fleetgate_flows_cut_total{rule="revoked"} 1.0' in gateway.metrics()


# -- destinations and non-HTTP ------------------------------------------------------------


def test_hostname_resolving_to_internal_address_is_refused(
        make_gateway, tmp_path: Path, upstream: Upstream) -> None:
    rules = write_rules(tmp_path / "r.yaml", [upstream.port], allow_private='["10.0.0.0/8"]')
    gw = make_gateway(rules)
    with gw.client(token()) as c:
        r = c.get(f"https://localhost:{upstream.port}/internal")
    assert r.status_code == 502
    assert "fleetgate refused to connect" in r.text
    assert upstream.seen == []
    d = gw.wait_for_decision(lambda d: d["path"] == "/internal")
    assert d["result"] == "deny"


def test_raw_tcp_inside_a_tunnel_is_closed(gateway: Gateway) -> None:
    accepted: list[socket.socket] = []
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(3)

    def accept() -> None:
        try:
            conn, _ = listener.accept()
            accepted.append(conn)
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as s:
        s.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                  f"Proxy-Authorization: {basic(token())}\r\n\r\n".encode())
        head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 200")
        s.sendall(b"\x00\x01SSH-2.0-not-http\r\n" * 4)
        s.settimeout(5)
        try:
            rest = s.recv(4096)
        except (ConnectionResetError, TimeoutError):
            rest = b""
    t.join()
    listener.close()
    assert rest == b""  # closed by the gateway
    assert accepted == []  # nothing was ever dialled
    d = gateway.wait_for_decision(lambda d: d["rule"] == "raw-tcp")
    assert d["result"] == "deny" and d["method"] == "TCP"
    assert 'fleetgate_connections_refused_total{reason="raw-tcp"} 1.0' in gateway.metrics()


# -- metrics and health -----------------------------------------------------------------


def test_metrics_count_decisions_by_agent_and_rule(gateway: Gateway, upstream: Upstream) -> None:
    with gateway.client(token("counted")) as c:
        c.get(upstream.url + "/ok")
        c.get(upstream.url + "/delete")
    text = gateway.metrics()
    assert ('fleetgate_requests_total{agent="counted",decision="allow",role="tester",'
            'rule="tester.allow"} 1.0') in text
    assert ('fleetgate_requests_total{agent="counted",decision="deny",role="tester",'
            'rule="rules.authorization[0]"} 1.0') in text
    ready = gateway.ready()
    assert ready.status_code == 200 and ready.json()["ready"] is True
    # the metrics port is not reachable through the proxy, even with 127.0.0.1 allowed
    with gateway.client(token()) as c:
        r = c.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics")
    assert r.status_code == 403 and r.json()["fleetgate"]["rule"] == "egress"


def test_event_streams_are_not_buffered(gateway: Gateway, upstream: Upstream) -> None:
    from harness import sse_stream

    upstream.route("/slow", sse_stream(events=10, interval=0.3))
    arrivals: list[float] = []
    with gateway.client(token()) as c:
        start = time.monotonic()
        with c.stream("GET", upstream.url + "/slow") as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 10
    # buffered, every event would arrive together after ~3 s; streamed, they are spread out
    assert arrivals[0] < 1.5
    assert arrivals[-1] - arrivals[0] > 2.0


def test_the_same_addons_run_under_mitmweb(make_gateway, rules_file: Path,
                                           upstream: Upstream) -> None:
    gw = make_gateway(rules_file, tool="mitmweb")
    with gw.client(token("web-agent")) as c:
        ok = c.get(upstream.url + "/seen-in-mitmweb")
        denied = c.get(upstream.url + "/delete")
    assert ok.status_code == 200 and denied.status_code == 403
    assert upstream.paths() == ["/seen-in-mitmweb"]
    d = gw.wait_for_decision(lambda d: d["path"] == "/delete")
    assert d["result"] == "deny" and d["agent"] == "web-agent"


def test_configmap_symlink_swap_is_picked_up(make_gateway, tmp_path: Path,
                                             upstream: Upstream) -> None:
    """Kubernetes updates a mounted ConfigMap by swapping the ``..data`` symlink atomically."""
    import os

    mount = tmp_path / "configmap"
    mount.mkdir()
    v1 = mount / "..2026_11_23_10_00_00.1"
    v1.mkdir()
    write_rules(v1 / "rules.yaml", [upstream.port])
    os.symlink(v1.name, mount / "..data")
    os.symlink("..data/rules.yaml", mount / "rules.yaml")
    gw = make_gateway(mount)
    with gw.client(token()) as c:
        assert c.get(upstream.url + "/cm").status_code == 200
        v2 = mount / "..2026_11_23_10_05_00.2"
        v2.mkdir()
        write_rules(v2 / "rules.yaml", [upstream.port], revoked=["agent-1"])
        os.symlink(v2.name, mount / "..data_tmp")
        os.replace(mount / "..data_tmp", mount / "..data")

        def status() -> int | None:
            try:
                return c.get(upstream.url + "/cm").status_code
            except httpx.TransportError:  # the revocation closes this agent's open tunnel
                return None

        assert wait_until(lambda: status() == 403, 10)
    assert upstream.paths().count("/cm") >= 1
    assert gw.ready().json()["last_reload_ok"] is True


def test_decision_log_to_stdout_and_file(make_gateway, rules_file: Path, tmp_path: Path,
                                         upstream: Upstream) -> None:
    logfile = tmp_path / "both.jsonl"
    gw = make_gateway(rules_file, fleetgate_decision_log=f"-,{logfile}")
    with gw.client(token("twice")) as c:
        did = c.get(upstream.url + "/both").headers["x-fleetgate-decision-id"]
    gw.wait_for_output(f'"decision_id":"{did}"')
    assert wait_until(lambda: logfile.exists() and did in logfile.read_text())
    line = next(ln for ln in logfile.read_text().splitlines() if did in ln)
    assert json.loads(line)["agent"] == "twice"


def test_large_download_is_streamed_not_buffered(gateway: Gateway, upstream: Upstream) -> None:
    """A 20 MB body of unknown length passes chunk by chunk: the first bytes arrive while the
    upstream is still sending, and the gateway's memory does not grow by the body's size."""

    size, chunk = 20 * 1024 * 1024, 256 * 1024

    def big(h, seen) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        sent = 0
        while sent < size:
            h.wfile.write(f"{chunk:x}\r\n".encode() + b"x" * chunk + b"\r\n")
            sent += chunk
            if sent == chunk:
                h.wfile.flush()
                time.sleep(1.0)  # the first chunk must reach the client before the rest
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()

    upstream.route("/big", big)

    def rss_kb() -> int:
        assert gateway.proc
        for line in Path(f"/proc/{gateway.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    before = rss_kb()
    received, first_at = 0, None
    with gateway.client(token(), timeout=30) as c:
        start = time.monotonic()
        with c.stream("GET", upstream.url + "/big") as r:
            for data in r.iter_raw():
                if first_at is None:
                    first_at = time.monotonic() - start
                received += len(data)
    assert received == size
    assert first_at is not None and first_at < 0.9  # did not wait for the whole body
    assert rss_kb() - before < 15 * 1024  # peak RSS grew by far less than the 20 MB body


def test_revoking_a_role_cuts_every_agent_of_it_and_spares_the_others(
        gateway: Gateway, upstream: Upstream, rules_file: Path) -> None:
    events: dict[str, int] = {"other-1": 0, "other-2": 0, "tester-1": 0}
    errors: dict[str, BaseException] = {}

    def stream(name: str) -> None:
        role = name.split("-")[0]
        try:
            with gateway.client(token(name, role=role), timeout=30) as c, \
                    c.stream("GET", upstream.url + "/stream") as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events[name] += 1
        except Exception as exc:
            errors[name] = exc

    threads = [threading.Thread(target=stream, args=(n,)) for n in events]
    for t in threads:
        t.start()
    assert wait_until(lambda: all(v >= 3 for v in events.values()), 10)
    write_rules(rules_file, [upstream.port], revoked_roles=["other"])
    for t in threads:
        t.join(20)
    assert set(errors) == {"other-1", "other-2"}, errors
    assert events["tester-1"] == 100 and events["other-1"] < 100 and events["other-2"] < 100
    with gateway.client(token("other-3", role="other")) as c:
        r = c.get(upstream.url + "/after-role")
    assert r.status_code == 403 and "role 'other' is revoked" in r.json()["fleetgate"]["reason"]
    assert "/after-role" not in upstream.paths()
