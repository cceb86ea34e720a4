"""Bring the benchmark up: certificates, tokens, the upstream and the three proxies."""

from __future__ import annotations

import contextlib
import os
import platform
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import trustme
from driver import Target
from policy import (
    BENCH_ROLE,
    UPSTREAM_HOST,
    small_policy,
    supports_limits_section,
    supports_llm_section,
    supports_mcp_section,
)
from procs import (
    GATEWAY_SCRIPT,
    REPO,
    Proxy,
    Upstream,
    launch_proxy,
    proxy_argv,
    start_upstream,
)

# The options every mitmdump gets. stream_large_bodies=1m: bodies over 1 MiB (or of unknown
# length once 1 MiB has arrived) stream, so bare mitmdump does not buffer the 50 MB download
# either; fleetgate's own default (fleetgate_stream_min_bytes) is the same 1 MiB.
COMMON = {"stream_large_bodies": "1m"}
# bare-sse: the same bare mitmdump but streaming every body. Bare mitmdump buffers a whole
# SSE response (it has no notion of event streams; only fleetgate's StreamPassthrough streams
# them), so this is the honest "mitmproxy with no addons" reference for time to first event.
BARE_SSE = {"stream_large_bodies": "1"}
NOLLM = "fleetgate-nollm"
LIMITED = "fleetgate-limits"


@dataclass
class Bench:
    """Everything a scenario needs."""

    workdir: Path
    upstream_ca: Path
    confdir: Path
    secret: bytes
    upstream: Upstream
    rules: Path
    proxies: dict[str, Proxy]
    targets: dict[str, Target]
    proxy_verify: ssl.SSLContext
    direct_verify: ssl.SSLContext
    fleetgate_options: dict[str, str] = field(default_factory=dict)
    llm: bool = False  # the rules route the upstream as an LLM provider (tree supports `llm:`)
    mcp: bool = False  # the rules declare the upstream's /mcp an MCP server (tree supports `mcp:`)
    limits: bool = False  # LIMITED runs (the tree supports a profile's `policies: {localRateLimit}`)
    admin_token: str | None = None  # the gateways' admin API token (the tree has the kill switch)

    @property
    def base_url(self) -> str:
        """The upstream by name (``policy.UPSTREAM_HOST``), for every target alike."""
        return f"https://{UPSTREAM_HOST}:{self.upstream.port}"

    def mint(self, agent: str, **claims: Any) -> str:
        from fleetgate.identity.mint import mint_token

        return str(mint_token(self.secret, agent, 4 * 3600,
                              {"agent_role": BENCH_ROLE, "agent_id": agent, **claims}))

    def fleetgate_argv(self, rules: Path, decision_log: Path, **extra: str) -> list[str]:
        opts = {**COMMON, **self.fleetgate_options, "fleetgate_rules": str(rules),
                "fleetgate_decision_log": str(decision_log), **extra}
        if self.admin_token:
            # Durable kill-switch state (SQLite: actions, session graph, kill log), as in
            # production (`fleetgate run` keeps it in state/): a stop and its cuts are written
            # before the admin API answers, so (d) measures that too. One per gateway.
            opts.setdefault("fleetgate_state_dir", str(decision_log.parent / "state"))
        return proxy_argv(self.confdir, self.upstream_ca, opts, GATEWAY_SCRIPT)


def supports_admin_api() -> bool:
    """Whether this fleetgate tree has the kill switch and its admin API listener
    (``fleetgate_admin_listen``). It defaults to the fixed port 127.0.0.1:15021, so every
    gateway of the run must be given its own port, or the second one to start exits."""
    import importlib.util

    return importlib.util.find_spec("fleetgate.addons.killswitch") is not None


class ResolverError(RuntimeError):
    """The system resolver does not map the upstream's name to 127.0.0.1 alone."""


