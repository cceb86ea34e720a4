"""The load generator: asyncio + one ``httpx.AsyncClient`` per agent.

Each agent is a client with a single keep-alive connection, configured the way an agent pod is
configured by ``HTTPS_PROXY=http://agent:<JWT>@gateway:port``: the proxy URL carries that
agent's own JWT (fleetgate) or no credentials (bare mitmdump), or there is no proxy (direct).
The proxy URL is passed to the client explicitly rather than through the environment because
every agent in this one process has its own token; httpx does the same CONNECT either way.

Timings are ``time.perf_counter()`` around each request, measured by the agent itself. Every
target reaches the upstream by name (``https://localhost:<port>``, ``Target.base_url``); an
agent's client sends request after request on its one connection, so the upstream must see one
connection per agent (``Run.upstream_connections``, checked by ``scenarios.reuse_problems``).
"""

from __future__ import annotations

import asyncio
import math
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from procs import cpu_seconds, mem_kib, rss_mib

CHAT_PATH = "/v1/chat/completions"
CHAT_BODY = (b'{"model":"bench-model","messages":[{"role":"system","content":"You are terse."},'
             b'{"role":"user","content":"Say hello in five words."}],"max_tokens":16}')
STREAM_BODY = (b'{"model":"bench-model","stream":true,"stream_options":{"include_usage":true},'
               b'"messages":[{"role":"user","content":"Count to twenty."}]}')
MCP_PATH = "/mcp"
MCP_LIST_BODY = b'{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}'
MCP_CALL_TOOL = "trivy_describe_image"  # allowed for the bench agents (policy.MCP_ALLOWED_PREFIXES)
MCP_CALL_BODY = (b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"trivy_describe_image",'
                 b'"arguments":{"name":"shop/api:1.4.2","scope":"payments","limit":20}}}')
JSON_HEADERS = {"content-type": "application/json", "accept": "application/json"}
# What an MCP streamable-HTTP client sends: it takes either answer form.
MCP_HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
SSE_HEADERS = {"content-type": "application/json", "accept": "text/event-stream"}


class BenchError(Exception):
    """A scenario failed. ``result``, when given, holds what it measured before its check
    failed: run.py keeps it next to the failure, so a failed check still shows its figures."""

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result


# -- targets ------------------------------------------------------------------------------


@dataclass
class Target:
    """One way to reach the upstream: ``direct``, through ``bare`` mitmdump, or ``fleetgate``."""

    name: str
    base_url: str
    verify: ssl.SSLContext
    proxy_port: int | None = None
    pid: int | None = None  # the proxy's pid, for RSS and CPU
    mint: Callable[[str], str] | None = None  # agent id -> JWT (fleetgate only)
    tokens: dict[str, str] = field(default_factory=dict)

    def token(self, agent: str, fresh: bool = False) -> str | None:
        if self.mint is None:
            return None
        if fresh or agent not in self.tokens:
            self.tokens[agent] = self.mint(agent)
        return self.tokens[agent]

    def proxy_url(self, agent: str, fresh_token: bool = False) -> str | None:
        if self.proxy_port is None:
            return None
        tok = self.token(agent, fresh_token)
        auth = f"agent:{tok}@" if tok else ""
        return f"http://{auth}127.0.0.1:{self.proxy_port}"

    def client(self, agent: str, fresh_token: bool = False, timeout: float = 60) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            proxy=self.proxy_url(agent, fresh_token), verify=self.verify, trust_env=False,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=None))

    def clients(self, n: int, prefix: str = "bench-agent") -> list[httpx.AsyncClient]:
        return [self.client(f"{prefix}-{i:04d}") for i in range(n)]

    def cpu(self) -> float | None:
        return cpu_seconds(self.pid) if self.pid else None


async def close_all(clients: Sequence[httpx.AsyncClient]) -> None:
    await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)


# -- operations ---------------------------------------------------------------------------

Op = Callable[[httpx.AsyncClient], Awaitable[Any]]


def chat_op(base_url: str) -> Op:
    url = base_url + CHAT_PATH

    async def op(c: httpx.AsyncClient) -> None:
        r = await c.post(url, content=CHAT_BODY, headers=JSON_HEADERS)
        if r.status_code != 200 or not r.content.endswith(b"}"):
            raise BenchError(f"chat: HTTP {r.status_code}: {r.text[:300]}")

    return op


