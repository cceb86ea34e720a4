"""``fleetgate demo``: the gateway on the example rules, offline, shown step by step.

Nothing in ``make run`` can succeed without the internet: the "allowed" request ends in a
502 and metering, budgets, MCP filtering and the kill switch stay invisible. The demo starts,
in a temporary directory, the gateway exactly as ``fleetgate run`` does on a copy of
``rules/`` (plus the one ``allowPrivate`` entry that lets it reach 127.0.0.1), a mock LLM
provider answering as ``api.openai.com`` and ``api.anthropic.com`` and a mock MCP server
answering as the MCP hosts ``rules/fleet.yaml`` declares; the gateway reaches them under those
names through ``fleetgate_resolve`` and verifies them with the mocks' own CA. Then it sends
what agents would send and prints what the gateway answered and recorded.

``--check`` runs without pauses and asserts each step's outcome (CI runs it): a failed step
is named and the exit status is 1. The mocks need the ``demo`` extra (MCP SDK, uvicorn).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from fleetgate.errors import FleetgateError
from fleetgate.identity.mint import mint_token

if TYPE_CHECKING:
    import httpx

    from fleetgate.mocks.llm_provider import LlmProvider
    from fleetgate.mocks.localca import LocalCA

EXTRA_HINT = "install the demo extra: make demo / pip install 'fleetgate[demo]'"
NEEDS = ("httpx", "mcp", "uvicorn")
LLM_HOSTS = ("api.openai.com", "api.anthropic.com")
# MCP servers of rules/fleet.yaml the demo serves (one mock answers under both names)
MCP_HOSTS = ("mcp-security.tools.example.com", "mcp-cloud.tools.example.com")
DEMO_RULES_FILE = "zz-demo-local.yaml"
DEMO_RULES = """# Added by `fleetgate demo` to its temporary copy of rules/ (never to rules/ itself): the
# demo's mock provider and MCP server listen on 127.0.0.1, an address the gateway refuses
# unless destinations.allowPrivate covers it.
apiVersion: fleetgate/v1
kind: Policy
metadata:
  name: demo-local
destinations:
  allowPrivate: ["127.0.0.1/32"]
"""
STEPS = 6

_LISTEN = re.compile(r"proxy listening at .*?:(\d+)")
_METRICS = re.compile(r"fleetgate metrics listening at http://[\d.]+:(\d+)")
_ADMIN = re.compile(r"fleetgate admin API listening at http://[\d.]+:(\d+)")


class StepFailed(FleetgateError):
    """An outcome ``--check`` asserts did not happen."""


def expect(cond: object, what: str) -> None:
    if not cond:
        raise StepFailed(what)


def missing_requirements() -> list[str]:
    """The demo extra's modules that cannot be imported."""
    missing = []
    for name in NEEDS:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: blocked in sys.modules
            found = False
        if not found:
            missing.append(name)
    return missing


def default_rules() -> Path:
    """``rules/`` of the working directory (``make demo``), else the one beside the package."""
    here = Path("rules")
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[2] / "rules"


def gateway_script() -> Path:
    """The mitmproxy script ``fleetgate run`` loads."""
    from fleetgate.cli import _script_path

    return _script_path()


class _NamedCA:
    """Hands out leaves that also carry ``names``, whatever names the server asks for."""

    def __init__(self, ca: LocalCA, names: tuple[str, ...]) -> None:
        self.ca, self.names = ca, names
        self.cert_pem = ca.cert_pem

    def issue_cert(self, *identities: str) -> Any:
        return self.ca.issue_cert(*dict.fromkeys((*self.names, *identities)))


# -- the gateway ------------------------------------------------------------------------


