"""What tracing costs agents, and what a dead collector costs them: OTLP export side by side.

    .venv/bin/python bench/otel.py [--agents 16] [--rounds 5] [--slice 3] [--out F]

Four proxies in one run, the load interleaved (every round runs each for one slice, the order
rotating): bare mitmdump (the floor); fleetgate without export; fleetgate exporting every span
and metric over OTLP/HTTP to a live collector (an in-process receiver that reads and answers
every export); fleetgate exporting to a **dead collector** — a socket that accepts TCP
connections and never answers, the worst case (every export waits out the exporter's
timeout; a refused port fails fast instead). The load is bench (a)'s chat call from
``--agents`` concurrent keep-alive agents, each with its own session (so session spans are
built too), through the proxy URL, to the TLS upstream by name (``localhost``).

Reported per target: requests/s, latency p50/p99, proxy CPU per request, and for the
exporting gateways the spans exported / dropped / failed (from their /metrics), with the
ratios live/off and dead/off. Reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from driver import Run, Target, chat_op, close_all, closed_loop
from policy import BENCH_ROLE, small_policy
from procs import GATEWAY_SCRIPT, install_cleanup, launch_proxy, proxy_argv, start_upstream, stop_all
from stack import check_upstream_name, environment, make_certs, workspace


class Collector:
    """A live OTLP/HTTP endpoint: reads each export whole and answers 200 (an empty
    Export*ServiceResponse is an empty protobuf message)."""

    def __init__(self) -> None:
        self.exports = 0
        self.bytes = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                outer.bytes += len(self.rfile.read(n))
                outer.exports += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def black_hole() -> tuple[socket.socket, str]:
    """A collector that is down the worst way: connections are accepted by the kernel (the
    backlog) and never read or answered."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1024)
    return s, f"http://127.0.0.1:{s.getsockname()[1]}"


def spans_counted(metrics: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("fleetgate_otel_spans_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            out[result] = float(line.rsplit(" ", 1)[1])
    return out


async def measure(targets: list[Target], agents: int, rounds: int, slice_s: float) -> dict[str, Run]:
    runs = {t.name: Run() for t in targets}
    clients = {t.name: t.clients(agents, prefix=f"otel-{t.name}") for t in targets}
    try:
        for t in targets:  # warm-up: connections, tokens, caches
            await closed_loop(clients[t.name], chat_op(t.base_url), duration=1.0)
        for r in range(rounds):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for t in order:
                runs[t.name].merge(await closed_loop(clients[t.name], chat_op(t.base_url),
                                                     duration=slice_s, pid=t.pid))
    finally:
        for cs in clients.values():
            await close_all(cs)
    return runs


def run(workdir: Path, agents: int, rounds: int, slice_s: float) -> dict[str, Any]:
    import ssl

    from fleetgate.cli import ca_init
    from fleetgate.identity.mint import mint_token

    check_upstream_name()
    ca_pem, cert, key = make_certs(workdir)
    confdir = workdir / "confdir"
    confdir.mkdir()
    verify = ssl.create_default_context(cafile=str(ca_init(confdir, quiet=True)))
    secret = secrets.token_hex(32).encode()
    (workdir / "jwt.secret").write_bytes(secret)
    upstream = start_upstream(workdir, cert, key)
    rules = workdir / "rules.yaml"
    rules.write_text(small_policy(upstream.port, llm=True, mcp=False))
    collector = Collector()
    hole, dead_url = black_hole()
    common = {"stream_large_bodies": "1m", "fleetgate_rules": str(rules),
              "fleetgate_jwt_secret_file": str(workdir / "jwt.secret"),
              "fleetgate_metrics_listen": "127.0.0.1:0", "fleetgate_admin_listen": "",
              "fleetgate_otel_session_idle": "2"}
    plans = {
        "bare": (proxy_argv(confdir, ca_pem, {"stream_large_bodies": "1m"}), False),
        "off": (proxy_argv(confdir, ca_pem, {**common, "fleetgate_decision_log":
                                             str(workdir / "off.jsonl")}, GATEWAY_SCRIPT), True),
        "live": (proxy_argv(confdir, ca_pem, {**common, "fleetgate_otel_endpoint": collector.url,
                                              "fleetgate_decision_log": str(workdir / "live.jsonl")},
                            GATEWAY_SCRIPT), True),
        "dead": (proxy_argv(confdir, ca_pem, {**common, "fleetgate_otel_endpoint": dead_url,
                                              "fleetgate_decision_log": str(workdir / "dead.jsonl")},
                            GATEWAY_SCRIPT), True),
    }
    launches = {n: launch_proxy(n, workdir, argv, fg) for n, (argv, fg) in plans.items()}
    proxies = {n: launch.wait() for n, launch in launches.items()}
    base = f"https://localhost:{upstream.port}"

    def mint(agent: str) -> str:
        return mint_token(secret, agent, 3600, {"agent_role": BENCH_ROLE,
                                                "session_id": f"{agent}-session"})

    targets = [Target(n, base, verify, proxy_port=p.port, pid=p.pid,
                      mint=mint if p.fleetgate else None) for n, p in proxies.items()]
    runs = asyncio.run(measure(targets, agents, rounds, slice_s))
    results: dict[str, Any] = {n: r.summary() for n, r in runs.items()}
    for n in ("live", "dead"):
        results[n]["spans"] = spans_counted(proxies[n].metrics())
    results["live"]["collector"] = {"exports": collector.exports, "bytes": collector.bytes}
    collector.stop()
    hole.close()

    def ratio(a: str, b: str, key: str) -> float | None:
        x, y = results[a].get(key), results[b].get(key)
        return round(x / y, 3) if x and y else None

    ratios = {f"{a}/{b} {k}": ratio(a, b, k) for a, b in (("live", "off"), ("dead", "off"),
                                                          ("off", "bare"))
              for k in ("rps", "p50_ms", "p99_ms", "proxy_cpu_ms_per_req")}
    return {"what": "chat calls through bare mitmdump and fleetgate without OTLP export, "
                    "exporting to a live collector, exporting to a dead one (accepts, never "
                    "answers)",
            "agents": agents, "rounds": rounds, "slice_s": slice_s, "results": results,
            "ratios": ratios, "environment": environment()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--slice", type=float, default=3.0)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    install_cleanup()
    try:
        with workspace(args.keep) as workdir:
            out = run(workdir, args.agents, args.rounds, args.slice)
    finally:
        stop_all()
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    errors = sum(r.get("errors", 0) for r in out["results"].values())
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