def mcp_list_op(base_url: str, tools: int, sse: bool = False) -> Op:
    """MCP ``tools/list``; the answer must carry exactly ``tools`` tools (counted by their
    ``inputSchema`` keys, cheaply: the full parse is done once, in scenario (c)'s probe)."""
    url = base_url + MCP_PATH + ("?sse=1" if sse else "")
    ctype = "text/event-stream" if sse else "application/json"

    async def op(c: httpx.AsyncClient) -> None:
        r = await c.post(url, content=MCP_LIST_BODY, headers=MCP_HEADERS)
        n = r.content.count(b'"inputSchema"')
        if r.status_code != 200 or n != tools or not r.headers.get("content-type", "").startswith(ctype):
            raise BenchError(f"tools/list: HTTP {r.status_code} {r.headers.get('content-type')}, {n} tools, "
                             f"expected {tools}: {r.text[:300]}")

    return op


def mcp_call_op(base_url: str) -> Op:
    """MCP ``tools/call`` of :data:`MCP_CALL_TOOL` (small JSON answer)."""
    url = base_url + MCP_PATH

    async def op(c: httpx.AsyncClient) -> None:
        r = await c.post(url, content=MCP_CALL_BODY, headers=MCP_HEADERS)
        if r.status_code != 200 or b'"result"' not in r.content or b'"error"' in r.content:
            raise BenchError(f"tools/call: HTTP {r.status_code}: {r.text[:300]}")

    return op


def stream_op(base_url: str, events: int, interval_ms: float) -> Callable[[httpx.AsyncClient],
                                                                          Awaitable[tuple[float, float]]]:
    """One SSE chat completion: returns (time to first event, time to ``[DONE]``) in seconds."""
    url = f"{base_url}{CHAT_PATH}?events={events}&interval_ms={interval_ms:g}"
    want = events + 2  # the chunks, the usage chunk, [DONE]

    async def op(c: httpx.AsyncClient) -> tuple[float, float]:
        t0 = time.perf_counter()
        first = None
        seen = 0
        tail = b""
        async with c.stream("POST", url, content=STREAM_BODY, headers=SSE_HEADERS) as r:
            if r.status_code != 200:
                await r.aread()
                raise BenchError(f"stream: HTTP {r.status_code}: {r.text[:300]}")
            async for chunk in r.aiter_raw():
                data = tail + chunk
                n = data.count(b"\n\n")
                if n and first is None:
                    first = time.perf_counter() - t0
                seen += n
                tail = data[data.rfind(b"\n\n") + 2:] if n else data
        last = time.perf_counter() - t0
        if seen != want or first is None:
            raise BenchError(f"stream: got {seen} events, expected {want}")
        return first, last

    return op


def download_op(base_url: str, size: int) -> Callable[[httpx.AsyncClient], Awaitable[int]]:
    url = f"{base_url}/download/{size}"

    async def op(c: httpx.AsyncClient) -> int:
        n = 0
        async with c.stream("GET", url) as r:
            if r.status_code != 200:
                await r.aread()
                raise BenchError(f"download: HTTP {r.status_code}: {r.text[:300]}")
            async for chunk in r.aiter_raw():
                n += len(chunk)
        if n != size:
            raise BenchError(f"download: got {n} bytes, expected {size}")
        return n

    return op


# -- statistics ---------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear interpolation between closest ranks."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