def check_upstream_name(port: int = 443) -> list[str]:
    """The addresses :data:`policy.UPSTREAM_HOST` resolves to, as fleetgate resolves a name
    (``getaddrinfo(host, port, type=SOCK_STREAM)``, in the resolver's order); raises unless
    that is 127.0.0.1 and nothing else.

    The upstream listens on 127.0.0.1 only and the rules admit only 127.0.0.1/32 as a private
    destination. Where ``localhost`` also (or first) means ``::1``, fleetgate judges every
    address and refuses ``::1``, and bare mitmdump dials ``::1`` first and falls back: the run
    would measure refusals and connection fallbacks, not the proxies. Better to stop and say
    so than to publish such figures."""
    try:
        infos = socket.getaddrinfo(UPSTREAM_HOST, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ResolverError(f"bench: cannot resolve {UPSTREAM_HOST!r}: {exc}") from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if addresses != ["127.0.0.1"]:
        first = f"first {addresses[0]}, " if addresses and addresses[0] != "127.0.0.1" else ""
        raise ResolverError(
            f"bench: this machine resolves {UPSTREAM_HOST!r} to {addresses} ({first}not 127.0.0.1 alone). "
            "The bench reaches its upstream by that name through every target; its upstream listens on "
            "127.0.0.1 only and its rules admit only 127.0.0.1/32, so fleetgate would dial (and refuse) "
            f"{addresses[0] if addresses else 'nothing'} and bare mitmdump would try it first: the figures "
            f"would not be the proxies'. Map {UPSTREAM_HOST} to 127.0.0.1 only (/etc/hosts: "
            f"'127.0.0.1 {UPSTREAM_HOST}', and no '::1 {UPSTREAM_HOST}' line) and run again.")
    return addresses


def make_certs(workdir: Path) -> tuple[Path, Path, Path]:
    ca = trustme.CA()
    leaf = ca.issue_cert(*dict.fromkeys((UPSTREAM_HOST, "127.0.0.1", "localhost")))
    ca_pem = workdir / "upstream-ca.pem"
    cert, key = workdir / "upstream-cert.pem", workdir / "upstream-key.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    with open(cert, "wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    leaf.private_key_pem.write_to_path(str(key))
    return ca_pem, cert, key


def bring_up(workdir: Path) -> Bench:
    from fleetgate.cli import ca_init

    check_upstream_name()  # before anything starts: a wrong resolver fails the run up front
    ca_pem, cert, key = make_certs(workdir)
    confdir = workdir / "confdir"
    confdir.mkdir()
    mitm_ca = ca_init(confdir, quiet=True)
    secret = secrets.token_hex(32).encode()
    secret_file = workdir / "jwt-hs256.secret"
    secret_file.write_bytes(secret)
    secret_file.chmod(0o600)

    llm = supports_llm_section(workdir)
    mcp = supports_mcp_section(workdir)
    upstream = start_upstream(workdir, cert, key)
    rules = workdir / "rules" / "bench.yaml"
    rules.parent.mkdir()
    rules.write_text(small_policy(upstream.port, llm=llm, mcp=mcp))

    fg_opts = {"fleetgate_jwt_secret_file": str(secret_file),
               "fleetgate_metrics_listen": "127.0.0.1:0"}
    admin_token = None
    if supports_admin_api():
        # As in production, the token comes from a file (0600); port 0: each gateway its own.
        admin_token = secrets.token_hex(24)
        token_file = workdir / "admin.token"
        token_file.write_text(admin_token)
        token_file.chmod(0o600)
        fg_opts.update(fleetgate_admin_listen="127.0.0.1:0", fleetgate_admin_token_file=str(token_file))
    launches = [
        launch_proxy("bare", workdir, proxy_argv(confdir, ca_pem, COMMON), False),
        launch_proxy("bare-sse", workdir, proxy_argv(confdir, ca_pem, BARE_SSE), False),
    ]
    bench = Bench(workdir, ca_pem, confdir, secret, upstream, rules, {}, {},
                  ssl.create_default_context(cafile=str(mitm_ca)),
                  ssl.create_default_context(cafile=str(ca_pem)), fg_opts, llm, mcp,
                  admin_token=admin_token)
    launches.append(launch_proxy("fleetgate", workdir, bench.fleetgate_argv(
        rules, workdir / "fleetgate" / "decisions.jsonl"), True))
    if llm:
        # The same gateway with the upstream not declared an LLM provider: the chat calls are
        # plain HTTPS to it, so the difference to "fleetgate" is what LLM inspection and
        # metering cost (reported as an extra row of (a)).
        plain = workdir / "rules-nollm" / "bench.yaml"
        plain.parent.mkdir()
        plain.write_text(small_policy(upstream.port, llm=False, mcp=mcp))
        launches.append(launch_proxy(NOLLM, workdir, bench.fleetgate_argv(
            plain, workdir / NOLLM / "decisions.jsonl"), True))
    if supports_limits_section(workdir):
        # The same gateway with the seed's security-route limits on the bench profile, sized
        # never to refuse: every chat call takes from two buckets, so the difference to
        # "fleetgate" is what the limiter costs per request (extra rows of (a)).
        limited = workdir / "rules-limits" / "bench.yaml"
        limited.parent.mkdir()
        limited.write_text(small_policy(upstream.port, llm=llm, mcp=mcp, limits=True))
        bench.limits = True
        launches.append(launch_proxy(LIMITED, workdir, bench.fleetgate_argv(
            limited, workdir / LIMITED / "decisions.jsonl"), True))
    for launch in launches:
        bench.proxies[launch.name] = launch.wait()

    base = bench.base_url
    bench.targets["direct"] = Target("direct", base, bench.direct_verify)
    for name, proxy in bench.proxies.items():
        bench.targets[name] = Target(name, base, bench.proxy_verify, proxy.port, proxy.pid,
                                     bench.mint if proxy.fleetgate else None)
    return bench


@contextlib.contextmanager
def workspace(keep: bool) -> Any:
    d = Path(tempfile.mkdtemp(prefix="fleetgate-bench-"))
    try:
        yield d
    finally:
        if not keep:
            shutil.rmtree(d, ignore_errors=True)


# -- versions -----------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_total = round(int(line.split()[1]) / 1024 / 1024, 1)
    status = _git("status", "--porcelain", "--untracked-files=all", "--", "addons", "pyproject.toml")
    return {
        "fleetgate_git_sha": _git("rev-parse", "HEAD"),
        "fleetgate_git_dirty": bool(status) if status is not None else None,
        "fleetgate_uncommitted": status.splitlines() if status else [],
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "packages": {p: _version(p) for p in (
            "fleetgate", "mitmproxy", "mitmproxy_rs", "httpx", "httpcore", "h11", "anyio", "uvicorn",
            "httptools", "uvloop", "trustme", "cryptography", "pyOpenSSL", "PyJWT",
            "common-expression-language", "PyYAML")},
        "openssl": ssl.OPENSSL_VERSION,
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "mem_total_gib": mem_total,
        "kernel": platform.release(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
