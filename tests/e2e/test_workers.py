"""``fleetgate run --workers 2 --state redis://…``: two mitmdump workers on one port under the
supervisor, started with the .venv's ``fleetgate`` console script as an operator starts it.

Both workers serve agents through the one port (SO_REUSEPORT), the supervisor's /metrics
merges both with a ``worker`` label and its readiness needs both; a worker killed with
SIGKILL is restarted while requests keep passing; SIGTERM stops everything; and without
shared state more than one worker is refused. The ReusePort wrap itself is checked
in-process: with the option on two listeners share a port, with it off the second fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import (
    SECRET,
    Upstream,
    free_port,
    resolve_entries,
    ssl_context,
    token,
    wait_until,
    write_rules,
)

pytestmark = pytest.mark.e2e

FLEETGATE = Path(sys.executable).parent / "fleetgate"


class Run:
    """A running ``fleetgate run --workers N`` and its ports."""

    def __init__(self, argv: list[str], cwd: Path, port: int, metrics: int, admin: int,
                 confdir: Path) -> None:
        self.port, self.metrics_port, self.admin_port = port, metrics, admin
        self.confdir = confdir
        self.err: list[str] = []
        self.out_lines = 0
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        threading.Thread(target=self._drain, args=(self.proc.stdout, None), daemon=True).start()
        threading.Thread(target=self._drain, args=(self.proc.stderr, self.err),
                         daemon=True).start()

    def _drain(self, stream: Any, into: list[str] | None) -> None:
        for line in stream:
            if into is not None:
                into.append(line.rstrip("\n"))
            else:
                self.out_lines += 1

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=10)

    def workers(self) -> list[dict[str, Any]]:
        return list(self.get("/workers").json())

    def ready(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return self.get("/healthz/ready").status_code == 200
        return False

    def client(self) -> httpx.Client:
        """One agent with one new connection (the kernel picks the worker per connection)."""
        return httpx.Client(proxy=f"http://agent:{token()}@127.0.0.1:{self.port}",
                            verify=ssl_context(self.confdir / "mitmproxy-ca-cert.pem"),
                            timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie is gone for our purpose
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


@pytest.fixture
def workers_run(tmp_path: Path, upstream: Upstream, redis_server: Any, confdir: Path,
                upstream_ca_file: Path) -> Iterator[Run]:
    rules = write_rules(tmp_path / "rules.yaml", [upstream.port])
    secret = tmp_path / "jwt.secret"
    secret.write_bytes(SECRET)
    port, metrics, admin = free_port(), free_port(), free_port()
    argv = [str(FLEETGATE), "run", "--workers", "2", "--state", redis_server.url,
            "--rules", str(rules), "--confdir", str(confdir), "--jwt-secret-file", str(secret),
            "--listen-port", str(port), "--metrics", f"127.0.0.1:{metrics}",
            "--admin", f"127.0.0.1:{admin}", "--state-dir", str(tmp_path / "state"),
            "--decision-log", str(tmp_path / "decisions.jsonl"),
            "--", "--set", f"ssl_verify_upstream_trusted_ca={upstream_ca_file}"]
    for entry in resolve_entries():
        argv += ["--set", f"fleetgate_resolve={entry}"]
    run = Run(argv, tmp_path, port, metrics, admin, confdir)
    try:
        if not wait_until(run.ready, timeout=60, interval=0.2):
            pytest.fail("fleetgate run --workers 2 did not become ready:\n" + "\n".join(run.err))
        yield run
    finally:
        pids = [w["pid"] for w in run.workers()] if run.proc.poll() is None else []
        run.stop()
        for pid in pids:
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _requests_by_worker(run: Run) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(run.get("/metrics").text):
        for s in fam.samples:
            if s.name == "fleetgate_requests_total" and s.labels.get("decision") == "allow":
                out[s.labels["worker"]] = out.get(s.labels["worker"], 0.0) + s.value
    return out


def _one_request(run: Run, upstream: Upstream, path: str) -> int:
    with run.client() as c:
        return c.get(f"{upstream.url}{path}").status_code


def test_two_workers_share_the_port_restart_and_stop(workers_run: Run, upstream: Upstream,
                                                     tmp_path: Path) -> None:
    run = workers_run
    first = run.workers()
    assert [w["worker"] for w in first] == [0, 1] and all(w["listening"] for w in first)
    # the admin API runs on worker 0, at the configured address
    admin_token = (tmp_path / "state" / "admin-token").read_text().strip()
    r = httpx.get(f"http://127.0.0.1:{run.admin_port}/v1/status", timeout=10,
                  headers={"Authorization": f"Bearer {admin_token}"})
    assert r.status_code == 200

    # many connections through the one port: the kernel spreads them over both workers
    statuses = [_one_request(run, upstream, f"/spread/{i}") for i in range(40)]
    assert statuses == [200] * 40
    assert wait_until(lambda: sum(_requests_by_worker(run).values()) >= 40, timeout=10)
    per_worker = _requests_by_worker(run)
    assert set(per_worker) == {"0", "1"} and all(v > 0 for v in per_worker.values()), per_worker
    # each worker wrote its own decision log, and both have some of the requests
    logs = {i: (tmp_path / f"decisions.w{i}.jsonl").read_text().splitlines() for i in (0, 1)}
    spread = {i: [ln for ln in lines if "/spread/" in ln] for i, lines in logs.items()}
    assert spread[0] and spread[1], {i: len(v) for i, v in spread.items()}
    assert all(json.loads(ln) for lines in logs.values() for ln in lines)  # whole lines

    merged = run.get("/metrics").text
    assert 'worker="0"' in merged and 'worker="1"' in merged
    assert merged.count("# TYPE fleetgate_requests_total counter") == 1
    ready = run.get("/healthz/ready")
    assert ready.status_code == 200 and ready.json()["not_ready"] == []

    # kill -9 one worker: the supervisor restarts it; requests keep passing meanwhile
    victim = first[1]["pid"]
    os.kill(victim, signal.SIGKILL)
    # kill() returns before the process is gone: a connection the kernel queued on its socket
    # meanwhile is reset when it dies (agents retry). Once it is gone, the port is worker 0's.
    assert wait_until(lambda: not _alive(victim), timeout=10)
    during: list[int] = []
    deadline = time.monotonic() + 30
    restarted = False
    resets = 0
    while time.monotonic() < deadline:
        try:
            during.append(_one_request(run, upstream, f"/during/{len(during)}"))
        except httpx.ReadError:  # a connection queued on a listener that went away: retried,
            resets += 1          # as agents' HTTP clients do; it must stay rare
            continue
        now = run.workers()[1]
        if now["restarts"] == 1 and now["pid"] != victim and now["listening"] and run.ready():
            restarted = True
            break
    assert restarted, "\n".join(run.err)
    assert during and all(s == 200 for s in during), during
    assert resets <= 2, f"{resets} connections reset while the worker restarted"
    assert any("worker 1 (pid" in line and "restarting in" in line for line in run.err)
    after = [_one_request(run, upstream, f"/after/{i}") for i in range(10)]
    assert after == [200] * 10
    merged = run.get("/metrics").text
    assert 'fleetgate_worker_restarts_total{worker="1"} 1.0' in merged

    # SIGTERM to the supervisor: every worker stops, then the supervisor exits 0
    pids = [w["pid"] for w in run.workers()]
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(30) == 0
    assert wait_until(lambda: not any(_alive(p) for p in pids), timeout=10), pids
    assert any("stopped" in line for line in run.err)


def test_workers_without_shared_state_exit_2_with_the_reason(tmp_path: Path) -> None:
    r = subprocess.run([str(FLEETGATE), "run", "--workers", "2", "--rules", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2
    assert "needs shared state" in r.stderr and "SQLite" in r.stderr
    assert "--state redis://" in r.stderr


# -- the ReusePort wrap, in-process ----------------------------------------------------------

def test_reuse_port_lets_two_listeners_share_a_port_only_when_on() -> None:
    from mitmproxy.proxy import mode_servers

    from fleetgate.addons import reuse_port

    reuse_port.install()
    reuse_port.install()  # once per process: a second call changes nothing
    view = mode_servers.asyncio
    assert isinstance(view, reuse_port._AsyncioView)
    assert view.Server is asyncio.Server  # everything else is asyncio's own

    async def two(on: bool) -> bool:
        reuse_port._enabled[0] = on
        port = free_port()

        async def handle(r: Any, w: Any) -> None:
            w.close()

        first = await view.start_server(handle, "127.0.0.1", port)
        try:
            second = await view.start_server(handle, "127.0.0.1", port)
        except OSError:
            return False
        finally:
            first.close()
        second.close()
        return True

    try:
        assert asyncio.run(two(True)) is True
        assert asyncio.run(two(False)) is False
    finally:
        reuse_port._enabled[0] = False


def test_reuse_port_refuses_a_mitmproxy_whose_listen_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio as real_asyncio

    from mitmproxy.proxy import mode_servers

    from fleetgate.addons import reuse_port

    assert reuse_port.EXPECTED_CALL in inspect.getsource(
        mode_servers.AsyncioServerInstance.listen)  # the pinned mitmproxy has it

    async def listen(self: Any, host: str, port: int) -> list[Any]:
        return [await real_asyncio.get_running_loop().create_server(lambda: None, host, port)]

    monkeypatch.setattr(mode_servers, "asyncio", real_asyncio)
    monkeypatch.setattr(mode_servers.AsyncioServerInstance, "listen", listen)
    with pytest.raises(RuntimeError, match="fleetgate_reuse_port"):
        reuse_port.install()
