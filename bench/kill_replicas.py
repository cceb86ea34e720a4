"""A stop that reaches every replica: command on one gateway -> last stream cut on the others.

Three fleetgate gateways (A, B, C) share one ``redis-server`` (``fleetgate_state=redis://…``)
and the bench upstream. Each run: one fresh agent (its own session) opens a long SSE chat
stream through B and one through C; once both flow, a stop of that agent is POSTed to A's admin
API; the figure is the time from sending that command to the later of the two streams ending,
as their clients see it (so it includes the publish on A, Redis pub/sub, B's and C's sweeps
and the TCP teardown). The issue's target is p99 <= 250 ms; the figures are reported, never
asserted. Prints one JSON document (p50/p99/max over ``--runs`` runs, every sample).

    .venv/bin/python bench/kill_replicas.py [--runs 20] [--out results/kill_replicas.json]

Needs ``redis-server`` (scripts/need-redis.sh) and ``localhost`` resolving to 127.0.0.1 only
(as the main bench). Every process it starts is stopped at exit.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import socket
import ssl
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from policy import BENCH_ROLE, small_policy
from procs import GATEWAY_SCRIPT, Proc, install_cleanup, launch_proxy, proxy_argv, start_upstream, stop_all
from stack import check_upstream_name, environment, make_certs, workspace

CHAT = "/v1/chat/completions?events=100000&interval_ms=20"  # ~30 min: only a cut ends it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(workdir: Path) -> tuple[Proc, str]:
    exe = shutil.which("redis-server") or shutil.which("valkey-server")
    if exe is None:
        raise SystemExit("bench: redis-server not found (scripts/need-redis.sh installs it)")
    port = _free_port()
    d = workdir / "redis"
    d.mkdir()
    p = Proc("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
                       "--save", "", "--appendonly", "no", "--loglevel", "notice"], d).start()
    p.wait_for(re.compile(r"Ready to accept connections"), 30)
    return p, f"redis://127.0.0.1:{port}/0"


class Held:
    """One SSE stream through one gateway, in a thread: events seen, when it ended."""

    def __init__(self, proxy: str, verify: ssl.SSLContext, url: str) -> None:
        self.events = 0
        self.ended: float | None = None
        self.error: str | None = None
        threading.Thread(target=self._run, args=(proxy, verify, url), daemon=True).start()

    def _run(self, proxy: str, verify: ssl.SSLContext, url: str) -> None:
        try:
            with httpx.Client(proxy=proxy, verify=verify, timeout=60) as c, c.stream(
                    "POST", url, json={"model": "bench-model", "stream": True,
                                       "messages": [{"role": "user", "content": "go"}]}) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        self.events += 1
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"[:200]
        self.ended = time.perf_counter()


def wait(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return bool(cond())


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


def run(workdir: Path, runs: int) -> dict[str, Any]:
    from fleetgate.cli import ca_init
    from fleetgate.identity.mint import mint_token

    check_upstream_name()
    ca_pem, cert, key = make_certs(workdir)
    confdir = workdir / "confdir"
    confdir.mkdir()
    verify = ssl.create_default_context(cafile=str(ca_init(confdir, quiet=True)))
    secret = secrets.token_hex(32).encode()
    (workdir / "jwt.secret").write_bytes(secret)
    admin_token = secrets.token_hex(24)
    (workdir / "admin.token").write_text(admin_token)
    upstream = start_upstream(workdir, cert, key)
    rules = workdir / "rules.yaml"
    rules.write_text(small_policy(upstream.port, llm=False, mcp=False))
    _redis, url = start_redis(workdir)
    opts = {"stream_large_bodies": "1m", "fleetgate_rules": str(rules),
            "fleetgate_jwt_secret_file": str(workdir / "jwt.secret"),
            "fleetgate_metrics_listen": "127.0.0.1:0", "fleetgate_admin_listen": "127.0.0.1:0",
            "fleetgate_admin_token_file": str(workdir / "admin.token"),
            "fleetgate_state": url}
    launches = [launch_proxy(n, workdir, proxy_argv(confdir, ca_pem, {
        **opts, "fleetgate_decision_log": str(workdir / f"decisions-{n}.jsonl")},
        GATEWAY_SCRIPT), True) for n in ("A", "B", "C")]
    a, b, c = (launch.wait() for launch in launches)
    base = f"https://localhost:{upstream.port}{CHAT}"
    admin = httpx.Client(base_url=f"http://127.0.0.1:{a.admin_port}", timeout=30,
                         headers={"Authorization": f"Bearer {admin_token}"})

    def proxy(gw: Any, agent: str) -> str:
        tok = mint_token(secret, agent, 3600, {"agent_role": BENCH_ROLE,
                                               "session_id": f"{agent}-session"})
        return f"http://agent:{tok}@127.0.0.1:{gw.port}"

    lags: list[float] = []
    per_replica: dict[str, list[float]] = {"B": [], "C": []}
    answered: list[float] = []
    gateway_cut: list[float] = []
    failures: list[str] = []
    for i in range(runs):
        agent = f"replica-kill-{i}-{secrets.token_hex(3)}"
        held = {"B": Held(proxy(b, agent), verify, base), "C": Held(proxy(c, agent), verify, base)}
        if not wait(lambda h=held: all(x.events >= 2 or x.ended for x in h.values()), 30):
            failures.append(f"run {i}: streams did not start")
            continue
        if any(x.ended for x in held.values()):
            failures.append(f"run {i}: a stream ended early: {[x.error for x in held.values()]}")
            continue
        sent = time.perf_counter()
        r = admin.post("/v1/actions", json={"verb": "stop", "scope": f"agent:{agent}",
                                            "reason": "bench kill_replicas", "by": "bench"})
        answered.append((time.perf_counter() - sent) * 1000)
        if r.status_code != 200:
            failures.append(f"run {i}: admin answered {r.status_code}: {r.text[:200]}")
            continue
        gateway_cut.append(float(r.json().get("cut_ms") or 0.0))
        if not wait(lambda h=held: all(x.ended for x in h.values()), 10):
            failures.append(f"run {i}: not every stream was cut within 10 s")
            continue
        for name, x in held.items():
            per_replica[name].append(((x.ended or sent) - sent) * 1000)
        lags.append(max(((x.ended or sent) - sent) * 1000 for x in held.values()))
        time.sleep(0.2)
    admin.close()

    def summary(xs: list[float]) -> dict[str, Any]:
        if not xs:
            return {"n": 0}
        return {"n": len(xs), "p50": round(statistics.median(xs), 3),
                "p99": round(pct(xs, 99), 3), "max": round(max(xs), 3)}
    return {
        "what": "stop POSTed to gateway A's admin API -> the later of two SSE streams of that "
                "agent (through gateways B and C) ends, as their clients see it",
        "target": "p99 <= 250 ms", "runs": runs, "replicas": 3, "state": "redis",
        "command_to_last_cut_ms": summary(lags),
        "per_replica_cut_ms": {k: summary(v) for k, v in per_replica.items()},
        "command_answered_ms": summary(answered),
        "samples_ms": [round(x, 3) for x in lags],
        "failures": failures, "environment": environment(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    install_cleanup()
    try:
        with workspace(args.keep) as workdir:
            out = run(workdir, args.runs)
    finally:
        stop_all()
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 1 if out["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