@dataclass
class Gateway:
    """``mitmdump -s <gateway script>`` as ``fleetgate run`` starts it, on free ports."""

    workdir: Path
    rules: Path
    upstream_ca: Path
    resolve: list[str]
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    metrics_port: int = 0
    admin_port: int = 0
    secret: bytes = b""
    admin_token: str = ""
    ca_cert: Path = field(default_factory=Path)

    @property
    def output_file(self) -> Path:
        return self.workdir / "gateway.out"

    @property
    def decision_log(self) -> Path:
        return self.workdir / "decisions.jsonl"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def start(self, timeout: float = 60.0) -> None:
        from fleetgate.cli import ca_init, dev_secret

        confdir = self.workdir / "confdir"
        confdir.mkdir()
        self.ca_cert = ca_init(confdir, quiet=True)
        secret_file = dev_secret(confdir / "jwt-hs256.secret")
        self.secret = secret_file.read_bytes().strip()
        self.state_dir.mkdir()
        token_file = dev_secret(self.state_dir / "admin-token")
        self.admin_token = token_file.read_text().strip()
        opts = [f"fleetgate_rules={self.rules}", f"confdir={confdir}",
                "fleetgate_metrics_listen=127.0.0.1:0", "fleetgate_admin_listen=127.0.0.1:0",
                f"fleetgate_decision_log={self.decision_log}",
                f"fleetgate_mcp_pins={self.state_dir / 'mcp-pins.json'}",
                f"fleetgate_state_dir={self.state_dir}",
                f"fleetgate_admin_token_file={token_file}",
                f"fleetgate_jwt_secret_file={secret_file}",
                f"ssl_verify_upstream_trusted_ca={self.upstream_ca}"]
        opts += [f"fleetgate_resolve={r}" for r in self.resolve]
        tool = "mitmdump"
        exe = shutil.which(tool, path=str(Path(sys.executable).parent)) or shutil.which(tool)
        if exe is None:
            raise StepFailed("mitmdump not found; install fleetgate's dependencies")
        argv = [exe, "-s", str(gateway_script()), "--listen-host", "127.0.0.1",
                "--listen-port", "0", "--flow-detail", "0"]
        for o in opts:
            argv += ["--set", o]
        with self.output_file.open("wb") as out:
            # unbuffered: the "listening" lines must reach the file while the gateway runs
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.workdir,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.output()
            if ((m := _LISTEN.search(text)) and (mm := _METRICS.search(text))
                    and (ma := _ADMIN.search(text))):
                self.port, self.metrics_port = int(m.group(1)), int(mm.group(1))
                self.admin_port = int(ma.group(1))
                return
            if self.proc.poll() is not None:
                raise StepFailed(f"the gateway exited {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.05)
        raise StepFailed(f"the gateway did not start within {timeout:.0f} s:\n{self.output()}")

    def output(self) -> str:
        try:
            return self.output_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    # -- what agents and operators do --------------------------------------------------

    def token(self, sub: str, role: str, **claims: Any) -> str:
        return mint_token(self.secret, sub, 3600, {"agent_role": role, **claims})

    def client(self, token: str) -> httpx.Client:
        """An httpx client set up like an agent pod: HTTPS_PROXY with its JWT, our CA."""
        import httpx

        return httpx.Client(proxy=f"http://agent:{token}@127.0.0.1:{self.port}",
                            verify=ssl.create_default_context(cafile=str(self.ca_cert)),
                            timeout=30.0)

    def admin(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        headers = {"Authorization": f"Bearer {self.admin_token}"}
        if body is None:
            r = httpx.get(self.admin_url + path, headers=headers, timeout=30)
        else:
            r = httpx.post(self.admin_url + path, json=body, headers=headers, timeout=30)
        expect(r.status_code == 200, f"admin API {path}: {r.status_code} {r.text[:300]}")
        result: dict[str, Any] = r.json()
        return result

    def metrics_json(self, path: str) -> dict[str, Any]:
        import httpx

        result: dict[str, Any] = httpx.get(self.metrics_url + path, timeout=10).json()
        return result

    def decision(self, decision_id: str | None, timeout: float = 10.0) -> dict[str, Any]:
        """The decision-log line with this id (allowed flows are logged when they end)."""
        if not decision_id:
            raise StepFailed("the response carries no X-Fleetgate-Decision-Id")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.decision_log.exists():
                for line in self.decision_log.read_text().splitlines():
                    if decision_id in line:
                        d: dict[str, Any] = json.loads(line)
                        if d.get("decision_id") == decision_id:
                            return d
            time.sleep(0.05)
        raise StepFailed(f"no decision-log line for decision {decision_id}")


# -- printing ---------------------------------------------------------------------------


def say(text: str = "") -> None:
    print(text, flush=True)


def show(label: str, value: Any) -> None:
    if not isinstance(value, str):
        value = json.dumps(value, separators=(", ", ": "))
    say(f"    {label}: {value}")


def error_of(body: Any) -> tuple[str, str]:
    """(rule id, message) of a fleetgate denial as the SDKs would surface it."""
    if not isinstance(body, dict):
        return "", str(body)
    fg = body.get("fleetgate") or {}
    err = body.get("error") or {}
    if isinstance(err, dict):
        rule = fg.get("rule") or err.get("code") or ""
        return str(rule), str(err.get("message", ""))
    return str(fg.get("rule", "")), str(err)


def body_of(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return r.text


# -- the demo ---------------------------------------------------------------------------


@dataclass
class Mocks:
    ca: LocalCA
    ca_file: Path
    llm: LlmProvider
    mcp: Any


class Demo:
    def __init__(self, rules_src: Path, check: bool, interactive: bool, keep: bool) -> None:
        self.rules_src = rules_src
        self.check = check
        self.interactive = interactive
        self.keep = keep
        self.workdir = Path(tempfile.mkdtemp(prefix="fleetgate-demo-"))
        self.gw: Gateway | None = None
        self.mocks: Mocks | None = None
        self._clients: list[httpx.Client] = []  # the MCP sessions' clients

    # -- set-up -----------------------------------------------------------------------

    def prepare_rules(self) -> Path:
        rules = self.workdir / "rules"
        shutil.copytree(self.rules_src, rules)
        (rules / DEMO_RULES_FILE).write_text(DEMO_RULES)
        from fleetgate.policy.loader import PolicyError, load_policy

        try:
            load_policy(str(rules))
        except PolicyError as exc:
            raise StepFailed(f"the rules do not load: {exc}") from exc
        return rules

    def start_mocks(self) -> Mocks:
        from fleetgate.mocks.llm_provider import LlmProvider
        from fleetgate.mocks.localca import LocalCA

        ca = LocalCA()
        ca_file = self.workdir / "mocks-ca.pem"
        ca.cert_pem.write_to_path(ca_file)
        llm = LlmProvider(ca.server_context(*LLM_HOSTS, "127.0.0.1", "localhost"))
        mcp = self.start_mcp(_NamedCA(ca, MCP_HOSTS))
        return Mocks(ca, ca_file, llm, mcp)

    def start_mcp(self, ca: _NamedCA) -> Any:
        from fleetgate.mocks import mcp_server

        # the CA is duck-typed (trustme's issue_cert); _NamedCA adds the second name
        return mcp_server.McpUpstream(cast(Any, ca), "streamable-json",
                                      tools=mcp_server.SECURITY_TOOLS + mcp_server.CLOUD_TOOLS,
                                      name=MCP_HOSTS[0], server_name="fleetgate-demo-mcp")

    def pause(self) -> None:
        if self.interactive:
            with contextlib.suppress(EOFError):
                input("  -- press Enter for the next step --")

    # -- run ----------------------------------------------------------------------------

    def run(self) -> int:
        t0 = time.monotonic()
        step_names = ["an allowed LLM call, metered", "rules deny LLM calls (model, max_tokens)",
                      "a budget runs out (429)", "MCP tools filtered per agent",
                      "the kill switch cuts a live stream", "where to look"]
        steps: list[Callable[[], str]] = [self.step_metered, self.step_denied, self.step_budget,
                                          self.step_mcp, self.step_kill, self.step_where]
        current = 0
        try:
            self.setup()
            for i, (name, step) in enumerate(zip(step_names, steps, strict=True), 1):
                current = i
                say()
                say(f"[{i}/{STEPS}] {name}")
                summary = step()
                say(f"  => step {i} ok: {summary}")
                if i < STEPS:
                    self.pause()
        except StepFailed as exc:
            label = f"step {current} ({step_names[current - 1]})" if current else "set-up"
            say()
            say(f"FAILED {label}: {exc}")
            if self.gw is not None:
                tail = "\n".join(self.gw.output().splitlines()[-25:])
                say(f"gateway output (last lines, {self.gw.output_file}):\n{tail}")
            return 1
        except KeyboardInterrupt:
            say("\ninterrupted")
            return 130
        finally:
            self.teardown()
        say()
        say(f"demo: all {STEPS} steps ok in {time.monotonic() - t0:.1f} s")
        return 0

    def setup(self) -> None:
        say("fleetgate demo: the gateway on the example rules, with a local mock LLM provider and "
            "MCP server")
        say(f"  working directory: {self.workdir}")
        rules = self.prepare_rules()
        say(f"  rules: a copy of {self.rules_src.resolve()} in {rules}")
        say(f"    + {DEMO_RULES_FILE}: destinations.allowPrivate [127.0.0.1/32], because the mocks "
            "listen on 127.0.0.1 (rules/ itself is unchanged)")
        self.mocks = m = self.start_mocks()
        say(f"  mock LLM provider (OpenAI + Anthropic wire formats): 127.0.0.1:{m.llm.port}, "
            f"answering as {' and '.join(LLM_HOSTS)}")
        say(f"  mock MCP server (official SDK, streamable HTTP): 127.0.0.1:{m.mcp.port}, "
            f"answering as {' and '.join(MCP_HOSTS)}")
        resolve = [f"{h}:443=127.0.0.1:{m.llm.port}" for h in LLM_HOSTS]
        resolve += [f"{h}:443=127.0.0.1:{m.mcp.port}" for h in MCP_HOSTS]
        self.gw = Gateway(self.workdir, rules, m.ca_file, resolve)
        self.gw.start()
        say(f"  gateway: mitmdump -s {gateway_script()} on 127.0.0.1:{self.gw.port} "
            f"(metrics :{self.gw.metrics_port}, admin API :{self.gw.admin_port}); it reaches the mocks "
            "by their real names (--set fleetgate_resolve=api.openai.com:443=127.0.0.1:...) and "
            "verifies them with the mocks' CA (ssl_verify_upstream_trusted_ca)")

    def teardown(self) -> None:
        for c in self._clients:
            c.close()
        if self.gw is not None:
            self.gw.stop()
        if self.mocks is not None:
            self.mocks.llm.stop()
            with contextlib.suppress(Exception):
                self.mocks.mcp.stop()
        if self.keep:
            say(f"(kept {self.workdir})")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def g(self) -> Gateway:
        assert self.gw is not None
        return self.gw

    @property
    def m(self) -> Mocks:
        assert self.mocks is not None
        return self.mocks

    # -- the steps ----------------------------------------------------------------------

    def step_metered(self) -> str:
        say("  The coordinator (role coordinator, may use OpenAI and Anthropic) asks gpt-4o, then")
        say("  streams an answer from claude-sonnet-4-5. The gateway reads the usage the provider")
        say("  reports (the last stream events too, never buffering) and prices it (rules/pricing.yaml).")
        tok = self.g.token("coord-1", "coordinator", session_id="s-coord-1")
        with self.g.client(tok) as c:
            r = c.post("https://api.openai.com/v1/chat/completions",
                       json={"model": "gpt-4o", "max_tokens": 200,
                             "messages": [{"role": "user", "content": "Summarise the fleet's health."}]})
            expect(r.status_code == 200, f"OpenAI call: HTTP {r.status_code} {r.text[:300]}")
            say(f"  POST https://api.openai.com/v1/chat/completions -> {r.status_code}: "
                f"{r.json()['choices'][0]['message']['content']!r}")
            d1 = self.g.decision(r.headers.get("x-fleetgate-decision-id"))
            self._show_llm_decision(d1)
            events = 0
            with c.stream("POST", "https://api.anthropic.com/v1/messages",
                          json={"model": "claude-sonnet-4-5-20250929", "max_tokens": 300, "stream": True,
                                "messages": [{"role": "user", "content": "And the network?"}]}) as s:
                expect(s.status_code == 200, f"Anthropic stream: HTTP {s.status_code}")
                for line in s.iter_lines():
                    events += line.startswith("event:")
                did = s.headers.get("x-fleetgate-decision-id")
            say(f"  POST https://api.anthropic.com/v1/messages (stream) -> 200, {events} SSE events")
            d2 = self.g.decision(did)
            self._show_llm_decision(d2)
        usage = self.g.metrics_json("/usage")
        mine = (usage.get("agents") or {}).get("coord-1") or {}
        say(f"  GET {self.g.metrics_url}/usage, agents.coord-1:")
        show("  totals", mine)
        for d in (d1, d2):
            llm = d.get("llm") or {}
            tokens = llm.get("tokens") or {}
            expect(d.get("result") == "allow", f"decision {d.get('decision_id')} is not an allow")
            expect(tokens.get("input", 0) > 0 and tokens.get("output", 0) > 0,
                   f"no tokens metered for {d.get('path')}: {llm}")
            expect((llm.get("cost_usd") or 0) > 0, f"no cost for {d.get('path')}: {llm}")
        expect(mine.get("calls") == 2, f"/usage does not show coord-1's 2 calls: {mine}")
        return (f"2 calls metered, {mine.get('input')} input + {mine.get('output')} output tokens, "
                f"${mine.get('cost_usd')}")

    def _show_llm_decision(self, d: dict[str, Any]) -> None:
        llm = d.get("llm") or {}
        say(f"    decision log: rule={d.get('rule')} agent={d.get('agent')} role={d.get('role')} "
            f"session={d.get('session')} status={d.get('status')}")
        say(f"      llm: provider={llm.get('provider')} model={llm.get('model')} "
            f"tokens={json.dumps(llm.get('tokens'))} cost_usd={llm.get('cost_usd')}")

    def step_denied(self) -> str:
        say("  The general agent's profile in rules/fleet.yaml says \"(Sonnet or Haiku)\" and rule")
        say("  general.models enforces it, whatever the agent's prompt says: it asks claude-opus-4-5.")
        say("  Then it asks Sonnet for max_tokens=64000 (rule general.max-tokens: at most 8192), and")
        say("  the security agent, which may only reach Anthropic (its egress list), asks OpenAI's")
        say("  gpt-4o. Each is refused before the provider sees anything, with the error body the")
        say("  OpenAI/Anthropic SDKs raise.")
        before = len(self.m.llm.seen)
        with self.g.client(self.g.token("gen-1", "general")) as c:
            opus = c.post("https://api.anthropic.com/v1/messages",
                          json={"model": "claude-opus-4-5", "max_tokens": 1024,
                                "messages": [{"role": "user", "content": "Plan the Proxmox upgrade."}]})
            big = c.post("https://api.anthropic.com/v1/messages",
                         json={"model": "claude-sonnet-4-5", "max_tokens": 64000,
                               "messages": [{"role": "user", "content": "Write the whole runbook."}]})
        with self.g.client(self.g.token("sec-1", "security")) as c:
            egress = c.post("https://api.openai.com/v1/chat/completions",
                            json={"model": "gpt-4o", "max_tokens": 100,
                                  "messages": [{"role": "user", "content": "Which CVEs matter today?"}]})
        rules: list[str] = []
        for who, r, want in (("general, claude-opus-4-5", opus, "general.models"),
                             ("general, max_tokens=64000", big, "general.max-tokens"),
                             ("security -> api.openai.com", egress, "egress")):
            rule, msg = error_of(body_of(r))
            say(f"  {who}: HTTP {r.status_code}, rule {rule}")
            show("SDK error", msg)
            expect(r.status_code == 403, f"{who}: expected 403, got {r.status_code} {r.text[:300]}")
            expect(rule == want, f"{who}: expected rule {want}, got {rule!r}")
            expect(f"({want})" in msg, f"{who}: the SDK-readable message names no rule: {msg!r}")
            rules.append(rule)
        d = self.g.decision(opus.headers.get("x-fleetgate-decision-id"))
        say(f"    decision log (claude-opus-4-5): result={d.get('result')} rule={d.get('rule')} "
            f"agent={d.get('agent')} status={d.get('status')}")
        expect(d.get("rule") == "general.models", f"the decision log names {d.get('rule')!r}")
        expect(len(self.m.llm.seen) == before, "a refused call reached the provider")
        return f"{'; '.join(f'403 {r}' for r in rules)} (the provider saw none)"

    def step_budget(self) -> str:
        usage = {"input_tokens": 20000, "output_tokens": 400000,
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        billed = usage["input_tokens"] + usage["output_tokens"]
        say("  Opus is expensive: each security agent may spend $10 a day (budget security.daily-usd")
        say("  in rules/fleet.yaml; a fleet-wide monthly budget sits above it). To skip a day's work,")
        say(f"  the mock provider bills the first call {billed:,} tokens of claude-opus-4-5; the gateway")
        say("  settles the budget to what the provider billed, and the next call no longer fits.")
        ctl = self.m.llm.control
        ctl.anthropic_usage = usage
        try:
            with self.g.client(self.g.token("sec-2", "security")) as c:
                r1 = c.post("https://api.anthropic.com/v1/messages",
                            json={"model": "claude-opus-4-5", "max_tokens": 4096,
                                  "messages": [{"role": "user", "content": "Triage today's CVEs."}]})
                expect(r1.status_code == 200, f"first call: HTTP {r1.status_code} {r1.text[:300]}")
                d1 = self.g.decision(r1.headers.get("x-fleetgate-decision-id"))
                llm = d1.get("llm") or {}
                say(f"  call 1 -> 200, billed {json.dumps(llm.get('tokens'))}, "
                    f"${llm.get('cost_usd')}")
                show("budgets it counted in", [b.get("budget") for b in d1.get("budgets") or []])
                seen = len(self.m.llm.seen)
                r2 = c.post("https://api.anthropic.com/v1/messages",
                            json={"model": "claude-opus-4-5", "max_tokens": 4096,
                                  "messages": [{"role": "user", "content": "And the base images?"}]})
        finally:
            ctl.anthropic_usage = None
        rule, msg = error_of(body_of(r2))
        retry = int(r2.headers.get("retry-after") or 0)
        no_retry = r2.headers.get("x-should-retry")
        say(f"  call 2 -> HTTP {r2.status_code}, rule {rule}, Retry-After: {retry} s, "
            f"x-ratelimit-remaining: {r2.headers.get('x-ratelimit-remaining')}, "
            f"x-should-retry: {no_retry}")
        show("SDK error", msg)
        expect(r2.status_code == 429, f"call 2: expected 429, got {r2.status_code} {r2.text[:300]}")
        expect(rule == "security.daily-usd", f"call 2: rule {rule!r}")
        expect(retry > 0, "the 429 says nothing about when the budget refills (Retry-After)")
        expect("refills at" in msg, f"the SDK message does not say when the budget refills: {msg!r}")
        # fleetgate_limits_no_retry_after (60 s): a longer wait tells the SDKs not to retry
        expect((no_retry == "false") == (retry > 60),
               f"x-should-retry {no_retry!r} with Retry-After {retry} s")
        expect(len(self.m.llm.seen) == seen, "the refused call reached the provider")
        spent = self._budget_spend("security.daily-usd", "sec-2")
        if spent is not None:
            say(f"  GET {self.g.metrics_url}/budgets, security.daily-usd for sec-2: {json.dumps(spent)}")
        return f"429 {rule}, refills in {retry} s (x-should-retry: {no_retry or 'unset'})"

    def _budget_spend(self, budget: str, key: str) -> dict[str, Any] | None:
        """One key's line of ``GET /budgets``: the budget's limits and what the key spent."""
        for b in self.g.metrics_json("/budgets").get("budgets") or []:
            if b.get("budget") == budget:
                row = next((s for s in b.get("spend") or [] if s.get("key") == key), None)
                if row is not None:
                    return {"limit": b.get("limit"), "soft_usd": b.get("soft_usd"),
                            "hard_usd": b.get("hard_usd"), "spent_usd": row.get("usd"),
                            "tokens": row.get("tokens")}
        return None

    def step_mcp(self) -> str:
        say("  One MCP server answers as mcp-security.tools.example.com and mcp-cloud.tools.example.com.")
        say("  The security and cloud agents each list its tools: each sees only what its rules allow")
        say("  (mcp.servers in rules/fleet.yaml). Then calls: allowed, outside the role, and an")
        say("  argument the cloud rules forbid (the namespace that hosts the gateway).")
        sec_tools, sec = self._mcp_session("sec-1", "security", MCP_HOSTS[0])
        cloud_tools, cloud = self._mcp_session("cloud-1", "cloud", MCP_HOSTS[1])
        say(f"  security sees: {', '.join(sec_tools)}")
        say(f"  cloud sees:    {', '.join(cloud_tools)}")
        expect(sec_tools and cloud_tools, "an agent sees no tools at all")
        expect(not set(sec_tools) & set(cloud_tools), "the two roles see the same tools")
        expect(all(t.startswith(("nmap", "trivy", "falco")) for t in sec_tools),
               f"security sees tools outside its rules: {sec_tools}")
        allowed_tool = sec_tools[0]
        ok = sec(3, "tools/call", {"name": allowed_tool, "arguments": self._args(allowed_tool)})
        say(f"  security calls {allowed_tool} -> result: "
            f"{json.dumps(ok.get('result', ok.get('error')))[:120]}")
        expect("result" in ok, f"the allowed call failed: {ok}")
        other = next((t for t in cloud_tools if t.startswith("kubectl")), cloud_tools[0])
        denied = sec(4, "tools/call", {"name": other, "arguments": self._args(other)})
        say(f"  security calls {other} -> JSON-RPC error {json.dumps(denied.get('error'))}")
        expect((denied.get("error") or {}).get("code") == -32602,
               f"security calling {other}: expected JSON-RPC error -32602, got {denied}")
        infra = cloud(3, "tools/call", {"name": other, "arguments": {
            **self._args(other), "namespace": "agent-infra"}})
        say(f"  cloud calls {other} in namespace agent-infra -> JSON-RPC error "
            f"{json.dumps(infra.get('error'))}")
        expect("error" in infra, f"cloud touching agent-infra was not refused: {infra}")
        rules = self._mcp_rules("cloud-1")
        say(f"    decision log (cloud-1): rules {', '.join(sorted(rules))}")
        expect("cloud-tools.not-agent-infra" in rules,
               f"the decision log does not name cloud-tools.not-agent-infra: {rules}")
        called = [c.name for c in getattr(self.m.mcp, "calls", [])]
        say(f"  the MCP server received tool calls: {called}")
        expect(called == [allowed_tool], f"denied calls reached the server: {called}")
        return (f"security {len(sec_tools)} tools, cloud {len(cloud_tools)} tools; "
                f"{other} refused (-32602) and cloud-tools.not-agent-infra")

    @staticmethod
    def _args(tool: str) -> dict[str, Any]:
        samples = {"target": "10.0.0.0/28", "image": "nginx:1.27", "since": "1h", "dir": "infra/",
                   "command": "get pods", "namespace": "default"}
        spec = {"nmap": ["target"], "trivy": ["image"], "falco": ["since"], "terraform": ["dir"],
                "kubectl": ["command", "namespace"], "helm": ["namespace"], "istioctl": ["namespace"]}
        keys = next((v for k, v in spec.items() if tool.startswith(k)), [])
        return {k: samples[k] for k in keys}

    def _mcp_session(self, sub: str, role: str, host: str
                     ) -> tuple[list[str], Callable[[int, str, dict[str, Any]], dict[str, Any]]]:
        """initialize + tools/list as an MCP client does; returns the tool names and a caller."""
        client = self.g.client(self.g.token(sub, role))
        url = f"https://{host}/mcp"
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}

        def rpc(msg: dict[str, Any]) -> tuple[Any, httpx.Response]:
            r = client.post(url, json={"jsonrpc": "2.0", **msg}, headers=headers)
            expect(r.status_code in (200, 202), f"{sub} {msg.get('method')}: HTTP {r.status_code} "
                                                f"{r.text[:300]}")
            return (r.json() if r.content and "json" in r.headers.get("content-type", "") else None), r

        init, r = rpc({"id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "fleetgate-demo", "version": "1"}}})
        expect(isinstance(init, dict) and "result" in init, f"{sub} initialize: {init}")
        if sid := r.headers.get("mcp-session-id"):
            headers["Mcp-Session-Id"] = sid
        headers["MCP-Protocol-Version"] = init["result"].get("protocolVersion", "2025-06-18")
        rpc({"method": "notifications/initialized"})
        listed, _ = rpc({"id": 2, "method": "tools/list", "params": {}})
        expect(isinstance(listed, dict) and "result" in listed, f"{sub} tools/list: {listed}")
        names = [t["name"] for t in listed["result"].get("tools", [])]
        self._clients.append(client)

        def call(rid: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
            answer, _ = rpc({"id": rid, "method": method, "params": params})
            expect(isinstance(answer, dict), f"{sub} {method}: no JSON-RPC answer")
            result: dict[str, Any] = answer
            return result

        return names, call

    def _mcp_rules(self, agent: str) -> set[str]:
        rules: set[str] = set()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for line in self.g.decision_log.read_text().splitlines():
                d = json.loads(line)
                if d.get("agent") == agent and d.get("mcp"):
                    rules |= {c.get("rule") for c in d["mcp"].get("calls", []) if c.get("rule")}
            if "cloud-tools.not-agent-infra" in rules:
                break
            time.sleep(0.1)
        return rules

    def step_kill(self) -> str:
        say("  The coordinator streams a completion; the provider sends the first event and keeps")
        say("  the stream open. An operator stops agent coord-1 through the admin API")
        say("  (= fleetgate stop agent coord-1): the live stream is cut, the next request gets")
        say("  503 killswitch.stop; `unrevoke` lifts it (= fleetgate unrevoke agent coord-1).")
        ctl = self.m.llm.control
        ctl.release_after_first.clear()
        ctl.hold_timeout = 30.0
        ctl.hold_after_first = True
        gone_before = ctl.client_gone
        tok = self.g.token("coord-1", "coordinator", session_id="s-coord-1")
        got: list[str] = []
        cut_error = ""
        act: dict[str, Any] = {}
        try:
            with self.g.client(tok) as c, c.stream(
                    "POST", "https://api.openai.com/v1/chat/completions",
                    json={"model": "gpt-4o", "stream": True, "max_tokens": 500,
                          "messages": [{"role": "user", "content": "Plan the migration."}]}) as s:
                expect(s.status_code == 200, f"stream: HTTP {s.status_code}")
                lines = s.iter_lines()
                try:
                    for line in lines:
                        if line.startswith("data:"):
                            got.append(line)
                            if len(got) == 1:
                                say(f"  streaming... first event received: {line[:70]}...")
                                act = self.g.admin("/v1/actions", {
                                    "verb": "stop", "scope": "agent:coord-1",
                                    "reason": "fleetgate demo: runaway coordinator", "by": "demo"})
                                cut = len(act.get("cut") or [])
                                say(f"  POST /v1/actions stop agent:coord-1 -> cut {cut} flow(s) "
                                    f"in {act.get('cut_ms')} ms")
                except Exception as exc:  # the cut surfaces as a protocol/read error
                    cut_error = f"{type(exc).__name__}: {exc}"
        finally:
            ctl.hold_after_first = False
            ctl.release_after_first.set()
        done = any("[DONE]" in ln for ln in got)
        say(f"  the agent's stream ended after {len(got)} event(s), "
            f"{'[DONE] received' if done else 'no [DONE]'}{': ' + cut_error if cut_error else ''}")
        expect(got, "no stream event arrived before the stop")
        expect(not done, "the stream was not cut: it ran to [DONE]")
        expect(act.get("cut"), f"the stop cut no flow: {act}")
        with self.g.client(tok) as c:
            body = {"model": "gpt-4o", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
            r = c.post("https://api.openai.com/v1/chat/completions", json=body)
            rule, msg = error_of(body_of(r))
            say(f"  next request -> HTTP {r.status_code}, rule {rule}")
            show("SDK error", msg)
            expect(r.status_code == 503 and rule == "killswitch.stop",
                   f"after the stop: expected 503 killswitch.stop, got {r.status_code} {rule}")
            lifted = self.g.admin("/v1/lift", {"action": "unrevoke", "scope": "agent:coord-1",
                                               "by": "demo", "reason": "fleetgate demo"})
            say(f"  POST /v1/lift unrevoke agent:coord-1 -> lifted {len(lifted.get('lifted') or [])}")
            r2 = c.post("https://api.openai.com/v1/chat/completions", json=body)
            say(f"  next request -> HTTP {r2.status_code}")
            expect(r2.status_code == 200, f"after unrevoke: expected 200, got {r2.status_code}")
        log = self.g.admin("/v1/log?limit=20").get("log") or []
        say(f"  kill log: {len(log)} entries (fleetgate killlog), e.g. "
            f"{', '.join(sorted({str(e.get('event') or e.get('kind') or '?') for e in log}))}")
        wait = time.monotonic() + 5
        while ctl.client_gone == gone_before and time.monotonic() < wait:
            time.sleep(0.05)
        say(f"  the provider saw its reader go away: {ctl.client_gone > gone_before}")
        return f"stream cut after {len(got)} event(s); 503 {rule}; 200 after unrevoke"

    def step_where(self) -> str:
        g = self.g
        say(f"  decision log (one JSON line per flow): {g.decision_log}")
        say(f"  usage per agent and session:  curl {g.metrics_url}/usage")
        say(f"  Prometheus metrics:           curl {g.metrics_url}/metrics")
        say(f"  rate limits and budgets:      curl {g.metrics_url}/limits  {g.metrics_url}/budgets")
        say(f"  admin API (kill switch, MCP pins): {g.admin_url}/v1/status, token in "
            f"{g.state_dir / 'admin-token'}")
        say(f"    FLEETGATE_ADMIN_URL={g.admin_url} fleetgate status --token-file "
            f"{g.state_dir / 'admin-token'}")
        say(f"  gateway output: {g.output_file}")
        say("  while the demo runs (interactive mode waits below), try it yourself:")
        say(f"    TOKEN=$(fleetgate token mint --secret-file "
            f"{g.workdir / 'confdir' / 'jwt-hs256.secret'} --sub me --claim agent_role=coordinator)")
        say(f"    HTTPS_PROXY=http://agent:$TOKEN@127.0.0.1:{g.port} CURL_CA_BUNDLE={g.ca_cert} "
            "curl https://api.openai.com/v1/chat/completions -d '{\"model\":\"gpt-4o\",\"messages\":[]}'")
        say("  every flow in a UI: make web (mitmweb; denied flows are marked with the rule)")
        import httpx

        metrics = httpx.get(g.metrics_url + "/metrics", timeout=10).text
        expect("fleetgate_requests_total" in metrics, "/metrics has no fleetgate_requests_total")
        lines = len(g.decision_log.read_text().splitlines())
        expect(lines > 0, "the decision log is empty")
        if self.interactive:
            with contextlib.suppress(EOFError):
                input("  -- the gateway and mocks run until you press Enter --")
        return f"{lines} decision-log lines, /metrics served"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """SIGTERM (a test's timeout, a CI cancel) tears the gateway and mocks down like Ctrl-C."""
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_demo(args: argparse.Namespace) -> int:
    if missing := missing_requirements():
        print(f"fleetgate demo: {', '.join(missing)} not installed; {EXTRA_HINT}", file=sys.stderr)
        return 2
    rules = Path(args.rules) if args.rules else default_rules()
    if not rules.is_dir():
        print(f"fleetgate demo: no rules directory at {rules} (run it from the repository, or pass "
              "--rules)", file=sys.stderr)
        return 2
    interactive = not args.check and sys.stdin.isatty()
    demo = Demo(rules, check=args.check, interactive=interactive, keep=args.keep)
    with _terminate_cleanly():
        return demo.run()


def add_demo_command(sub: Any) -> None:
    """``fleetgate demo [--check] [--rules DIR] [--keep]``."""
    p = sub.add_parser("demo", help="the gateway on the example rules with a local mock LLM "
                                    "provider and MCP server, step by step (offline)")
    p.add_argument("--check", action="store_true",
                   help="no pauses; assert every step's outcome, exit 1 naming the failed step")
    p.add_argument("--rules", default="", help="rules directory to copy (default: rules/)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.set_defaults(func=cmd_demo)


__all__ = ["EXTRA_HINT", "Demo", "StepFailed", "add_demo_command", "cmd_demo"]