@dataclass
class Run:
    """What a closed-loop run measured."""

    latencies: list[float] = field(default_factory=list)
    extra: list[Any] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    elapsed: float = 0.0
    proxy_cpu: float | None = None
    driver_cpu: float = 0.0
    # What the upstream saw of this target (scenarios.interleaved, warm-up included): TLS
    # connections it accepted and requests it served. With keep-alive working, one connection
    # per agent however many requests; a proxy that stops reusing connections shows here.
    upstream_connections: int | None = None
    upstream_requests: int | None = None

    def merge(self, other: Run) -> None:
        self.latencies += other.latencies
        self.extra += other.extra
        self.errors += other.errors
        self.first_error = self.first_error or other.first_error
        self.elapsed += other.elapsed
        if other.proxy_cpu is not None:
            self.proxy_cpu = (self.proxy_cpu or 0.0) + other.proxy_cpu
        self.driver_cpu += other.driver_cpu

    def summary(self) -> dict[str, Any]:
        n = len(self.latencies)
        out: dict[str, Any] = {
            "requests": n, "errors": self.errors, "seconds": round(self.elapsed, 3),
            "rps": round(n / self.elapsed, 1) if self.elapsed else None,
            "p50_ms": ms(pct(self.latencies, 50)), "p90_ms": ms(pct(self.latencies, 90)),
            "p99_ms": ms(pct(self.latencies, 99)),
            "mean_ms": ms(sum(self.latencies) / n) if n else None,
            "driver_cpu_ms_per_req": round(self.driver_cpu * 1000 / n, 3) if n else None,
        }
        if self.proxy_cpu is not None and n:
            out["proxy_cpu_ms_per_req"] = round(self.proxy_cpu * 1000 / n, 3)
            out["proxy_cpu_util"] = round(self.proxy_cpu / self.elapsed, 3) if self.elapsed else None
        if self.upstream_connections is not None:
            out["upstream_connections"] = self.upstream_connections
            out["upstream_requests"] = self.upstream_requests
        if self.first_error:
            out["first_error"] = self.first_error
        return out


async def closed_loop(clients: Sequence[httpx.AsyncClient], op: Op, *, duration: float | None = None,
                      count: int | None = None, pid: int | None = None) -> Run:
    """Every client sends its next request as soon as the previous one is answered, for
    ``duration`` seconds or until ``count`` requests were sent in all."""
    run = Run()
    remaining = count if count is not None else -1
    cpu0 = cpu_seconds(pid) if pid else None
    d0 = time.process_time()
    t0 = time.perf_counter()
    deadline = t0 + duration if duration is not None else math.inf

    async def worker(c: httpx.AsyncClient) -> None:
        nonlocal remaining
        while True:
            if count is not None:
                if remaining <= 0:
                    return
                remaining -= 1
            elif time.perf_counter() >= deadline:
                return
            s = time.perf_counter()
            try:
                result = await op(c)
            except Exception as exc:  # recorded, the run goes on
                run.errors += 1
                run.first_error = run.first_error or f"{type(exc).__name__}: {exc}"
                if run.errors > 50 and run.errors > len(run.latencies):
                    raise BenchError(f"too many errors; first: {run.first_error}") from exc
                continue
            run.latencies.append(time.perf_counter() - s)
            if result is not None:
                run.extra.append(result)

    await asyncio.gather(*(worker(c) for c in clients))
    run.elapsed = time.perf_counter() - t0
    run.driver_cpu = time.process_time() - d0
    if pid and cpu0 is not None:
        run.proxy_cpu = cpu_seconds(pid) - cpu0
    return run


# -- memory sampling ------------------------------------------------------------------------


class RssSampler:
    """Samples a process's RSS every ``every`` seconds in the background."""

    def __init__(self, pid: int, every: float) -> None:
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, float]] = []
        self._task: asyncio.Task[None] | None = None
        self.t0 = time.perf_counter()

    async def _loop(self) -> None:
        while True:
            self.samples.append((time.perf_counter() - self.t0, rss_mib(self.pid)))
            await asyncio.sleep(self.every)

    def __enter__(self) -> RssSampler:
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._task:
            self._task.cancel()
        self.samples.append((time.perf_counter() - self.t0, rss_mib(self.pid)))

    @property
    def peak(self) -> float:
        return max(v for _, v in self.samples)


def mem(pid: int) -> dict[str, float]:
    m = mem_kib(pid)
    return {"rss_mib": round(m["VmRSS"] / 1024, 1), "hwm_mib": round(m["VmHWM"] / 1024, 1)}


# -- the soak -----------------------------------------------------------------------------


@dataclass
class SoakPlan:
    agents: int
    rate_per_agent: float  # requests per second
    warmup: float
    duration: float
    sample_every: float
    reconnect_every: float  # seconds an agent keeps its connection (fleetgate: and its token)


