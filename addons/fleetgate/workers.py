"""``fleetgate run --workers N``: N gateway processes on one port, and a small supervisor.

Python runs a gateway's event loop on one core, so one mitmdump uses one core of a node. With
``--workers N`` the supervisor (this module, no mitmproxy in it) starts N mitmdump processes
with the same options and ``fleetgate_reuse_port=true``: each binds the one ``--listen-port``
with ``SO_REUSEPORT`` and the kernel spreads new connections over them. They enforce one
fleet's rules together through the shared state (``--state redis://…``); with the embedded
default (SQLite, state per process) N > 1 would give every worker its own limits, budgets and
kill actions, so it is refused (:func:`resolve_workers`).

What the supervisor does, and why it is here rather than in the workers:

* **one public metrics/health address** (``--metrics``): each worker serves its own on
  ``127.0.0.1:0`` (learnt from its log line); the supervisor serves ``/metrics`` = every
  worker's families merged, each sample with a ``worker="i"`` label (one family each, so a
  ``sum without (worker)`` gives the node), ``/healthz/ready`` = 200 only when every worker is
  ready (else 503 naming which is not), ``/healthz/live``, ``/workers`` (pids, ports,
  restarts) and ``/workers/<i>/<path>`` (a worker's own view, e.g. ``/workers/0/usage``);
* **the admin API on worker 0** at ``--admin`` (the other workers run none: an action taken
  there reaches every worker through the shared state, and a loopback admin port per worker
  would be one more address agents must never reach through the gateway). While worker 0
  restarts the admin API is briefly down; the proxy port is not;
* **restarts**: a worker that exits is started again after a backoff (0.5 s doubling to 30 s,
  back to 0.5 s once it ran a minute), logged on stderr; a worker that fails before it ever
  listened at start stops the whole run with its exit status (a configuration error, as with
  one process);
* **signals**: SIGTERM/SIGINT stop every worker with SIGTERM (mitmdump's graceful shutdown)
  and SIGKILL after ``STOP_TIMEOUT`` s; SIGHUP is forwarded (decision-log reopen). Workers
  get SIGTERM if the supervisor itself dies (``PR_SET_PDEATHSIG``).

Per worker: ``--decision-log FILE`` becomes ``FILE`` with ``.w<i>`` before its suffix (one
writer per file: rotation and the partial-line repair assume it), ``-`` stays stdout (the
supervisor forwards whole lines), and ``fleetgate_state_dir`` is ``<state-dir>/worker-<i>``
(SQLite files are one process's); the admin token file and MCP pin file stay shared.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from fleetgate.errors import ConfigError

__all__ = ["Supervisor", "WorkersError", "merge_metrics", "redact", "render_metrics",
           "resolve_workers", "usable_cores", "worker_options"]

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
STOP_TIMEOUT = 10.0  # seconds a worker has for mitmdump's graceful shutdown before SIGKILL
START_TIMEOUT = 90.0  # seconds a worker has to start listening
BACKOFF_MIN, BACKOFF_MAX, BACKOFF_RESET = 0.5, 30.0, 60.0  # restart backoff (seconds)
SCRAPE_TIMEOUT = 3.0
_METRICS_LINE = re.compile(rb"fleetgate metrics listening at http://([^/\s]+):(\d+)/")
_PROXY_LINE = re.compile(rb"proxy listening at ")


class WorkersError(ConfigError, ValueError):
    """``--workers`` cannot be honoured: the message says why and what to do."""


def is_shared_state(state: str) -> bool:
    return state.startswith(REDIS_SCHEMES)


def redact(url: str) -> str:
    """``url`` without the password it may carry (``redis://:secret@host`` -> ``redis://host``)."""
    return re.sub(r"//[^@/]*@", "//", url)


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_workers(requested: int | None, state: str, cores: int) -> int:
    """How many workers to run: ``requested``, or by default every usable core when the
    state is shared (a Redis URL) and 1 with the embedded default. N > 1 without shared state
    is refused: each process would keep its own limits, budgets and kill actions."""
    if requested is None:
        return cores if is_shared_state(state) else 1
    if requested < 1:
        raise WorkersError(f"--workers must be at least 1, not {requested}")
    if requested > 1 and not is_shared_state(state):
        raise WorkersError(
            f"--workers {requested} needs shared state: with the embedded default every "
            "worker process would keep its own SQLite state (rate limits, budgets, kill "
            "actions, sessions, MCP pins), so limits would be multiplied by the number of "
            "workers and a stop would reach one of them. Pass --state redis://HOST:6379/0 "
            "(or rediss://, unix://), or run one worker (--workers 1).")
    return requested


def _worker_path(path: str, index: int) -> str:
    p = Path(path)
    return str(p.with_name(f"{p.stem}.w{index}{p.suffix}"))


def worker_options(opts: Sequence[str], index: int, admin: str) -> list[str]:
    """One worker's ``--set`` options from the run's: SO_REUSEPORT on, its own metrics
    listener on a free loopback port, the admin API on worker 0 only, its own decision-log
    file and SQLite state directory (``name=value`` strings, as ``cmd_run`` builds them)."""
    out: list[str] = []
    for o in opts:
        name, _, value = o.partition("=")
        if name in ("fleetgate_metrics_listen", "fleetgate_admin_listen",
                    "fleetgate_reuse_port", "server"):
            continue
        if name == "fleetgate_decision_log" and value not in ("", "-"):
            value = _worker_path(value, index)
        elif name == "fleetgate_state_dir" and value:
            value = str(Path(value) / f"worker-{index}")
            Path(value).mkdir(parents=True, exist_ok=True)
        out.append(f"{name}={value}")
    # server=false: the worker binds its proxy port only once fleetgate_reuse_port is
    # applied (ReusePort.running turns the server on); mitmdump would bind it earlier
    out += ["server=false", "fleetgate_reuse_port=true", "fleetgate_metrics_listen=127.0.0.1:0",
            f"fleetgate_admin_listen={admin if index == 0 else ''}"]
    return out


# -- metrics ------------------------------------------------------------------------------


def merge_metrics(texts: Mapping[str, str]) -> list[Metric]:
    """Every worker's exposition (worker id -> text) as one list of families: each sample
    gets a ``worker`` label; a family every worker has appears once with all their samples."""
    families: dict[str, Metric] = {}
    for worker, text in texts.items():
        for fam in text_string_to_metric_families(text):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type,
                                                     fam.unit)
            for s in fam.samples:
                merged.add_sample(s.name, {**s.labels, "worker": worker}, s.value,
                                  s.timestamp, s.exemplar)
    return list(families.values())


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def render_metrics(families: Iterable[Metric]) -> bytes:
    """The Prometheus text exposition of ``families`` (``generate_latest``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return bytes(generate_latest(registry))


def supervisor_families(workers: Sequence[Worker], up: Mapping[int, bool]) -> list[Metric]:
    """The supervisor's own: workers configured, each one's restarts and whether it answered."""
    n = Metric("fleetgate_workers", "Worker processes the supervisor runs (--workers).",
               "gauge")
    n.add_sample("fleetgate_workers", {}, float(len(workers)))
    restarts = Metric("fleetgate_worker_restarts", "Times the supervisor restarted a worker "
                      "that exited.", "counter")
    alive = Metric("fleetgate_worker_up", "1 when the worker's metrics were read for this "
                   "scrape, else 0 (exited, starting or not answering).", "gauge")
    for w in workers:
        label = {"worker": str(w.index)}
        restarts.add_sample("fleetgate_worker_restarts_total", label, float(w.restarts))
        alive.add_sample("fleetgate_worker_up", label, 1.0 if up.get(w.index) else 0.0)
    return [n, restarts, alive]


# -- workers ------------------------------------------------------------------------------


try:  # resolved here, not in the forked child (no dlopen between fork and exec)
    _PRCTL: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """In the child before exec: SIGTERM when the supervisor dies (Linux), so no worker is
    left holding the port after a ``kill -9`` of the supervisor."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # it died before the prctl
            os._exit(1)


