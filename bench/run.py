"""`make bench`: what fleetgate's full addon chain costs against bare mitmdump and no proxy.

    .venv/bin/python bench/run.py [--quick] [--soak SECONDS] [--only a,b,...] [--merge] [--keep]

Starts a local TLS upstream, a bare mitmdump and fleetgate, runs the scenarios of the issue
in one process against all three, and writes bench/results/latest.json and latest.md (and
prints the table). ``--only d --merge`` runs only (d) and folds it into the results already
there instead of replacing them (the table says which scenario came from which run). See
bench/README.md for the method.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from policy import UPSTREAM_HOST
from procs import NoiseMeter, install_cleanup, stop_all
from report import judge, markdown, merge
from scenarios import PENDING, SCENARIOS, Plan
from stack import Bench, ResolverError, bring_up, check_upstream_name, environment, workspace

RESULTS = Path(__file__).resolve().parent / "results"


def log(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


async def run_scenarios(bench: Bench, plan: Plan, only: set[str] | None, results: dict[str, Any],
                        t0: float) -> None:
    for key, text in PENDING:
        if only is None or key in only:
            results["pending"].append(text)
    for sc in SCENARIOS:
        wanted = only is None or sc.key in only or sc.key.split("_")[0] in only
        if not wanted:
            continue
        log(t0, f"{sc.title} ...")
        s0 = time.perf_counter()
        noise = NoiseMeter()
        try:
            results["scenarios"][sc.key] = await sc.run(bench, plan)
        except Exception as exc:
            traceback.print_exc()
            results["errors"][sc.key] = f"{type(exc).__name__}: {exc}"
            partial = getattr(exc, "result", None)
            if isinstance(partial, dict):  # a failed check: keep the figures it was judged on
                results["scenarios"][sc.key] = partial
        results["durations_s"][sc.key] = round(time.perf_counter() - s0, 1)
        results["other_cpu_cores"][sc.key] = noise.cores()
        log(t0, f"{sc.title}: {results['durations_s'][sc.key]} s "
                f"(other processes: {results['other_cpu_cores'][sc.key]:.2f} cores)")


def loop_factory() -> tuple[Any, str]:
    try:
        import uvloop

        return uvloop.new_event_loop, f"uvloop {getattr(uvloop, '__version__', '?')}"
    except ImportError:
        return None, "asyncio"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fleetgate vs bare mitmdump vs direct")
    ap.add_argument("--quick", action="store_true", help="~2-minute smoke run (small counts, short soak)")
    ap.add_argument("--soak", type=float, default=None, help="soak seconds (default 300; --quick: 20)")
    ap.add_argument("--only", default="", help="comma-separated scenario keys: a,b,c,d,e,f,g "
                                               "(e = e_requests,e_streams,e_soak)")
    ap.add_argument("--merge", action="store_true",
                    help="fold the scenarios run into the results already in --out (the other "
                         "scenarios' figures are kept; the table names the separate run)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = ap.parse_args(argv)

    install_cleanup()
    plan = Plan.quick() if args.quick else Plan()
    if args.soak is not None:
        plan.soak = args.soak
    only = {x.strip() for x in args.only.split(",") if x.strip()} or None
    factory, loop_name = loop_factory()
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "quick": args.quick, "plan": plan.__dict__, "environment": environment(),
        "driver": {"event_loop": loop_name,
                   "process": "one asyncio process, one httpx.AsyncClient per agent"},
        "scenarios": {}, "errors": {}, "pending": [], "durations_s": {}, "other_cpu_cores": {},
    }
    code = 0
    try:
        with workspace(args.keep) as workdir:
            log(t0, f"work directory {workdir}")
            bench = bring_up(workdir)
            results["setup"] = {
                "upstream": {"host": UPSTREAM_HOST, "port": bench.upstream.port,
                             "resolves_to": check_upstream_name(bench.upstream.port),
                             **bench.upstream.info},
                "llm_provider_routed": bench.llm,
                "mcp_server_declared": bench.mcp,
                "rate_limit_variant": bench.limits,
                "proxies": {n: {"argv": p.argv, "startup_s": round(p.started_s, 2)}
                            for n, p in bench.proxies.items()},
            }
            log(t0, f"up: upstream {bench.base_url} (by name; {UPSTREAM_HOST} resolves to "
                    f"{', '.join(results['setup']['upstream']['resolves_to'])}), "
                    + ", ".join(f"{n} :{p.port} ({p.started_s:.1f} s)" for n, p in bench.proxies.items()))
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(run_scenarios(bench, plan, only, results, t0))
    except KeyboardInterrupt:
        results["errors"]["interrupted"] = "interrupted"
        code = 130
    except ResolverError as exc:  # said plainly, without a traceback: the machine, not the bench
        print(exc, file=sys.stderr)
        results["errors"]["setup"] = str(exc)
        code = 2
    except Exception as exc:
        traceback.print_exc()
        results["errors"]["setup"] = f"{type(exc).__name__}: {exc}"
        code = 1
    finally:
        stop_all()
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    results["targets_judged"] = judge(results)
    if results["errors"] and not code:
        code = 1  # this run's failures only: merged-in results carry their own
    previous = args.out / "latest.json"
    if args.merge and previous.exists():
        if "setup" in results["errors"] or "interrupted" in results["errors"]:
            # Nothing measured: never replace a full run's figures with a failed start.
            print(markdown(results))
            log(t0, f"not merged into {previous}: the run did not get to its scenarios")
            return code or 1
        results = merge(json.loads(previous.read_text()), results)
    md = markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / "latest.md").write_text(md + "\n")
    print(md)
    log(t0, f"wrote {args.out / 'latest.json'} and {args.out / 'latest.md'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
