"""The scenarios of the benchmark issue. Each takes the running :class:`stack.Bench` and a
:class:`Plan` and returns a JSON-able dict; ``report.py`` turns them into the table.

(a) small non-streaming LLM call, (b) streaming, (c) MCP tools/list and tools/call, (d) the kill
switch, (e) memory, (f) 50 MB download, (g) rules scale. A scenario whose feature has not landed
yet goes in :data:`PENDING` (none at present).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from driver import (
    CHAT_BODY,
    CHAT_PATH,
    MCP_CALL_BODY,
    MCP_CALL_TOOL,
    MCP_HEADERS,
    MCP_LIST_BODY,
    MCP_PATH,
    SSE_HEADERS,
    STREAM_BODY,
    BenchError,
    RssSampler,
    Run,
    SoakPlan,
    Target,
    chat_op,
    close_all,
    closed_loop,
    download_op,
    mcp_call_op,
    mcp_list_op,
    mem,
    ms,
    pct,
    soak,
    stream_op,
)
from policy import (
    BENCH_ROLE,
    LIMIT_FILL,
    LIMIT_SIZE,
    LIMIT_TYPES,
    MCP_ALLOWED_PREFIXES,
    MCP_SERVER,
    UPSTREAM_HOST,
    scale_agent_id,
    scale_policy,
    upstream_hostport,
    write_atomic,
)
from procs import launch_proxy, mem_kib, reset_peak, rss_mib
from stack import LIMITED, NOLLM, Bench


@dataclass
class Plan:
    """How much of everything. The defaults fit `make bench` in < 10 minutes on 2 cores;
    :meth:`quick` is the ~2-minute smoke run (``--quick``)."""

    a_concurrency: tuple[int, ...] = (1, 16)
    a_warmup: float = 1.0
    a_rounds: int = 3
    a_slice: float = 2.0
    b_agents: int = 4
    b_events: int = 20
    b_interval_ms: float = 10
    b_rounds: int = 6
    b_slice: float = 1.5
    c_concurrency: tuple[int, ...] = (1, 8)
    c_sse_concurrency: tuple[int, ...] = (1,)
    c_warmup: float = 0.5
    c_rounds: int = 3
    c_slice: float = 2.0
    d_streams: int = 100  # the stopped family's open streams
    d_bystanders: int = 10  # unrelated agents' streams that must not be cut
    d_rounds: int = 5
    d_events: int = 3600  # x d_interval_ms: 3 minutes, longer than the whole scenario
    d_interval_ms: float = 50
    d_cut_timeout: float = 10.0  # seconds after the command before an uncut stream fails the check
    d_observe: float = 1.0  # seconds the bystanders must keep streaming after the kill
    d_gate_actions: int = 100  # stops in force (reaching nobody) for the gate cost
    d_gate_agents: int = 16
    d_gate_warmup: float = 0.5
    d_gate_rounds: int = 3
    d_gate_slice: float = 1.5
    d_gate_calls: int = 5000  # in-process calls of the gate
    e_requests: int = 10_000
    e_agents: int = 16
    e_streams: int = 200
    e_stream_events: int = 20
    e_stream_interval_ms: float = 250
    f_bytes: int = 50 * 1000 * 1000
    f_reps: int = 2
    a_limiter_calls: int = 5000  # in-process calls of the rate limiter's hooks
    g_agents: int = 1000
    g_loads: int = 2
    g_decisions: int = 1000
    g_reloads: int = 3
    g_slice: float = 3.0
    soak: float = 300.0
    soak_warmup: float = 15.0
    soak_sample: float = 10.0
    soak_agents: int = 4
    soak_rate: float = 40.0  # requests per second per agent, per proxy
    soak_reconnect: float = 30.0

    @classmethod
    def quick(cls) -> Plan:
        return cls(a_warmup=0.5, a_rounds=1, a_slice=1.5, b_rounds=1, b_slice=1.5, c_warmup=0.3, c_rounds=1,
                   c_slice=1.0, a_limiter_calls=1000, d_rounds=2, d_gate_rounds=1, d_gate_slice=1.0,
                   d_gate_calls=1000,
                   e_requests=1000, e_streams=50, e_stream_events=8, f_bytes=20 * 1000 * 1000, f_reps=1,
                   g_agents=200, g_loads=1, g_decisions=300, g_reloads=1, g_slice=1.0, soak=15.0,
                   soak_warmup=2.0, soak_sample=1.0, soak_reconnect=5.0)


def summary(run: Run) -> dict[str, Any]:
    return run.summary()


# -- (a) small non-streaming LLM call ----------------------------------------------------


async def interleaved(b: Bench, names: list[str], agents: int, op_for: Callable[[Target], Any],
                      warmup: float, rounds: int, slice_s: float,
                      per_round: dict[str, list[Run]] | None = None,
                      around: Callable[[str], contextlib.AbstractAsyncContextManager[Any]] | None = None,
                      ) -> dict[str, Run]:
    """Run ``op`` closed-loop on each target in turn, ``rounds`` times ``slice_s`` seconds each,
    rotating the order every round so drift on a noisy machine hits every target alike.
    ``per_round`` (optional) receives each target's slices one by one; ``around`` (optional)
    wraps each of a target's slices (warm-up included), e.g. to put a gateway in a state for
    that slice only and take it out again, off the clock."""
    targets = [b.targets[n] for n in names]
    clients = {t.name: t.clients(agents) for t in targets}
    runs = {t.name: Run() for t in targets}
    seen = {t.name: [0, 0] for t in targets}  # upstream connections, requests

    @contextlib.asynccontextmanager
    async def state(name: str) -> AsyncIterator[None]:
        # The upstream's counters around each of the target's slices, off the clock: only this
        # target's agents talk to the upstream meanwhile, so the difference is theirs.
        c0, r0 = await b.upstream.counts()
        async with around(name) if around is not None else contextlib.nullcontext():
            yield
        c1, r1 = await b.upstream.counts()
        seen[name][0] += c1 - c0
        seen[name][1] += r1 - r0

    try:
        for t in targets:
            async with state(t.name):
                await closed_loop(clients[t.name], op_for(t), duration=warmup)
        for r in range(rounds):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for t in order:
                async with state(t.name):
                    one = await closed_loop(clients[t.name], op_for(t), duration=slice_s, pid=t.pid)
                runs[t.name].merge(one)
                if per_round is not None:
                    per_round.setdefault(t.name, []).append(one)
    finally:
        for cl in clients.values():
            await close_all(cl)
    for name, (conns, reqs) in seen.items():
        runs[name].upstream_connections, runs[name].upstream_requests = conns, reqs
    return runs


def reuse_problems(runs: dict[str, Run], agents: int, what: str) -> list[str]:
    """Targets whose agents did not keep their one upstream connection: each agent is a client
    with a single keep-alive connection that sends request after request, as an agent does, so
    the upstream must see at most one connection per agent over the whole of
    :func:`interleaved`. A proxy that opens a connection per request (issue 13: mitmproxy
    never reused a connection to a *name* once fleetgate had rewritten the server address, and
    the 6th request of a tunnel hung) fails this, instead of being measured as merely slow."""
    return [f"{what}: {name} made the upstream accept {run.upstream_connections} connections for "
            f"{run.upstream_requests} requests of {agents} keep-alive agent(s)"
            for name, run in runs.items()
            if run.upstream_connections is not None and run.upstream_connections > agents]


async def scenario_a(b: Bench, plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {"request": "POST /v1/chat/completions, ~200 B JSON in, ~330 B JSON out",
                           "concurrency": {}}
    names = ["direct", "bare", "fleetgate"] + [n for n in (NOLLM, LIMITED) if n in b.targets]
    limited = LIMITED in b.targets
    log = b.workdir / LIMITED / "decisions.jsonl"
    if limited:
        out["rate_limits"] = {
            "limits": [{"type": k, "maxTokens": LIMIT_SIZE, "tokensPerFill": LIMIT_SIZE,
                        "fillInterval": LIMIT_FILL} for k in LIMIT_TYPES],
            "probe": await _limits_probe(b, b.targets[LIMITED], log)}
        offset = log.stat().st_size
    slices: dict[str, dict[str, list[Run]]] = {}
    reuse: list[str] = []
    for agents in plan.a_concurrency:
        slices[str(agents)] = {}
        runs = await interleaved(b, names, agents, lambda t: chat_op(t.base_url), plan.a_warmup,
                                 plan.a_rounds, plan.a_slice, slices[str(agents)])
        out["concurrency"][str(agents)] = {name: summary(run) for name, run in runs.items()}
        reuse += reuse_problems(runs, agents, f"(a) {agents} agent(s)")
    if limited:
        rl = out["rate_limits"]
        await asyncio.sleep(0.3)
        rl["check"] = {**await asyncio.to_thread(_limits_log_check, log, offset, _limit_kinds(b)),
                       **await _limits_state(b)}
        try:
            rl["in_process"] = await asyncio.to_thread(
                _limiter_cost, b.workdir / "rules-limits" / "bench.yaml", b.upstream.port,
                plan.a_limiter_calls, _limit_kinds(b))
        except Exception as exc:  # a cross-check only: the gateway figures stand without it
            rl["in_process"] = {"error": f"{type(exc).__name__}: {exc}"}
        rl["cost"] = {}
        for conc, r in out["concurrency"].items():
            fg, lim, bare = (r.get(n, {}).get("proxy_cpu_ms_per_req") for n in ("fleetgate", LIMITED, "bare"))
            if fg and lim:
                # Each round's difference too: how far one round's noise moves the figure.
                pairs = zip(slices[conc].get(LIMITED, []), slices[conc].get("fleetgate", []), strict=False)
                rounds = [(x.summary().get("proxy_cpu_ms_per_req"), y.summary().get("proxy_cpu_ms_per_req"))
                          for x, y in pairs]
                rl["cost"][conc] = {
                    "proxy_cpu_ms_per_req": round(lim - fg, 3),
                    "per_round_ms": [round(x - y, 3) for x, y in rounds if x and y],
                    "pct_of_fleetgate": round((lim - fg) / fg * 100, 1),
                    "pct_of_bare": round((lim - fg) / bare * 100, 1) if bare else None,
                    "rps_ratio": round(r[LIMITED]["rps"] / r["fleetgate"]["rps"], 3)
                    if r[LIMITED].get("rps") and r["fleetgate"].get("rps") else None}
    out["upstream_reuse"] = {"ok": not reuse, "problems": reuse}
    if reuse:
        raise BenchError("(a) upstream connections not reused: " + "; ".join(reuse), result=out)
    return out


def _limit_kinds(b: Bench) -> list[str]:
    """The limits a bench chat call takes from: a ``type: tokens`` limit counts LLM calls only,
    so without the ``llm:`` section only the request count applies."""
    return sorted(k for k in LIMIT_TYPES if b.llm or k != "tokens")


async def _record_of(log: Path, agent: str, timeout: float = 5.0) -> dict[str, Any]:
    """The last decision-log record of ``agent`` (waiting for it to be written)."""
    deadline = time.perf_counter() + timeout
    while True:
        if log.exists():
            for line in reversed(log.read_text().splitlines()):
                rec = json.loads(line)
                if rec.get("agent") == agent:
                    return dict(rec)
        if time.perf_counter() > deadline:
            raise BenchError(f"{LIMITED}: no decision-log record of {agent} in {log}")
        await asyncio.sleep(0.05)


async def _limits_probe(b: Bench, t: Target, log: Path) -> dict[str, Any]:
    """The sanity check before the clock starts: one chat call through the rate-limited gateway
    must have taken from every bucket of the bench profile (its decision-log record lists each
    limit; the token reservation was settled to the metered usage) and ``GET /limits`` must
    show those buckets for the agent at exactly the levels the call left."""
    agent = "limits-probe"
    async with t.client(agent) as c:
        await chat_op(t.base_url)(c)
    rec = await _record_of(log, agent)
    entries = [e for e in rec.get("limits") or [] if isinstance(e, dict)]
    kinds = _limit_kinds(b)
    port = b.proxies[LIMITED].metrics_port
    async with httpx.AsyncClient(timeout=10) as h:
        snap = (await h.get(f"http://127.0.0.1:{port}/limits")).json()
    buckets = {x.get("type"): x for x in snap.get("buckets") or [] if x.get("key") == agent}
    out: dict[str, Any] = {"agent": agent, "status": rec.get("status"), "result": rec.get("result"),
                           "decision_log_limits": entries, "buckets": list(buckets.values())}
    problems = []
    if sorted(str(e.get("type")) for e in entries) != kinds:
        problems.append(f"the decision-log record lists limits {entries}, expected one of each of {kinds}")
    if sorted(str(k) for k in buckets) != kinds:
        problems.append(f"GET /limits shows {list(buckets.values())} for {agent}, expected one bucket of "
                        f"each of {kinds}")
    for e in entries:
        took = e.get("used") if e.get("type") == "tokens" else 1
        if e.get("type") == "tokens" and not isinstance(took, int):
            problems.append(f"the token reservation was not settled (no 'used'): {e}")
            continue
        level = (buckets.get(e.get("type")) or {}).get("level")
        if isinstance(took, int) and level is not None and level != LIMIT_SIZE - took:
            problems.append(f"{e.get('type')} bucket at {level}, expected {LIMIT_SIZE} - {took}")
    if problems:
        raise BenchError(f"{LIMITED}: the limiter did not run as expected: " + "; ".join(problems))
    return out


def _limits_log_check(log: Path, offset: int, kinds: list[str]) -> dict[str, Any]:
    """After the clock: every record the rate-limited gateway wrote during (a) (warm-up and
    timed slices) must show a request that took from every bucket and was not refused."""
    n = took_all = settled = refused = denied = 0
    reserved: list[int] = []
    used: list[int] = []
    first_bad: dict[str, Any] | None = None
    with open(log, "rb") as f:
        f.seek(offset)
        for line in f:
            rec = json.loads(line)
            n += 1
            entries = [e for e in rec.get("limits") or [] if isinstance(e, dict)]
            ok = sorted(str(e.get("type")) for e in entries) == kinds
            took_all += ok
            for e in entries:
                if e.get("type") == "tokens":
                    reserved.append(int(e.get("taken") or 0))
                    if isinstance(e.get("used"), int):
                        settled += 1
                        used.append(e["used"])
            if rec.get("status") == 429:
                refused += 1
            elif rec.get("result") != "allow":
                denied += 1
            if first_bad is None and (not ok or rec.get("result") != "allow"):
                first_bad = rec
    out: dict[str, Any] = {"records": n, "took_from_every_bucket": took_all, "refused_429": refused,
                           "denied_otherwise": denied}
    if "tokens" in kinds:
        out["token_reservations_settled"] = settled
        out["tokens_reserved_per_request"] = round(statistics.mean(reserved), 1) if reserved else None
        out["tokens_used_per_request"] = round(statistics.mean(used), 1) if used else None
    out["ok"] = bool(n) and took_all == n and not refused and not denied and (
        "tokens" not in kinds or settled == n)
    if first_bad is not None:
        out["first_bad_record"] = first_bad
    return out


LIMITER_BATCHES = 5


def _limiter_cost(rules: Path, port: int, n: int, kinds: list[str]) -> dict[str, Any]:
    """In-process: the limiter's own hooks for one bench chat call (``request``: take from
    every bucket; ``response``: settle the token reservation to the usage), with the policy and
    the flow facts the gateway has at that point (the rules' verdict, the JWT claims, the LLM
    request facts parsed from the bench body), but without the network and the rest of the
    chain. CPU time of the calling thread, best of :data:`LIMITER_BATCHES` batches: far less
    blurred by the machine's noise than the gateway difference, so it shows how much of that
    difference is the limiter's own work."""
    from mitmproxy import http
    from mitmproxy.test import tflow

    from fleetgate.addons.limits import LIMITS, RateLimiter
    from fleetgate.addons.state import CLAIMS, DECISION, IDENTITY, LLM_REQUEST, LLM_USAGE
    from fleetgate.llm.request import parse_request
    from fleetgate.metrics import GatewayMetrics
    from fleetgate.policy.loader import load_policy
    from fleetgate.runtime.policy import PolicyService
    from fleetgate.runtime.reservations import ReservationBook
    from fleetgate.stores.spend import SqliteSpendStore

    policy = load_policy(rules)
    metrics = GatewayMetrics()
    store = PolicyService(metrics)
    store.install(policy)
    limiter = RateLimiter(store, metrics, ReservationBook(SqliteSpendStore(None)))
    route = policy.providers.route(UPSTREAM_HOST, port, CHAT_PATH)
    llm = ({"is_llm": True, **parse_request(route, json.loads(CHAT_BODY), CHAT_PATH).to_cel(),
            "injected_usage": False} if route is not None else None)
    usage = {"tokens": {"input": 18, "output": 10}}
    headers = [("host", upstream_hostport(port)), ("accept", "application/json"),
               ("accept-encoding", "gzip, deflate"), ("connection", "keep-alive"),
               ("user-agent", "python-httpx/0.28.1"), ("content-type", "application/json"),
               ("content-length", str(len(CHAT_BODY)))]

    def flow(i: int) -> Any:
        f = tflow.tflow(resp=False)
        req = f.request
        req.method, req.scheme, req.host, req.port, req.path = "POST", "https", UPSTREAM_HOST, port, CHAT_PATH
        req.headers.clear()
        for k, v in headers:
            req.headers.add(k, v)
        agent = f"bench-agent-{i % 16:04d}"
        f.metadata[DECISION] = {"allow": True, "rule": "bench.llm", "reason": "", "status": None,
                                "profiles": [BENCH_ROLE]}
        f.metadata[CLAIMS] = {"sub": agent, "agent_id": agent, "agent_role": BENCH_ROLE, "jti": "0" * 32,
                              "iat": int(time.time()), "exp": int(time.time()) + 3600}
        f.metadata[IDENTITY] = {"agent": agent, "role": BENCH_ROLE, "session": None, "jti": "0" * 32}
        if llm is not None:
            f.metadata[LLM_REQUEST] = dict(llm)
        return f

    resp = http.Response.make(200, b"{}", {"content-type": "application/json"})
    batches: list[list[float]] = []
    for k in range(LIMITER_BATCHES + 1):  # batch 0 creates the buckets and warms up: not counted
        flows = [flow(i) for i in range(max(1, n // LIMITER_BATCHES))]
        times: list[float] = []
        for f in flows:
            t0 = time.thread_time_ns()  # this thread's CPU time: waiting for a core is not counted
            limiter.request(f)
            f.response = resp
            if llm is not None:
                f.metadata[LLM_USAGE] = usage
            limiter.response(f)
            times.append((time.thread_time_ns() - t0) / 1000)
        if k:
            batches.append(times)
    took = flows[-1].metadata.get(LIMITS)
    if not isinstance(took, list) or sorted(str(e.get("type")) for e in took) != kinds or any(
            e.get("type") == "tokens" and e.get("used") != 28 for e in took):
        raise BenchError(f"in-process, the limiter took {took!r}, expected one of each of {kinds}, settled")
    # Best batch, as timeit does: a busy machine only ever adds (a core shared with a neighbour's
    # thread runs slower even in CPU time), so the least disturbed batch is the closest estimate.
    best = min(batches, key=lambda t: pct(t, 50))
    return {"n": n, "batches": LIMITER_BATCHES,
            "us_per_request_p50": round(pct(best, 50), 1), "us_per_request_p99": round(pct(best, 99), 1),
            "us_per_request_mean": round(statistics.mean(best), 1),
            "batch_p50s_us": [round(pct(t, 50), 1) for t in batches]}


async def _limits_state(b: Bench) -> dict[str, Any]:
    """The gateway's own view after (a): its buckets (``GET /limits``) and refusals counted."""
    proxy = b.proxies[LIMITED]
    async with httpx.AsyncClient(timeout=10) as h:
        snap = (await h.get(f"http://127.0.0.1:{proxy.metrics_port}/limits")).json()
        metrics = (await h.get(f"http://127.0.0.1:{proxy.metrics_port}/metrics")).text
    buckets = [x for x in snap.get("buckets") or [] if str(x.get("key", "")).startswith("bench-agent-")]
    rejections = sum(float(m.group(1)) for m in
                     re.finditer(r"^fleetgate_ratelimit_rejections_total\S* ([\d.e+-]+)$", metrics, re.M))
    return {"bench_agent_buckets": len(buckets), "ratelimit_rejections_total": rejections}


# -- (b) streaming ---------------------------------------------------------------------------


async def scenario_b(b: Bench, plan: Plan) -> dict[str, Any]:
    def op_for(t: Target) -> Any:
        return stream_op(t.base_url, plan.b_events, plan.b_interval_ms)

    runs = await interleaved(b, ["direct", "bare-sse", "fleetgate"], plan.b_agents, op_for, 0.5,
                             plan.b_rounds, plan.b_slice)
    # Bare mitmdump with its default buffering: one slice is enough to show it.
    runs.update(await interleaved(b, ["bare"], plan.b_agents, op_for, 0.0, 1, plan.b_slice))
    out: dict[str, Any] = {"events": plan.b_events, "interval_ms": plan.b_interval_ms,
                           "agents": plan.b_agents, "targets": {}}
    reuse = reuse_problems(runs, plan.b_agents, "(b)")
    for name, run in runs.items():
        first = [x[0] for x in run.extra]
        last = [x[1] for x in run.extra]
        out["targets"][name] = {
            "streams": len(run.extra), "errors": run.errors,
            "ttfe_p50_ms": ms(pct(first, 50)), "ttfe_p99_ms": ms(pct(first, 99)),
            "ttle_p50_ms": ms(pct(last, 50)), "ttle_p99_ms": ms(pct(last, 99)),
            "proxy_cpu_ms_per_stream": summary(run).get("proxy_cpu_ms_per_req"),
            "proxy_cpu_util": summary(run).get("proxy_cpu_util"),
            "upstream_connections": run.upstream_connections, "upstream_requests": run.upstream_requests,
            **({"first_error": run.first_error} if run.first_error else {}),
        }
    out["upstream_reuse"] = {"ok": not reuse, "problems": reuse}
    if reuse:
        raise BenchError("(b) upstream connections not reused: " + "; ".join(reuse), result=out)
    return out


# -- (c) MCP -------------------------------------------------------------------------------


def _mcp_catalogue() -> tuple[int, list[str]]:
    """How many tools the upstream offers, and the names the bench agents may use."""
    from upstream import mcp_tools

    tools = mcp_tools()
    return len(tools), [t["name"] for t in tools if t["name"].startswith(MCP_ALLOWED_PREFIXES)]


def _rpc_answer(r: httpx.Response) -> Any:
    """The JSON-RPC message of an answer: a JSON body, or the data of its one SSE event."""
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        data = [ln[5:].strip() for ln in r.text.splitlines() if ln.startswith("data:")]
        if len(data) != 1:
            raise BenchError(f"expected one SSE event, got {len(data)}")
        return json.loads(data[0])
    return r.json()


async def _mcp_probe(b: Bench, t: Target, allowed: list[str], total: int) -> dict[str, Any]:
    """The sanity check before the clock starts: one tools/list of each answer form parsed in
    full (how many tools, are they exactly the allowed ones, so none was hidden by pins or the
    poisoning scan), the allowed call, and a call of a tool the agent may not use (fleetgate
    must answer it with a JSON-RPC error). For fleetgate also the decision-log bytes each
    tools/list costs."""
    out: dict[str, Any] = {}
    url = t.base_url + MCP_PATH
    log = b.workdir / "fleetgate" / "decisions.jsonl"
    async with t.client("mcp-probe") as c:
        for form, suffix in (("json", ""), ("sse", "?sse=1")):
            r = await c.post(url + suffix, content=MCP_LIST_BODY, headers=MCP_HEADERS)
            if r.status_code != 200:
                raise BenchError(f"{t.name}: tools/list ({form}): HTTP {r.status_code}: {r.text[:300]}")
            msg = _rpc_answer(r)
            names = [x.get("name") for x in (msg.get("result") or {}).get("tools") or []]
            out[f"list_{form}"] = {"tools": len(names), "bytes": len(r.content),
                                   "content_type": r.headers.get("content-type"),
                                   "content_length": r.headers.get("content-length"),
                                   "exactly_the_allowed_tools": sorted(names) == sorted(allowed),
                                   **({"error": msg["error"]} if "error" in msg else {})}
        r = await c.post(url, content=MCP_CALL_BODY, headers=MCP_HEADERS)
        msg = r.json()
        out["call"] = {"tool": MCP_CALL_TOOL, "status": r.status_code, "bytes": len(r.content),
                       "ok": "result" in msg, **({"error": msg["error"]} if "error" in msg else {})}
        denied = MCP_CALL_BODY.replace(MCP_CALL_TOOL.encode(), b"kubectl_delete_namespace")
        r = await c.post(url, content=denied, headers=MCP_HEADERS)
        msg = r.json()
        out["call_not_allowed"] = {"tool": "kubectl_delete_namespace", "status": r.status_code,
                                   "refused": "error" in msg,
                                   "answer": msg.get("error") or "result"}
        if t.name == "fleetgate" and log.exists():
            n = 5
            size0 = log.stat().st_size
            for _ in range(n):
                await c.post(url, content=MCP_LIST_BODY, headers=MCP_HEADERS)
            await asyncio.sleep(0.2)
            out["decision_log_bytes_per_list"] = round((log.stat().st_size - size0) / n)
            last = json.loads(log.read_text().splitlines()[-1])
            out["decision_log_hidden_entries"] = len((last.get("mcp") or {}).get("hidden") or [])
    fg = t.name == "fleetgate"
    want = len(allowed) if fg else total
    for form in ("json", "sse"):
        got = out[f"list_{form}"]
        if got["tools"] != want or (fg and not got["exactly_the_allowed_tools"]):
            raise BenchError(f"{t.name}: tools/list ({form}) returned {got['tools']} tools, expected {want}"
                             f"{' (exactly the allowed ones)' if fg else ''}: {got}")
    if not out["call"]["ok"]:
        raise BenchError(f"{t.name}: tools/call {MCP_CALL_TOOL} failed: {out['call']}")
    if fg and not out["call_not_allowed"]["refused"]:
        raise BenchError(f"fleetgate let the agent call a tool it may not use: {out['call_not_allowed']}")
    return out


async def scenario_c(b: Bench, plan: Plan) -> dict[str, Any]:
    """MCP governance: tools/list of a 1,000-tool server filtered per agent, answered as JSON
    (and as one SSE event), and tools/call of an allowed tool; fleetgate vs bare vs direct."""
    if not b.mcp:
        raise BenchError("this fleetgate tree's rules have no mcp: section (MCP governance)")
    total, allowed = _mcp_catalogue()
    names = ["direct", "bare", "fleetgate"]
    expect = {"direct": total, "bare": total, "fleetgate": len(allowed)}
    out: dict[str, Any] = {"server": MCP_SERVER, "tools_offered": total, "tools_allowed": len(allowed),
                           "allowed_prefixes": list(MCP_ALLOWED_PREFIXES), "call_tool": MCP_CALL_TOOL,
                           "probe": {}, "list": {}, "call": {}, "list_sse": {}}
    # The first listing through fleetgate pins the server's tools (trust on first use); the
    # probe makes it, so the timed runs see the steady state.
    for name in names:
        out["probe"][name] = await _mcp_probe(b, b.targets[name], allowed, total)

    def timed(op_for: Callable[[Target], Any], agents: int) -> Awaitable[dict[str, Run]]:
        return interleaved(b, names, agents, op_for, plan.c_warmup, plan.c_rounds, plan.c_slice)

    reuse: list[str] = []
    for agents in plan.c_concurrency:
        runs = await timed(lambda t: mcp_list_op(t.base_url, expect[t.name]), agents)
        out["list"][str(agents)] = {n: summary(r) for n, r in runs.items()}
        reuse += reuse_problems(runs, agents, f"(c) tools/list, {agents} agent(s)")
    for agents in plan.c_concurrency:
        runs = await timed(lambda t: mcp_call_op(t.base_url), agents)
        out["call"][str(agents)] = {n: summary(r) for n, r in runs.items()}
        reuse += reuse_problems(runs, agents, f"(c) tools/call, {agents} agent(s)")
    for agents in plan.c_sse_concurrency:
        runs = await timed(lambda t: mcp_list_op(t.base_url, expect[t.name], sse=True), agents)
        out["list_sse"][str(agents)] = {n: summary(r) for n, r in runs.items()}
        reuse += reuse_problems(runs, agents, f"(c) tools/list as SSE, {agents} agent(s)")
    out["upstream_reuse"] = {"ok": not reuse, "problems": reuse}
    if reuse:
        raise BenchError("(c) upstream connections not reused: " + "; ".join(reuse), result=out)
    return out


# -- (e) memory ------------------------------------------------------------------------------


def _maps_tiktoken(pid: int) -> bool | None:
    """Whether the process has tiktoken's native module mapped (its tables are loaded only
    through it); ``None`` when ``/proc/<pid>/maps`` cannot be read."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any("tiktoken" in line for line in f)
    except OSError:
        return None


async def memory_requests(b: Bench, plan: Plan) -> dict[str, Any]:
    """Peak RSS of each proxy after ``e_requests`` small requests from ``e_agents`` agents.

    ``fleetgate`` runs rules that need no pre-flight token estimate (no budget, no
    ``type: tokens`` limit, no rule reading ``llm.estimated_input_tokens``), so it should
    never load a tokenizer table; ``fleetgate-limits`` (a ``type: tokens`` limit) needs the
    estimate on every chat call: the difference is what the table costs (issue 21, item 4)."""
    out: dict[str, Any] = {"requests": plan.e_requests, "agents": plan.e_agents}
    for name in ["bare", "fleetgate"] + [n for n in (LIMITED,) if n in b.targets]:
        t = b.targets[name]
        assert t.pid
        before = mem(t.pid)
        clients = t.clients(plan.e_agents, prefix="mem-agent")
        try:
            run = await closed_loop(clients, chat_op(t.base_url), count=plan.e_requests, pid=t.pid)
        finally:
            await close_all(clients)
        out[name] = {"before": before, "after": mem(t.pid), "tiktoken_mapped": _maps_tiktoken(t.pid),
                     **summary(run)}
    return out


async def memory_streams(b: Bench, plan: Plan) -> dict[str, Any]:
    """RSS of each proxy while ``e_streams`` SSE streams are open at once, each agent with its
    own connection (and, for fleetgate, its own JWT)."""
    out: dict[str, Any] = {"streams": plan.e_streams, "events": plan.e_stream_events,
                           "interval_ms": plan.e_stream_interval_ms}
    for name in ("bare-sse", "fleetgate"):
        out[name] = await _open_streams(b.targets[name], plan)
    return out


async def _open_streams(t: Target, plan: Plan) -> dict[str, Any]:
    assert t.pid
    pid = t.pid
    await asyncio.sleep(0.5)
    idle = rss_mib(pid)
    reset_peak(pid)
    clients = [t.client(f"stream-agent-{i:04d}") for i in range(plan.e_streams)]
    url = f"{t.base_url}/v1/chat/completions?events={plan.e_stream_events}" \
          f"&interval_ms={plan.e_stream_interval_ms:g}"
    open_now = 0
    open_max = 0
    all_open_rss: list[float] = []
    ttfe: list[float] = []
    errors: list[str] = []

    async def one(c: httpx.AsyncClient) -> None:
        nonlocal open_now, open_max
        t0 = time.perf_counter()
        counted = False
        try:
            async with c.stream("POST", url, content=STREAM_BODY, headers=SSE_HEADERS) as r:
                if r.status_code != 200:
                    raise BenchError(f"HTTP {r.status_code}")
                async for _chunk in r.aiter_raw():
                    if not counted:
                        counted = True
                        ttfe.append(time.perf_counter() - t0)
                        open_now += 1
                        open_max = max(open_max, open_now)
                        if open_now == plan.e_streams:
                            all_open_rss.append(rss_mib(pid))
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            if counted:
                open_now -= 1

    t0 = time.perf_counter()
    try:
        with RssSampler(pid, 0.05) as sampler:
            await asyncio.gather(*(one(c) for c in clients))
    finally:
        await close_all(clients)
    elapsed = time.perf_counter() - t0
    peak = max(sampler.peak, mem_kib(pid)["VmHWM"] / 1024)
    await asyncio.sleep(0.5)
    return {
        "idle_rss_mib": round(idle, 1),
        "all_open_rss_mib": round(all_open_rss[0], 1) if all_open_rss else None,
        "peak_rss_mib": round(peak, 1), "after_close_rss_mib": round(rss_mib(pid), 1),
        "per_stream_kib": round((peak - idle) * 1024 / plan.e_streams, 1),
        "max_open": open_max, "errors": len(errors), "seconds": round(elapsed, 2),
        "ttfe_p50_ms": ms(pct(ttfe, 50)), "ttfe_p99_ms": ms(pct(ttfe, 99)),
        **({"first_error": errors[0]} if errors else {}),
    }


async def memory_soak(b: Bench, plan: Plan) -> dict[str, Any]:
    """bare and fleetgate soaked at the same time (so the 5 minutes are spent once)."""
    sp = SoakPlan(agents=plan.soak_agents, rate_per_agent=plan.soak_rate, warmup=plan.soak_warmup,
                  duration=plan.soak, sample_every=plan.soak_sample, reconnect_every=plan.soak_reconnect)
    bare, fg = await asyncio.gather(soak(b.targets["bare"], sp), soak(b.targets["fleetgate"], sp))
    return {"plan": sp.__dict__, "bare": bare, "fleetgate": fg}


# -- (f) 50 MB download ------------------------------------------------------------------------


async def scenario_f(b: Bench, plan: Plan) -> dict[str, Any]:
    names = ["direct", "bare", "fleetgate"]
    op = download_op(b.base_url, plan.f_bytes)
    res: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for rep in range(plan.f_reps):
        for name in names[rep % 3:] + names[:rep % 3]:
            t = b.targets[name]
            client = t.client("download-agent")
            try:
                await chat_op(t.base_url)(client)  # the tunnel is up before the clock starts
                rec: dict[str, Any] = {}
                if t.pid:
                    await asyncio.sleep(0.3)
                    rec["rss_before_mib"] = round(rss_mib(t.pid), 1)
                    reset_peak(t.pid)
                    with RssSampler(t.pid, 0.01) as sampler:
                        t0 = time.perf_counter()
                        await op(client)
                        dt = time.perf_counter() - t0
                    peak = max(sampler.peak, mem_kib(t.pid)["VmHWM"] / 1024)
                    rec["peak_rss_mib"] = round(peak, 1)
                    rec["growth_mib"] = round(peak - rec["rss_before_mib"], 1)
                else:
                    t0 = time.perf_counter()
                    await op(client)
                    dt = time.perf_counter() - t0
                rec["seconds"] = round(dt, 3)
                rec["mb_per_s"] = round(plan.f_bytes / dt / 1e6, 1)
                res[name].append(rec)
            finally:
                await client.aclose()
    out: dict[str, Any] = {"bytes": plan.f_bytes, "reps": plan.f_reps, "targets": {}}
    for name, recs in res.items():
        best = min(recs, key=lambda r: r["seconds"])
        agg: dict[str, Any] = {"seconds": best["seconds"], "mb_per_s": best["mb_per_s"], "runs": recs}
        if "growth_mib" in best:
            agg["growth_mib"] = max(r["growth_mib"] for r in recs)
            agg["peak_rss_mib"] = max(r["peak_rss_mib"] for r in recs)
        out["targets"][name] = agg
    return out


# -- (g) rules scale ---------------------------------------------------------------------------


def _decision_cost(policy_path: Path, agent: str, port: int, n: int) -> dict[str, Any]:
    from fleetgate.normalize import request_facts
    from fleetgate.policy.decide import decide
    from fleetgate.policy.loader import load_policy

    policy = load_policy(policy_path)
    claims = {"sub": agent, "agent_id": agent, "agent_role": "bench", "jti": "0" * 32,
              "exp": int(time.time()) + 3600}
    headers = [("host", upstream_hostport(port)), ("content-type", "application/json"),
               ("accept", "application/json"), ("user-agent", "python-httpx/0.28.1"),
               ("content-length", "180")]
    args = ("POST", "https", UPSTREAM_HOST, port, "/v1/chat/completions", headers)
    assert decide(policy, claims, request_facts(*args)).allow, "bench agent must be allowed"
    both: list[float] = []
    only: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        facts = request_facts(*args)
        t1 = time.perf_counter_ns()
        decide(policy, claims, facts)
        t2 = time.perf_counter_ns()
        both.append((t2 - t0) / 1000)
        only.append((t2 - t1) / 1000)
    return {"agent": agent, "n": n, "profiles": len(policy.agents),
            "rules": len(policy.rules) + sum(len(p.rules) for p in policy.agents),
            "facts_plus_decide_p50_us": round(pct(both, 50), 1),
            "facts_plus_decide_p99_us": round(pct(both, 99), 1),
            "decide_p50_us": round(pct(only, 50), 1), "decide_p99_us": round(pct(only, 99), 1)}


def _load_times(path: Path, n: int) -> list[float]:
    from fleetgate.policy.loader import load_policy

    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        load_policy(path)
        out.append(time.perf_counter() - t0)
    return out


def _decision_metric(text: str) -> tuple[float, float]:
    s = re.search(r"^fleetgate_decision_seconds_sum\S* ([\d.e+-]+)$", text, re.M)
    c = re.search(r"^fleetgate_decision_seconds_count\S* ([\d.e+-]+)$", text, re.M)
    return (float(s.group(1)) if s else 0.0, float(c.group(1)) if c else 0.0)


async def scenario_g(b: Bench, plan: Plan) -> dict[str, Any]:
    port = b.upstream.port
    scale_dir = b.workdir / "scale-rules"
    scale_dir.mkdir(exist_ok=True)
    scale_file = scale_dir / "scale.yaml"
    write_atomic(scale_file, scale_policy(port, plan.g_agents, llm=b.llm))
    last_agent = scale_agent_id(plan.g_agents - 10)  # matches near the end of the list
    out: dict[str, Any] = {"policy_bytes": scale_file.stat().st_size}

    # In-process: load/compile and per-decision cost, small policy vs scale policy.
    small_loads = await asyncio.to_thread(_load_times, b.rules, 5)
    scale_loads = await asyncio.to_thread(_load_times, scale_file, plan.g_loads)
    out["in_process"] = {
        "small": {"load_ms": round(statistics.median(small_loads) * 1000, 1),
                  **await asyncio.to_thread(_decision_cost, b.rules, "bench-agent-0000", port,
                                            plan.g_decisions * 3)},
        "scale": {"load_ms": round(statistics.median(scale_loads) * 1000, 1),
                  "load_runs_ms": [round(x * 1000, 1) for x in scale_loads],
                  **await asyncio.to_thread(_decision_cost, scale_file, last_agent, port, plan.g_decisions)},
    }

    # A second fleetgate running the scale policy: startup, throughput next to the small-policy
    # gateway (interleaved), in-gateway decision time, and hot-reload time.
    argv = b.fleetgate_argv(scale_file, b.workdir / "fleetgate-scale" / "decisions.jsonl",
                            fleetgate_reload_ms="100")
    proxy = launch_proxy("fleetgate-scale", b.workdir, argv, True).wait(timeout=120)
    try:
        gw: dict[str, Any] = {"startup_s": round(proxy.started_s, 2), "reload_poll_ms": 100,
                              "rss_idle_mib": round(rss_mib(proxy.pid), 1)}
        scale_t = Target("fleetgate-scale", b.base_url, b.proxy_verify, proxy.port, proxy.pid, b.mint)
        b.targets["fleetgate-scale"] = scale_t
        agents = max(plan.a_concurrency)
        small_t = b.targets["fleetgate"]
        clients = {
            "fleetgate": small_t.clients(agents, prefix="scale-cmp"),
            "fleetgate-scale": [scale_t.client(scale_agent_id(plan.g_agents - agents + i))
                                for i in range(agents)],
        }
        runs = {k: Run() for k in clients}
        try:
            op_small, op_scale = chat_op(small_t.base_url), chat_op(scale_t.base_url)
            ops = {"fleetgate": op_small, "fleetgate-scale": op_scale}
            pids = {"fleetgate": small_t.pid, "fleetgate-scale": scale_t.pid}
            for k in clients:
                await closed_loop(clients[k], ops[k], duration=0.5)
            metrics0 = {"fleetgate": _decision_metric(b.proxies["fleetgate"].metrics()),
                        "fleetgate-scale": _decision_metric(proxy.metrics())}
            for r in range(2):
                for k in (list(clients) if r % 2 == 0 else list(clients)[::-1]):
                    runs[k].merge(await closed_loop(clients[k], ops[k], duration=plan.g_slice, pid=pids[k]))
            metrics1 = {"fleetgate": _decision_metric(b.proxies["fleetgate"].metrics()),
                        "fleetgate-scale": _decision_metric(proxy.metrics())}
        finally:
            for cl in clients.values():
                await close_all(cl)
        gw["throughput"] = {}
        for k, run in runs.items():
            ds, dc = (metrics1[k][0] - metrics0[k][0], metrics1[k][1] - metrics0[k][1])
            gw["throughput"][k] = {**summary(run), "agents": agents,
                                   "in_gateway_decision_mean_us": round(ds / dc * 1e6, 1) if dc else None}
        gw["reloads"] = await _reloads(proxy, scale_t, scale_file, port, plan, b.llm)
        gw["rss_after_mib"] = round(rss_mib(proxy.pid), 1)
        out["gateway"] = gw
    finally:
        proxy.proc.stop()
        b.targets.pop("fleetgate-scale", None)
    return out


async def _reloads(proxy: Any, target: Target, path: Path, port: int, plan: Plan,
                   llm: bool) -> dict[str, Any]:
    """Rewrite the rules (a new revision) and poll /healthz/ready until the gateway serves it,
    while one agent keeps sending requests through the gateway."""
    times: list[float] = []
    lat: list[tuple[float, float]] = []  # (start, latency)
    stop = asyncio.Event()
    client = target.client(scale_agent_id(plan.g_agents - 1))
    op = chat_op(target.base_url)

    async def traffic() -> None:
        while not stop.is_set():
            s = time.perf_counter()
            with contextlib.suppress(Exception):
                await op(client)
            lat.append((s, time.perf_counter() - s))

    task = asyncio.create_task(traffic())
    windows: list[tuple[float, float]] = []
    try:
        async with httpx.AsyncClient(timeout=10) as h:
            ready_url = f"http://127.0.0.1:{proxy.metrics_port}/healthz/ready"
            rev = (await h.get(ready_url)).json()["revision"]
            for i in range(plan.g_reloads):
                await asyncio.sleep(0.5)
                text = scale_policy(port, plan.g_agents, variant=i + 1, llm=llm)
                t0 = time.perf_counter()
                await asyncio.to_thread(write_atomic, path, text)
                while True:
                    try:
                        new = (await h.get(ready_url)).json().get("revision")
                    except httpx.HTTPError:
                        new = rev
                    if new != rev:
                        break
                    if time.perf_counter() - t0 > 120:
                        raise BenchError("reload did not happen within 120 s")
                    await asyncio.sleep(0.02)  # polling harder would steal the gateway's GIL
                t1 = time.perf_counter()
                times.append(t1 - t0)
                windows.append((t0, t1))
                rev = new
            await asyncio.sleep(0.3)
    finally:
        stop.set()
        await task
        await client.aclose()
    during = [d for s, d in lat if any(a - 0.1 <= s <= z for a, z in windows)]
    outside = [d for s, d in lat if not any(a - 0.1 <= s <= z + 0.3 for a, z in windows)]
    return {"n": len(times), "p50_ms": ms(statistics.median(times)), "max_ms": ms(max(times)),
            "runs_ms": [ms(x) for x in times],
            "request_max_ms_during_reload": ms(max(during)) if during else None,
            "request_p50_ms_outside_reload": ms(pct(outside, 50)) if outside else None}


# -- (d) kill switch ---------------------------------------------------------------------------

# The gate-cost targets of (d): the same fleetgate gateway, its load agents carrying sessions
# (children of one coordinator session, so every verdict also walks the session graph), with no
# kill-switch action in force and with ``d_gate_actions`` stops that reach none of them.
GATE_NONE = "fleetgate-no-stops"
GATE_STOPS = "fleetgate-stops"
GATE_COORD = "gate-coordinator"
GATE_COORD_SESSION = "gate-coordinator-session"
# The kinds of those stops, in turn: what an operator stops (a session family most often, an
# agent, a leaked token, a role); values that name nobody the load has.
IDLE_SCOPES: tuple[tuple[str, bool], ...] = (("session", True), ("session", True), ("agent", False),
                                             ("token", False), ("role", False))


def _idle_scopes(n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        kind, cascade = IDLE_SCOPES[i % len(IDLE_SCOPES)]
        out.append({"kind": kind, "value": f"idle-{kind}-{i:03d}", "cascade": cascade})
    return out


class _Admin:
    """The gateway's admin API (its own listener, the bearer token), as an operator's CLI
    calls it. Any answer but 200 fails the scenario: a stop that was not applied measured
    nothing."""

    def __init__(self, b: Bench, name: str = "fleetgate") -> None:
        port = b.proxies[name].admin_port
        if not port or not b.admin_token:
            raise BenchError("this fleetgate tree has no kill-switch admin API (fleetgate_admin_listen)")
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30, trust_env=False,
                                      headers={"Authorization": f"Bearer {b.admin_token}"})

    async def __aenter__(self) -> _Admin:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.http.aclose()

    async def get(self, path: str) -> dict[str, Any]:
        r = await self.http.get(path)
        if r.status_code != 200:
            raise BenchError(f"admin API GET {path}: HTTP {r.status_code}: {r.text[:300]}")
        return dict(r.json())

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = await self.http.post(path, json=body)
        if r.status_code != 200:
            raise BenchError(f"admin API POST {path}: HTTP {r.status_code}: {r.text[:300]}")
        return dict(r.json())


def _session_target(b: Bench, name: str, claims: Callable[[str], dict[str, str]]) -> Target:
    """The fleetgate gateway, reached by agents whose tokens carry session claims
    (``session_id``, ``parent_session``): ``claims`` gives them for an agent id."""
    fg = b.targets["fleetgate"]
    return Target(name, fg.base_url, fg.verify, fg.proxy_port, fg.pid,
                  lambda agent: b.mint(agent, **claims(agent)))


@dataclass
class _Held:
    """One agent's open SSE stream in (d): how many events arrived, when and how it ended."""

    agent: str
    family: bool  # in the stopped session family (must be cut) or a bystander (must not)
    client: httpx.AsyncClient
    events: int = 0
    events_at_kill: int = 0
    ended_at: float | None = None
    end: str | None = None


async def _hold(h: _Held, url: str) -> None:
    """Read the stream until it ends and note the moment the client sees that: the read
    error of a cut connection, taken before the response is closed."""
    tail = b""
    try:
        async with h.client.stream("POST", url, content=STREAM_BODY, headers=SSE_HEADERS) as r:
            if r.status_code != 200:
                await r.aread()
                h.ended_at, h.end = time.perf_counter(), f"HTTP {r.status_code}: {r.text[:200]}"
                return
            try:
                async for chunk in r.aiter_raw():
                    data = tail + chunk
                    n = data.count(b"\n\n")
                    h.events += n
                    tail = data[data.rfind(b"\n\n") + 2:] if n else data
            except Exception as exc:
                h.ended_at, h.end = time.perf_counter(), f"{type(exc).__name__}: {exc}"
                return
            h.ended_at, h.end = time.perf_counter(), "finished"
    except Exception as exc:
        if h.ended_at is None:
            h.ended_at, h.end = time.perf_counter(), f"{type(exc).__name__}: {exc}"


async def _kill_round(b: Bench, plan: Plan, admin: _Admin, r: int) -> dict[str, Any]:
    """One round of (d): fresh sessions, ``d_streams`` family streams and ``d_bystanders``
    unrelated ones open and flowing, then a cascade stop of the family's coordinator session;
    each family stream's command-to-cut as its client sees it, the gateway's own figure, the
    check (every family stream cut, no bystander), then the stop lifted (unrevoke)."""
    tag = f"kill{r}"
    lead, lead_session = f"{tag}-coordinator", f"{tag}-coordinator-session"
    other_lead, other_session = f"{tag}-other-coordinator", f"{tag}-other-coordinator-session"
    family = [f"{tag}-agent-{i:03d}" for i in range(plan.d_streams)]
    others = [f"{tag}-bystander-{i:02d}" for i in range(plan.d_bystanders)]
    claims: dict[str, dict[str, str]] = {lead: {"session_id": lead_session},
                                         other_lead: {"session_id": other_session}}
    claims.update({a: {"session_id": f"{a}-session", "parent_session": lead_session} for a in family})
    claims.update({a: {"session_id": f"{a}-session", "parent_session": other_session} for a in others})
    t = _session_target(b, "fleetgate", claims.__getitem__)
    # Both coordinators call once first, so the graph's roots are real sessions (a child's
    # parent claim on an unseen session would only make a placeholder).
    for agent in (lead, other_lead):
        async with t.client(agent) as c:
            await chat_op(t.base_url)(c)
    url = f"{t.base_url}{CHAT_PATH}?events={plan.d_events}&interval_ms={plan.d_interval_ms:g}"
    held = [_Held(a, True, t.client(a)) for a in family] + [_Held(a, False, t.client(a)) for a in others]
    scope = {"kind": "session", "value": lead_session, "cascade": True}
    t_open = time.perf_counter()
    tasks = [asyncio.create_task(_hold(h, url)) for h in held]
    try:
        while not all(h.events >= 2 for h in held):
            early = next((h for h in held if h.ended_at is not None), None)
            if early is not None:
                raise BenchError(f"(d) round {r}: a stream ended before the kill: {early.agent}: {early.end}")
            if time.perf_counter() - t_open > 60:
                n = sum(h.events >= 2 for h in held)
                raise BenchError(f"(d) round {r}: only {n} of {len(held)} streams flowing after 60 s")
            await asyncio.sleep(0.05)
        open_s = time.perf_counter() - t_open
        await asyncio.sleep(0.3)  # all in their steady state: an event every interval
        # The admin API's own round trip under the same load (it too hops onto the proxy's
        # event loop): what of the command-to-cut time is the API rather than the cutting.
        s0 = time.perf_counter()
        graph = (await admin.get("/v1/status")).get("sessions")
        status_s = time.perf_counter() - s0
        await asyncio.sleep(0.1)
        for h in held:
            h.events_at_kill = h.events
        t0 = time.perf_counter()
        answer = await admin.post("/v1/actions", {"verb": "stop", "scope": scope, "by": "bench",
                                                  "reason": f"bench (d) round {r}"})
        answered = time.perf_counter() - t0
        fam_tasks = [task for task, h in zip(tasks, held, strict=True) if h.family]
        await asyncio.wait(fam_tasks, timeout=plan.d_cut_timeout)
        await asyncio.sleep(plan.d_observe)  # the bystanders must go on streaming meanwhile
        bystanders = [(h.ended_at is not None, h.events - h.events_at_kill, h.end) for h in held
                      if not h.family]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all([h.client for h in held])
    lifted = await admin.post("/v1/lift", {"action": "unrevoke", "scope": scope, "by": "bench",
                                           "reason": f"bench (d) round {r} done"})
    async with t.client(family[0]) as c:  # lifted: the family works again
        after = await c.post(t.base_url + CHAT_PATH, content=CHAT_BODY, headers={
            "content-type": "application/json"})

    fam = [h for h in held if h.family]
    cut = [h for h in fam if h.ended_at is not None and h.ended_at >= t0 and h.end != "finished"]
    lat = [h.ended_at - t0 for h in cut if h.ended_at is not None]
    flows = [c for c in answer.get("cut") or [] if c.get("method")]
    tunnels = [c for c in answer.get("cut") or [] if not c.get("method")]
    flow_agents = {str(c.get("agent")) for c in flows}
    min_events = max(2, int(plan.d_observe * 1000 / plan.d_interval_ms / 4))
    problems = []
    if len(cut) != len(fam):
        missed = [f"{h.agent} ({h.end or 'still streaming'})" for h in fam if h not in cut]
        problems.append(f"{len(fam) - len(cut)} of {len(fam)} family streams not cut: {missed[:3]}")
    if any(ended for ended, _, _ in bystanders):
        gone = [e for ended, _, e in bystanders if ended]
        problems.append(f"{len(gone)} of {len(bystanders)} bystander streams ended: {gone[:3]}")
    slow = sum(1 for ended, n, _ in bystanders if not ended and n < min_events)
    if slow:
        problems.append(f"{slow} bystander streams got fewer than {min_events} events in the "
                        f"{plan.d_observe:g} s after the kill")
    if flow_agents != set(family):
        problems.append(f"the gateway cut flows of {len(flow_agents - set(family))} agents outside the "
                        f"family and missed {len(set(family) - flow_agents)} of it")
    if len(answer.get("descendants") or []) != len(family) or answer.get("sessions") != [lead_session]:
        problems.append(f"the stop reached sessions {answer.get('sessions')} and "
                        f"{len(answer.get('descendants') or [])} descendants, expected [{lead_session}] "
                        f"and {len(family)}")
    if len(lifted.get("lifted") or []) != 1 or after.status_code != 200:
        problems.append(f"unrevoke lifted {len(lifted.get('lifted') or [])} action(s); a family agent's "
                        f"next request then got HTTP {after.status_code}")
    ends: dict[str, int] = {}
    for h in cut:
        k = (h.end or "").split(":", 1)[0]
        ends[k] = ends.get(k, 0) + 1
    return {
        "round": r, "coordinator_session": lead_session, "streams": len(fam), "bystanders": len(bystanders),
        "open_s": round(open_s, 2), "events_before_kill_min": min(h.events_at_kill for h in held),
        "graph_sessions": graph, "admin_status_ms": ms(status_s), "command_answered_ms": ms(answered),
        "gateway_cut_ms": answer.get("cut_ms"),
        "gateway_flows_cut": len(flows), "gateway_tunnels_closed": len(tunnels),
        "descendants": len(answer.get("descendants") or []),
        "client_cut_min_ms": ms(min(lat)) if lat else None,
        "client_cut_p50_ms": ms(pct(lat, 50)), "client_cut_p95_ms": ms(pct(lat, 95)),
        "client_cut_max_ms": ms(max(lat)) if lat else None,
        "client_cut_ms": sorted(ms(x) for x in lat), "client_saw": ends,
        "cut_seen_before_the_answer": sum(1 for x in lat if x < answered),
        "family_cut": len(cut), "bystanders_cut": sum(1 for ended, _, _ in bystanders if ended),
        "bystander_events_after_kill_min": min((n for _, n, _ in bystanders), default=None),
        "lifted": len(lifted.get("lifted") or []), "after_lift_status": after.status_code,
        "ok": not problems, "problems": problems,
    }


def _gate_in_process(n_actions: int, calls: int) -> dict[str, Any]:
    """In-process: what the kill switch's gate does for every request of an agent with a
    session (record it in the session graph, then ask the board for a verdict, which looks at
    every action in force and, for a cascading one, the session's ancestors), with no action in
    force and with ``n_actions`` stops that reach nobody. This thread's CPU time, best of
    :data:`LIMITER_BATCHES` batches as for (a)'s limiter: the gateway difference is within a
    round's noise, this is not."""
    from fleetgate.kill.core import KillCore
    from fleetgate.kill.model import Action, Scope, Subject, Verb
    from fleetgate.stores.kill import SqliteKillStore

    core = KillCore(SqliteKillStore(None), time.time)
    exp = time.time() + 3600
    core.observe(Subject(agent=GATE_COORD, session=GATE_COORD_SESSION, role=BENCH_ROLE), None, exp)
    subjects = [Subject(agent=f"bench-agent-{i:04d}", session=f"bench-agent-{i:04d}-session",
                        role=BENCH_ROLE, jti=f"{i:032x}") for i in range(16)]
    for s in subjects:
        core.observe(s, GATE_COORD_SESSION, exp)

    def timed() -> dict[str, Any]:
        batches: list[list[float]] = []
        for k in range(LIMITER_BATCHES + 1):  # batch 0 warms up: not counted
            times: list[float] = []
            for i in range(max(1, calls // LIMITER_BATCHES)):
                s = subjects[i % len(subjects)]
                t0 = time.thread_time_ns()
                core.observe(s, GATE_COORD_SESSION, exp)
                v = core.verdict(s)
                times.append((time.thread_time_ns() - t0) / 1000)
                if v is not None:
                    raise BenchError(f"in-process, an idle stop reached {s}: {v}")
            if k:
                batches.append(times)
        best = min(batches, key=lambda t: pct(t, 50))
        return {"us_p50": round(pct(best, 50), 2), "us_p99": round(pct(best, 99), 2),
                "batch_p50s_us": [round(pct(t, 50), 2) for t in batches]}

    none = timed()
    for sc in _idle_scopes(n_actions):
        core.apply(Action(Verb.STOP, Scope.from_json(sc), "bench (d): reaches nobody", by="bench"))
    stops = timed()
    return {"calls": calls, "batches": LIMITER_BATCHES, "actions": n_actions, "none": none,
            "stops": stops, "cost_us_p50": round(stops["us_p50"] - none["us_p50"], 2)}


async def _gate_cost(b: Bench, plan: Plan, admin: _Admin) -> dict[str, Any]:
    """What the kill switch's gate costs per request while stops are in force: bare mitmdump,
    fleetgate with none and fleetgate with ``d_gate_actions`` stops that match none of the load
    (each request is judged against all of them and passes), interleaved as in (a). The stops
    are applied through the admin API before each of that target's slices and lifted after,
    off the clock, so both fleetgate targets are the same process with the same agents."""
    def claims(agent: str) -> dict[str, str]:
        if agent == GATE_COORD:
            return {"session_id": GATE_COORD_SESSION}
        return {"session_id": f"{agent}-session", "parent_session": GATE_COORD_SESSION}

    scopes = _idle_scopes(plan.d_gate_actions)
    in_force: list[int] = []
    after_lift: list[int] = []
    apply_s: list[float] = []
    lift_s: list[float] = []

    @contextlib.asynccontextmanager
    async def stops(name: str) -> AsyncIterator[None]:
        if name == GATE_STOPS:
            t0 = time.perf_counter()
            for sc in scopes:
                await admin.post("/v1/actions", {"verb": "stop", "scope": sc, "by": "bench",
                                                 "reason": "bench (d): a stop that reaches no load agent"})
            apply_s.append(time.perf_counter() - t0)
            in_force.append(len((await admin.get("/v1/status")).get("actions") or []))
        try:
            yield
        finally:
            if name == GATE_STOPS:
                t0 = time.perf_counter()
                for sc in scopes:
                    await admin.post("/v1/lift", {"action": "unrevoke", "scope": sc, "by": "bench"})
                lift_s.append(time.perf_counter() - t0)
                after_lift.append(len((await admin.get("/v1/status")).get("actions") or []))

    for name in (GATE_NONE, GATE_STOPS):
        b.targets[name] = _session_target(b, name, claims)
    names = ["bare", GATE_NONE, GATE_STOPS]
    slices: dict[str, list[Run]] = {}
    try:
        async with b.targets[GATE_NONE].client(GATE_COORD) as c:  # the load's parent session, seen
            await chat_op(b.base_url)(c)
        # What the verdicts are judged against besides the actions: the session graph (in a
        # full run it holds the kill rounds' sessions too). Recorded, as the gate's
        # housekeeping grows with sessions x actions.
        sessions = (await admin.get("/v1/status")).get("sessions")
        runs = await interleaved(b, names, plan.d_gate_agents, lambda t: chat_op(t.base_url),
                                 plan.d_gate_warmup, plan.d_gate_rounds, plan.d_gate_slice, slices, stops)
    finally:
        for name in (GATE_NONE, GATE_STOPS):
            b.targets.pop(name, None)
    out: dict[str, Any] = {
        "agents": plan.d_gate_agents, "actions": plan.d_gate_actions,
        "action_scopes": {f"{k}{'+descendants' if c else ''}": sum(
            1 for s in scopes if s["kind"] == k and s["cascade"] == c)
            for k, c in dict.fromkeys(IDLE_SCOPES)},
        "load_sessions": f"each agent its own session, a child of {GATE_COORD_SESSION}",
        "graph_sessions": sessions,
        "apply_all_s": [round(x, 3) for x in apply_s], "lift_all_s": [round(x, 3) for x in lift_s],
        "actions_in_force_per_slice": in_force, "actions_after_lift": after_lift,
        "targets": {n: summary(run) for n, run in runs.items()},
    }
    none, with_stops, bare = (out["targets"][n].get("proxy_cpu_ms_per_req") for n in names[1:] + names[:1])
    if none and with_stops:
        rounds = [(x.summary().get("proxy_cpu_ms_per_req"), y.summary().get("proxy_cpu_ms_per_req"))
                  for x, y in zip(slices.get(GATE_STOPS, []), slices.get(GATE_NONE, []), strict=False)]
        out["cost"] = {
            "proxy_cpu_ms_per_req": round(with_stops - none, 3),
            "per_round_ms": [round(x - y, 3) for x, y in rounds if x and y],
            "pct_of_fleetgate": round((with_stops - none) / none * 100, 1),
            "pct_of_bare": round((with_stops - none) / bare * 100, 1) if bare else None}
    try:
        out["in_process"] = await asyncio.to_thread(_gate_in_process, plan.d_gate_actions, plan.d_gate_calls)
    except Exception as exc:  # a cross-check only: the gateway figures stand without it
        out["in_process"] = {"error": f"{type(exc).__name__}: {exc}"}
    problems = []
    if any(n != plan.d_gate_actions for n in in_force) or any(after_lift):
        problems.append(f"stops in force per slice {in_force} (expected {plan.d_gate_actions}), "
                        f"after lifting {after_lift} (expected 0)")
    problems += reuse_problems(runs, plan.d_gate_agents, "gate")
    errs = {n: s.get("errors") for n, s in out["targets"].items() if s.get("errors")}
    if errs:
        problems.append(f"requests failed (an idle stop refused a load agent?): {errs}; first: "
                        f"{next(s.get('first_error') for s in out['targets'].values() if s.get('errors'))}")
    out["ok"], out["problems"] = not problems, problems
    return out


async def scenario_d(b: Bench, plan: Plan) -> dict[str, Any]:
    """The kill switch: command to cut of every in-flight stream of a session family (its
    coordinator stopped with cascade), bystanders untouched; and what the gate costs per
    request while stops are in force."""
    out: dict[str, Any] = {
        "streams": plan.d_streams, "bystanders": plan.d_bystanders, "rounds": plan.d_rounds,
        "events": plan.d_events, "interval_ms": plan.d_interval_ms,
        "stream_seconds": round(plan.d_events * plan.d_interval_ms / 1000),
        "command": "POST /v1/actions {verb: stop, scope: {kind: session, value: <coordinator session>, "
                   "cascade: true}} on the admin API",
        "family": f"{plan.d_streams} agents, each its own session, each a child (parent_session) of one "
                  "coordinator session; bystanders: children of another coordinator session",
        "per_round": [],
    }
    async with _Admin(b) as admin:
        for r in range(plan.d_rounds):
            out["per_round"].append(await _kill_round(b, plan, admin, r))
            await asyncio.sleep(0.5)
        rounds = out["per_round"]
        lat = [x for rd in rounds for x in rd["client_cut_ms"]]
        cut_ms = [rd["gateway_cut_ms"] for rd in rounds if rd.get("gateway_cut_ms") is not None]
        answered = [rd["command_answered_ms"] for rd in rounds]
        out["client_cut_ms"] = {"n": len(lat), "p50": round(pct(lat, 50), 3), "p95": round(pct(lat, 95), 3),
                                "max": max(lat) if lat else None}
        out["last_cut_ms_per_round"] = [rd["client_cut_max_ms"] for rd in rounds]
        out["gateway_cut_ms"] = {"per_round": cut_ms, "p50": round(statistics.median(cut_ms), 3) if cut_ms
                                 else None, "max": max(cut_ms) if cut_ms else None}
        out["command_answered_ms"] = {"per_round": answered, "p50": round(statistics.median(answered), 3),
                                      "max": max(answered)}
        status = [rd["admin_status_ms"] for rd in rounds]
        out["admin_status_ms"] = {"per_round": status, "p50": round(statistics.median(status), 3)}
        out["gate"] = await _gate_cost(b, plan, admin)
    problems = [f"round {rd['round']}: {p}" for rd in rounds for p in rd["problems"]]
    problems += [f"gate: {p}" for p in out["gate"]["problems"]]
    out["check"] = {
        "ok": not problems,
        "family_cut": sum(rd["family_cut"] for rd in rounds),
        "family_total": sum(rd["streams"] for rd in rounds),
        "bystanders_cut": sum(rd["bystanders_cut"] for rd in rounds),
        "bystanders_total": sum(rd["bystanders"] for rd in rounds),
        "problems": problems,
    }
    if problems:
        raise BenchError("(d) check failed: " + "; ".join(problems[:5]), result=out)
    return out


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    run: Callable[[Bench, Plan], Awaitable[dict[str, Any]]]


# Order matters: memory after 10,000 requests first (the proxies have seen only the warm-up),
# the soak last (it takes the longest and wants the proxies in their steady state). (d) comes
# late: it leaves ~600 sessions in fleetgate's graph and kill log, which the scenarios measured
# before the kill switch landed never had.
SCENARIOS: list[Scenario] = [
    Scenario("e_requests", "(e) memory after N small requests", memory_requests),
    Scenario("a", "(a) small non-streaming LLM call", scenario_a),
    Scenario("b", "(b) streaming", scenario_b),
    Scenario("c", "(c) MCP tools/list and tools/call", scenario_c),
    Scenario("e_streams", "(e) memory with concurrent streams", memory_streams),
    Scenario("f", "(f) 50 MB streamed download", scenario_f),
    Scenario("g", "(g) rules scale", scenario_g),
    Scenario("d", "(d) kill switch: command to cut, 100 open streams", scenario_d),
    Scenario("e_soak", "(e) soak", memory_soak),
]

# Scenarios of the issue that arrive with the features they measure: they are listed in the
# report as not measured yet, never faked. Add a Scenario above when the feature lands.
PENDING: list[tuple[str, str]] = []