@dataclass
class Worker:
    index: int
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    metrics: tuple[str, int] | None = None
    listening: bool = False
    ever_listened: bool = False
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_MIN
    restart_at: float | None = None
    last_exit: int | None = None
    changed: threading.Event = field(default_factory=threading.Event)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def describe(self) -> dict[str, Any]:
        return {"worker": self.index, "pid": self.pid, "running": self.running(),
                "listening": self.listening, "restarts": self.restarts,
                "last_exit": self.last_exit,
                "metrics": f"http://{self.metrics[0]}:{self.metrics[1]}" if self.metrics
                else None}


class Supervisor:
    """Starts, watches and stops the workers; serves the merged metrics and health."""

    def __init__(self, argvs: Sequence[list[str]], metrics_listen: str,
                 stop_timeout: float = STOP_TIMEOUT, out: BinaryIO | None = None) -> None:
        self.workers = [Worker(i, list(a)) for i, a in enumerate(argvs)]
        self.metrics_listen = metrics_listen
        self.stop_timeout = stop_timeout
        self.out = out if out is not None else sys.stdout.buffer
        self._out_lock = threading.Lock()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._hup = threading.Event()
        self._wake = threading.Event()
        self._http: ThreadingHTTPServer | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max(2, len(self.workers)),
                                                           thread_name_prefix="fleetgate-scrape")

    # -- logging ----------------------------------------------------------------------

    @staticmethod
    def log(msg: str) -> None:
        print(f"fleetgate workers: {msg}", file=sys.stderr, flush=True)

    # -- processes --------------------------------------------------------------------

    def _spawn(self, w: Worker) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # log lines (and ports) as written
        w.metrics, w.listening, w.restart_at = None, False, None
        w.proc = subprocess.Popen(w.argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                  env=env, start_new_session=True,
                                  preexec_fn=functools.partial(_die_with_parent,
                                                               os.getpid()))
        w.started_at = time.monotonic()
        threading.Thread(target=self._pump, args=(w, w.proc), daemon=True,
                         name=f"fleetgate-worker-{w.index}-out").start()
        self.log(f"worker {w.index} started (pid {w.proc.pid})")

    def _pump(self, w: Worker, proc: subprocess.Popen[bytes]) -> None:
        """Forward the worker's stdout line by line (whole lines: decision records stay
        intact) and learn its metrics port and when it listens."""
        assert proc.stdout is not None
        for line in proc.stdout:
            if w.proc is proc and not (w.listening and w.metrics):
                if m := _METRICS_LINE.search(line):
                    w.metrics = (m.group(1).decode(), int(m.group(2)))
                if _PROXY_LINE.search(line):
                    w.listening = True
                if w.listening and w.metrics:
                    w.ever_listened = True
                    w.changed.set()
            with self._out_lock, contextlib.suppress(OSError, ValueError):
                self.out.write(line)
                self.out.flush()
        w.changed.set()
        self._wake.set()

    def _signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.running() and w.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.proc.pid, sig)

    def stop_all(self) -> None:
        """SIGTERM to every worker, SIGKILL to those still running after the timeout."""
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log(f"worker {w.index} (pid {w.proc.pid}) did not stop in "
                         f"{self.stop_timeout:g}s; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.proc.pid, signal.SIGKILL)
                w.proc.wait(5)

    # -- the run ----------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGHUP:
            self._hup.set()
        else:
            self._stopping.set()
        self._wake.set()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        try:
            self._serve_http()
        except (OSError, ValueError) as exc:
            self.log(f"cannot serve metrics on {self.metrics_listen}: {exc}")
            return 2
        try:
            for w in self.workers:
                self._spawn(w)
            code = self._wait_started()
            if code is not None:
                return code
            self.log(f"{len(self.workers)} workers listening")
            return self._watch()
        finally:
            self.stop_all()
            if self._http is not None:
                self._http.shutdown()
                self._http.server_close()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self.log("stopped")

    def _wait_started(self) -> int | None:
        """Until every worker listens; a worker that exits first ends the run (its code)."""
        deadline = time.monotonic() + START_TIMEOUT
        while not all(w.ever_listened for w in self.workers):
            if self._stopping.is_set():
                return 0
            for w in self.workers:
                if w.proc is not None and w.proc.poll() is not None and not w.ever_listened:
                    code = w.proc.returncode
                    self.log(f"worker {w.index} exited with status {code} before it listened; "
                             "stopping")
                    return code if code and code > 0 else 1
            if time.monotonic() > deadline:
                self.log(f"workers did not start within {START_TIMEOUT:g}s; stopping")
                return 1
            self._wake.wait(0.1)
            self._wake.clear()
        return None

    def _watch(self) -> int:
        while not self._stopping.is_set():
            if self._hup.is_set():
                self._hup.clear()
                self.log("SIGHUP: forwarded to every worker")
                self._signal_all(signal.SIGHUP)
            now = time.monotonic()
            for w in self.workers:
                if w.proc is not None and w.restart_at is None and w.proc.poll() is not None:
                    w.last_exit = w.proc.returncode
                    ran = now - w.started_at
                    w.backoff = BACKOFF_MIN if ran >= BACKOFF_RESET else w.backoff
                    w.restart_at = now + w.backoff
                    self.log(f"worker {w.index} (pid {w.proc.pid}) exited with status "
                             f"{w.last_exit} after {ran:.1f}s; restarting in {w.backoff:g}s")
                    w.backoff = min(BACKOFF_MAX, w.backoff * 2)
                    w.listening = False
                if w.restart_at is not None and now >= w.restart_at:
                    w.restarts += 1
                    self._spawn(w)
            self._wake.wait(0.2)
            self._wake.clear()
        self.log("stopping every worker")
        return 0

    # -- the public metrics/health listener -------------------------------------------

    def _serve_http(self) -> None:
        if not self.metrics_listen:
            return
        host, sep, port = self.metrics_listen.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"--metrics must be host:port, not {self.metrics_listen!r}")
        supervisor = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                status, ctype, body = supervisor.answer(self.path)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self._http = Server((host.strip("[]") or "0.0.0.0", int(port)), Handler)
        threading.Thread(target=self._http.serve_forever, daemon=True,
                         name="fleetgate-workers-metrics").start()
        addr = self.address
        assert addr is not None
        self.log(f"metrics listening at http://{addr[0]}:{addr[1]}/ (every worker merged)")

    @property
    def address(self) -> tuple[str, int] | None:
        if self._http is None:
            return None
        h, p = self._http.server_address[:2]
        return str(h), int(p)

    def _get(self, w: Worker, path: str) -> tuple[int, bytes]:
        if w.metrics is None or not w.running():
            raise OSError("not running" if not w.running() else "starting")
        url = f"http://{w.metrics[0]}:{w.metrics[1]}{path}"
        try:
            with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as r:
                return int(r.status), bytes(r.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read())

    def _each(self, path: str) -> dict[int, tuple[int, bytes] | Exception]:
        futures = {w.index: self._pool.submit(self._get, w, path) for w in self.workers}
        out: dict[int, tuple[int, bytes] | Exception] = {}
        for i, f in futures.items():
            try:
                out[i] = f.result()
            except Exception as exc:
                out[i] = exc
        return out

    def metrics_text(self) -> bytes:
        texts: dict[str, str] = {}
        up: dict[int, bool] = {}
        for i, res in self._each("/metrics").items():
            up[i] = not isinstance(res, Exception) and res[0] == 200
            if up[i] and not isinstance(res, Exception):
                texts[str(i)] = res[1].decode()
        return render_metrics([*merge_metrics(texts), *supervisor_families(self.workers, up)])

    def ready(self) -> tuple[bool, dict[str, Any]]:
        workers: list[dict[str, Any]] = []
        for i, res in self._each("/healthz/ready").items():
            d = self.workers[i].describe()
            if isinstance(res, Exception):
                d.update(ready=False, reason=str(res))
            else:
                d["ready"] = res[0] == 200
                if not d["ready"]:
                    with contextlib.suppress(ValueError):
                        d["status"] = json.loads(res[1])
            workers.append(d)
        not_ready = [d["worker"] for d in workers if not d["ready"]]
        return not not_ready, {"ready": not not_ready, "not_ready": not_ready,
                               "workers": workers}

    def answer(self, path: str) -> tuple[int, str, bytes]:
        path = path.split("?", 1)[0]
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics_text()
        if path in ("/healthz/ready", "/healthz"):
            ok, body = self.ready()
            return (200 if ok else 503), "application/json", json.dumps(body).encode()
        if path == "/healthz/live":
            return 200, "application/json", json.dumps(
                {"live": True, "workers": [w.describe() for w in self.workers]}).encode()
        if path == "/workers":
            return 200, "application/json", json.dumps(
                [w.describe() for w in self.workers]).encode()
        if m := re.fullmatch(r"/workers/(\d+)(/.*)", path):
            i = int(m.group(1))
            if i < len(self.workers):
                try:
                    code, raw = self._get(self.workers[i], m.group(2))
                except Exception as exc:
                    return 503, "application/json", json.dumps(
                        {"error": f"worker {i}: {exc}"}).encode()
                ctype = ("text/plain; version=0.0.4; charset=utf-8"
                         if m.group(2) == "/metrics" else "application/json")
                return code, ctype, raw
        return 404, "text/plain", (b"not found: try /metrics, /healthz/ready, /workers or "
                                   b"/workers/<i>/<path>\n")
