"""Worker scaling: ``fleetgate run --workers 1`` vs ``--workers 2`` on the same Redis.

    .venv/bin/python bench/workers.py [--agents 32] [--rounds 3] [--slice 3] [--no-limits] [--out F]

Starts a local TLS upstream (bench/upstream.py, reached by name, ``localhost``), one
``redis-server``, and two gateways exactly as an operator starts them: ``fleetgate run
--workers 1 --state redis://…`` (today's single mitmdump) and ``--workers 2`` (the supervisor,
two mitmdumps on one port with SO_REUSEPORT). Both share the Redis. Then closed-loop chat
calls from ``--agents`` concurrent keep-alive clients (each its own connection and JWT,
through the proxy URL as ``HTTPS_PROXY`` gives it), interleaved: every round runs each
target for one slice, the order rotating. Reported per target: requests/s, p50/p99, gateway
CPU per request (every gateway process: the workers and, for 2, the supervisor), how the
connections split over the workers, Redis commands per request (``INFO commandstats``, PINGs
left out) with Redis' time per command, and Redis' own CPU per request (``INFO cpu``).
The ratio 2 workers / 1 worker is printed last, with the figures of the 16-core projection
in bench/README.md ("Workers").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from driver import Target, chat_op, close_all, closed_loop, ms, pct
from policy import small_policy, supports_limits_section, supports_llm_section
from procs import Proc, cpu_seconds, exe, install_cleanup, start_upstream, stop_all
from stack import check_upstream_name, make_certs

from fleetgate.cli import ca_init
from fleetgate.identity.mint import mint_token


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_info(port: int, section: str) -> dict[str, Any]:
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    try:
        return dict(r.info(section))
    finally:
        r.close()


def redis_snapshot(port: int) -> dict[str, Any]:
    cmd = redis_info(port, "commandstats")
    cpu = redis_info(port, "cpu")
    return {"cpu": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            "cmds": {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
                     for k, v in cmd.items()}}


class Gateway:
    def __init__(self, name: str, workers: int, workdir: Path, args: list[str]) -> None:
        self.name, self.workers = name, workers
        self.port, self.metrics = free_port(), free_port()
        d = workdir / name
        d.mkdir()
        argv = [exe("fleetgate"), "run", "--workers", str(workers), "--listen-port", str(self.port),
                "--metrics", f"127.0.0.1:{self.metrics}", "--admin", f"127.0.0.1:{free_port()}",
                "--state-dir", str(d / "state"), "--decision-log", str(d / "decisions.jsonl"), *args]
        self.proc = Proc(name, argv, d).start()

    def wait(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.metrics}/healthz/ready", timeout=3).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.proc is not None and self.proc.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not become ready:\n{self.proc.text()[-3000:]}")

    def pids(self) -> list[int]:
        if self.workers == 1:
            return [self.proc.pid]  # fleetgate run --workers 1 execs mitmdump: the same pid
        ws = httpx.get(f"http://127.0.0.1:{self.metrics}/workers", timeout=5).json()
        return [self.proc.pid, *(int(w["pid"]) for w in ws)]

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids())

    def allowed_by_worker(self) -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10).text
        out: dict[str, float] = {}
        for m in re.finditer(r'^fleetgate_requests_total\{([^}]*)\} ([0-9.e+]+)$', text, re.M):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if labels.get("decision") == "allow":
                w = labels.get("worker", "0")
                out[w] = out.get(w, 0.0) + float(m.group(2))
        return out


async def measure(gws: list[Gateway], targets: dict[str, Target], redis_port: int, agents: int,
                  rounds: int, slice_s: float) -> dict[str, Any]:
    res: dict[str, dict[str, Any]] = {g.name: {"lat": [], "n": 0, "elapsed": 0.0, "cpu": 0.0,
                                                 "redis_cpu": 0.0, "cmds": {}, "errors": 0}
                                      for g in gws}
    clients = {g.name: targets[g.name].clients(agents, prefix=f"{g.name}-agent") for g in gws}
    op = chat_op(targets[gws[0].name].base_url)
    try:
        for g in gws:  # warm-up: every connection open, every token verified
            await closed_loop(clients[g.name], op, duration=1.0)
        before = {g.name: g.allowed_by_worker() for g in gws}
        for r in range(rounds):
            order = gws[r % len(gws):] + gws[:r % len(gws)]
            for g in order:
                cpu0, red0 = g.cpu(), redis_snapshot(redis_port)
                run = await closed_loop(clients[g.name], op, duration=slice_s)
                cpu1, red1 = g.cpu(), redis_snapshot(redis_port)
                a = res[g.name]
                a["lat"] += run.latencies
                a["n"] += len(run.latencies)
                a["errors"] += run.errors
                a["elapsed"] += run.elapsed
                a["cpu"] += cpu1 - cpu0
                a["redis_cpu"] += red1["cpu"] - red0["cpu"]
                for k, (calls, usec) in red1["cmds"].items():
                    c0, u0 = red0["cmds"].get(k, (0, 0))
                    pc, pu = a["cmds"].get(k, (0, 0))
                    a["cmds"][k] = (pc + calls - c0, pu + usec - u0)
        after = {g.name: g.allowed_by_worker() for g in gws}
    finally:
        for cs in clients.values():
            await close_all(cs)
    out: dict[str, Any] = {}
    for g in gws:
        a = res[g.name]
        n = a["n"] or 1
        cmds = {k: v for k, v in a["cmds"].items() if k not in ("ping", "info") and v[0]}
        split = {w: after[g.name].get(w, 0) - before[g.name].get(w, 0) for w in after[g.name]}
        out[g.name] = {
            "workers": g.workers, "requests": a["n"], "errors": a["errors"],
            "rps": round(a["n"] / a["elapsed"], 1),
            "p50_ms": ms(pct(a["lat"], 50)), "p99_ms": ms(pct(a["lat"], 99)),
            "gateway_cpu_ms_per_req": round(a["cpu"] * 1000 / n, 3),
            "gateway_cpu_cores": round(a["cpu"] / a["elapsed"], 2),
            "requests_by_worker": split,
            "redis_cmds_per_req": round(sum(c for c, _ in cmds.values()) / n, 2),
            "redis_cmds": {k: {"per_req": round(c / n, 2), "usec_per_call": round(u / c, 2)}
                           for k, (c, u) in sorted(cmds.items())},
            "redis_usec_per_req": round(sum(u for _, u in cmds.values()) / n, 2),
            "redis_cpu_us_per_req": round(a["redis_cpu"] * 1e6 / n, 1),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=32, help="concurrent keep-alive clients")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--slice", type=float, default=3.0, help="seconds per target per round")
    ap.add_argument("--no-limits", action="store_true",
                    help="rules without the two rate limits per request (no Redis on the request path)")
    ap.add_argument("--out", default="", help="write the JSON here too")
    args = ap.parse_args(argv)
    install_cleanup()
    check_upstream_name()
    workdir = Path(tempfile.mkdtemp(prefix="fleetgate-bench-workers-"))
    try:
        ca_pem, cert, key = make_certs(workdir)
        confdir = workdir / "confdir"
        confdir.mkdir()
        mitm_ca = ca_init(confdir, quiet=True)
        secret = secrets.token_hex(32).encode()
        (workdir / "jwt.secret").write_bytes(secret)
        upstream = start_upstream(workdir, cert, key)
        limits = not args.no_limits and supports_limits_section(workdir)
        rules = workdir / "rules.yaml"
        rules.write_text(small_policy(upstream.port, llm=supports_llm_section(workdir), mcp=False,
                                      limits=limits))
        redis_port = free_port()
        redis = Proc("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--loglevel", "warning"], workdir).start()
        time.sleep(0.3)
        state = f"redis://127.0.0.1:{redis_port}/0"
        common = ["--state", state, "--rules", str(rules), "--confdir", str(confdir),
                  "--jwt-secret-file", str(workdir / "jwt.secret"), "--",
                  "--set", f"ssl_verify_upstream_trusted_ca={ca_pem}", "--set", "stream_large_bodies=1m"]
        gws = [Gateway("workers-1", 1, workdir, common), Gateway("workers-2", 2, workdir, common)]
        for g in gws:
            g.wait()

        def mint(agent: str) -> str:
            return str(mint_token(secret, agent, 3600, {"agent_role": "bench", "agent_id": agent}))

        import ssl
        verify = ssl.create_default_context(cafile=str(mitm_ca))
        base = f"https://localhost:{upstream.port}"
        targets = {g.name: Target(g.name, base, verify, g.port, None, mint) for g in gws}
        result = asyncio.run(measure(gws, targets, redis_port, args.agents, args.rounds, args.slice))
        one, two = result["workers-1"], result["workers-2"]
        summary = {
            "agents": args.agents, "rounds": args.rounds, "slice_s": args.slice,
            "rate_limits_per_request": 2 if limits else 0, "redis_pid": redis.pid,
            "throughput_ratio_2_over_1": round(two["rps"] / one["rps"], 2),
            "cpu_per_req_ratio_2_over_1": round(
                two["gateway_cpu_ms_per_req"] / one["gateway_cpu_ms_per_req"], 2),
            "per_worker_capacity_rps": round(1000 / two["gateway_cpu_ms_per_req"], 1),
            "redis_capacity_rps_one_core": round(1e6 / two["redis_cpu_us_per_req"], 0)
            if two["redis_cpu_us_per_req"] > 0 else None,
            "targets": result,
        }
        text = json.dumps(summary, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        print(f"\n2 workers / 1 worker: {summary['throughput_ratio_2_over_1']}x requests/s "
              f"({one['rps']} -> {two['rps']}), gateway CPU per request "
              f"{one['gateway_cpu_ms_per_req']} -> {two['gateway_cpu_ms_per_req']} ms, "
              f"Redis {two['redis_cmds_per_req']} commands / {two['redis_cpu_us_per_req']} us CPU "
              "per request", file=sys.stderr)
        return 0 if not (one["errors"] or two["errors"]) else 1
    finally:
        stop_all()
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
