"""The benchmark's processes: the upstream, bare mitmdump and fleetgate; RSS and CPU readers.

Every process is started in its own session and registered; :func:`stop_all` (called from
``run.py``'s ``finally``, on SIGTERM/SIGINT and at exit) terminates each one by its process
group, so nothing outlives the run.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
GATEWAY_SCRIPT = REPO / "addons" / "gateway.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")

_LISTEN = re.compile(r"proxy listening at .*?:(\d+)")
_METRICS = re.compile(r"fleetgate metrics listening at http://[\d.]+:(\d+)")
_ADMIN = re.compile(r"fleetgate admin API listening at http://[\d.]+:(\d+)")

_RUNNING: list[Proc] = []
_LOCK = threading.Lock()


# -- /proc readers ------------------------------------------------------------------------


def mem_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` (resident now) and ``VmHWM`` (peak resident since start or the last
    :func:`reset_peak`) of ``pid``, in KiB, from ``/proc/<pid>/status``."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def rss_mib(pid: int) -> float:
    return mem_kib(pid)["VmRSS"] / 1024


def reset_peak(pid: int) -> bool:
    """Reset ``VmHWM`` to the current RSS (``echo 5 > /proc/<pid>/clear_refs``, Linux >= 4.0)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used (``/proc/<pid>/stat`` fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used (``/proc/stat``, all cores)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def own_cpu_seconds() -> float:
    """CPU seconds used by this process, its reaped children and its running children."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    with _LOCK:
        procs = list(_RUNNING)
    for p in procs:
        with contextlib.suppress(OSError, AssertionError):
            if p.proc is not None and p.proc.poll() is None:
                total += cpu_seconds(p.pid)
    return total


class NoiseMeter:
    """How busy the rest of the machine was: CPU used by processes that are not the
    benchmark's, in cores, averaged over the interval. A noisy neighbour shows up here."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.busy0 = machine_busy_seconds()
        self.own0 = own_cpu_seconds()

    def cores(self) -> float:
        elapsed = time.perf_counter() - self.t0
        other = (machine_busy_seconds() - self.busy0) - (own_cpu_seconds() - self.own0)
        return round(max(0.0, other) / elapsed, 3) if elapsed > 0 else 0.0


# -- processes ----------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    argv: list[str]
    cwd: Path
    proc: subprocess.Popen[str] | None = None
    output: list[str] = field(default_factory=list)

    def start(self, env: dict[str, str] | None = None) -> Proc:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=self.cwd,
            start_new_session=True, env=env)
        with _LOCK:
            _RUNNING.append(self)
        threading.Thread(target=self._pump, daemon=True, name=f"pump-{self.name}").start()
        return self

    def _pump(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            if len(self.output) < 5000:
                self.output.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def text(self) -> str:
        return "\n".join(self.output)

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := pattern.search(self.text()):
                return m
            if self.proc is not None and self.proc.poll() is not None:
                time.sleep(0.2)
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.text()[-4000:]}")
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not start in {timeout:.0f}s:\n{self.text()[-4000:]}")

    def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        with _LOCK:
            if self in _RUNNING:
                _RUNNING.remove(self)


def stop_all() -> None:
    with _LOCK:
        procs = list(_RUNNING)
    for p in reversed(procs):
        with contextlib.suppress(Exception):
            p.stop()


def install_cleanup() -> None:
    """Stop every child on exit, Ctrl-C or SIGTERM (SIGTERM becomes KeyboardInterrupt)."""
    atexit.register(stop_all)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C raises KeyboardInterrupt even when started from a shell that ignores SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def exe(tool: str) -> str:
    found = shutil.which(tool, path=str(Path(sys.executable).parent)) or shutil.which(tool)
    if not found:
        raise SystemExit(f"bench: {tool} not found next to {sys.executable}")
    return found


# -- the upstream -------------------------------------------------------------------------


@dataclass
class Upstream:
    proc: Proc
    port: int
    info: dict[str, Any]

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def counts(self) -> tuple[int, int]:
        """(TLS connections accepted, requests served) so far, from the upstream's stats
        listener: a connection of its own, so reading never changes the figures."""
        reader, writer = await asyncio.open_connection("127.0.0.1", int(self.info["stats_port"]))
        try:
            line = await reader.readline()
        finally:
            writer.close()
        d = json.loads(line)
        return int(d["connections"]), int(d["requests"])


def start_upstream(workdir: Path, cert: Path, key: Path) -> Upstream:
    p = Proc("upstream", [sys.executable, str(REPO / "bench" / "upstream.py"), "--cert", str(cert),
                          "--key", str(key)], workdir).start()
    m = p.wait_for(re.compile(r'^\{"port": \d+.*\}$', re.M), 30)
    info = json.loads(m.group(0))
    return Upstream(p, int(info["port"]), info)


# -- proxies ------------------------------------------------------------------------------


@dataclass
class Proxy:
    """A running mitmdump: ``bare`` (no scripts) or ``fleetgate`` (``-s addons/gateway.py``)."""

    name: str
    proc: Proc
    port: int
    metrics_port: int | None
    argv: list[str]
    started_s: float
    fleetgate: bool
    admin_port: int | None = None  # the admin API (kill switch), when the tree has one

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready(self) -> dict[str, Any]:
        assert self.metrics_port
        ready: dict[str, Any] = httpx.get(f"http://127.0.0.1:{self.metrics_port}/healthz/ready",
                                          timeout=10).json()
        return ready

    def metrics(self) -> str:
        assert self.metrics_port
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text


def proxy_argv(confdir: Path, upstream_ca: Path, options: dict[str, str],
               script: Path | None = None) -> list[str]:
    argv = [exe("mitmdump")]
    if script is not None:
        argv += ["-s", str(script)]
    argv += ["--listen-host", "127.0.0.1", "--listen-port", "0", "--flow-detail", "0"]
    opts = {"confdir": str(confdir), "ssl_verify_upstream_trusted_ca": str(upstream_ca), **options}
    for k, v in opts.items():
        argv += ["--set", f"{k}={v}"]
    return argv


@dataclass
class Launch:
    """A mitmdump that was started and is not yet known to listen."""

    name: str
    proc: Proc
    argv: list[str]
    fleetgate: bool
    t0: float

    def wait(self, timeout: float = 90) -> Proxy:
        port = int(self.proc.wait_for(_LISTEN, timeout).group(1))
        metrics_port = int(self.proc.wait_for(_METRICS, timeout).group(1)) if self.fleetgate else None
        admin = self.fleetgate and any(a.startswith("fleetgate_admin_listen=") and not a.endswith("=")
                                       for a in self.argv)
        admin_port = int(self.proc.wait_for(_ADMIN, timeout).group(1)) if admin else None
        return Proxy(self.name, self.proc, port, metrics_port, self.argv,
                     time.perf_counter() - self.t0, self.fleetgate, admin_port)


def launch_proxy(name: str, workdir: Path, argv: list[str], fleetgate: bool) -> Launch:
    d = workdir / name
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    return Launch(name, Proc(name, argv, d).start(), argv, fleetgate, t0)