async def soak(target: Target, plan: SoakPlan) -> dict[str, Any]:
    """Paced mixed load on one proxy while its RSS is sampled: mostly small chat calls, an SSE
    stream every 25th request, a request the rules deny every 50th (bare: a 404), an MCP
    tools/list (~385 KB, 1,000 tools; fleetgate filters it to the agent's 120) every 100th;
    each agent reconnects (new tunnel, fleetgate: new JWT) every ``reconnect_every`` seconds,
    so per-connection state is created and dropped."""
    assert target.pid
    chat = chat_op(target.base_url)
    stream = stream_op(target.base_url, 5, 5)
    deny_url = target.base_url + "/admin/delete-everything"
    mcp_url = target.base_url + MCP_PATH
    lat: list[float] = []
    counts = {"requests": 0, "errors": 0, "reconnects": 0, "streams": 0, "denied": 0, "mcp": 0}
    first_error: list[str] = []
    t_start = time.perf_counter()
    t_measure = t_start + plan.warmup
    t_end = t_measure + plan.duration
    samples: list[tuple[float, float]] = []

    async def sampler() -> None:
        await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
        while True:
            now = time.perf_counter()
            samples.append((round(now - t_measure, 2), round(rss_mib(target.pid or 0), 2)))
            if now >= t_end:
                return
            await asyncio.sleep(min(plan.sample_every, max(0.0, t_end - now)) or plan.sample_every)

    async def agent(i: int) -> None:
        name = f"soak-{i:03d}"
        client = target.client(name)
        connected = time.perf_counter()
        interval = 1.0 / plan.rate_per_agent
        nxt = time.perf_counter() + interval * i / plan.agents
        k = 0
        try:
            while True:
                now = time.perf_counter()
                if now >= t_end:
                    return
                if now < nxt:
                    await asyncio.sleep(nxt - now)
                nxt += interval
                if time.perf_counter() - nxt > 1.0:
                    nxt = time.perf_counter()  # fell behind: no catch-up burst
                if time.perf_counter() - connected > plan.reconnect_every:
                    await client.aclose()
                    client = target.client(name, fresh_token=True)
                    connected = time.perf_counter()
                    counts["reconnects"] += 1
                k += 1
                s = time.perf_counter()
                try:
                    if k % 25 == 0:
                        await stream(client)
                        counts["streams"] += 1
                    elif k % 50 == 13:
                        r = await client.get(deny_url)
                        if r.status_code not in (403, 404):
                            raise BenchError(f"deny probe: HTTP {r.status_code}")
                        counts["denied"] += 1
                    elif k % 100 == 37:
                        r = await client.post(mcp_url, content=MCP_LIST_BODY, headers=JSON_HEADERS)
                        if r.status_code != 200 or r.content.count(b'"inputSchema"') < 100:
                            raise BenchError(f"mcp: HTTP {r.status_code}: {r.text[:300]}")
                        counts["mcp"] += 1
                    else:
                        await chat(client)
                        if s >= t_measure:
                            lat.append(time.perf_counter() - s)
                    counts["requests"] += 1
                except Exception as exc:
                    counts["errors"] += 1
                    if not first_error:
                        first_error.append(f"{type(exc).__name__}: {exc}")
                    await client.aclose()
                    client = target.client(name, fresh_token=True)
                    connected = time.perf_counter()
        finally:
            await client.aclose()

    cpu0 = cpu_seconds(target.pid)
    await asyncio.gather(sampler(), *(agent(i) for i in range(plan.agents)))
    out: dict[str, Any] = {
        **counts,
        "seconds": round(time.perf_counter() - t_start, 1),
        "proxy_cpu_s": round(cpu_seconds(target.pid) - cpu0, 2),
        "chat_p50_ms": ms(pct(lat, 50)), "chat_p99_ms": ms(pct(lat, 99)),
        "samples": samples,
    }
    if first_error:
        out["first_error"] = first_error[0]
    window = min(60.0, plan.duration / 3)
    first = [v for t, v in samples if t <= window]
    last = [v for t, v in samples if t >= plan.duration - window]
    if first and last:
        out["window_s"] = round(window, 1)
        out["first_window_mib"] = round(sum(first) / len(first), 2)
        out["last_window_mib"] = round(sum(last) / len(last), 2)
        out["growth_mib"] = round(out["last_window_mib"] - out["first_window_mib"], 2)
    out.update(mem(target.pid))
    return out
