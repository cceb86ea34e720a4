"""Rules the benchmark runs fleetgate with: a small realistic policy, and the 1,000-agent /
5,000-rule policy of scenario (g). Both use the dialect in README.md ("Rules reference").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

BENCH_ROLE = "bench"

# The upstream is reached by this name, never by its address, through every target (direct,
# bare mitmdump, fleetgate): real providers are host names, and a gateway bug that only shows
# for names (issue 13: mitmproxy never reused an upstream connection to a name, so the 6th
# request on a keep-alive tunnel hung) went unseen while the bench dialled 127.0.0.1. Bare
# mitmdump has no ``fleetgate_resolve``, so it has to be a name the system resolver knows
# without edits; ``stack.check_upstream_name`` makes sure it means 127.0.0.1 and nothing else.
UPSTREAM_HOST = "localhost"


def upstream_hostport(upstream_port: int) -> str:
    """How the rules name the upstream: ``localhost:<port>``."""
    return f"{UPSTREAM_HOST}:{upstream_port}"

SEED_DENY = """authorization:
  rules:
  - deny: 'request.path.contains("delete")'
  - deny: 'request.path.contains("destroy")'
  - deny: 'request.path.contains("drop")'
"""


def llm_section(upstream_port: int) -> str:
    """Route the upstream as an OpenAI-compatible LLM provider (so fleetgate's LLM inspection
    and metering, where the tree has them, run on the chat calls) and price its model."""
    return f"""llm:
  providers:
  - name: bench-openai
    api: openai
    hosts: ["{upstream_hostport(upstream_port)}"]
  pricing:
    models:
      bench-model: {{input: 1.0, output: 2.0}}
"""


# Scenario (c): the tool families of the upstream's MCP server (bench/upstream.py) the bench
# agents may use, in the shape of the seed's security-tools rule: 3 of 25 families, 120 of the
# 1,000 tools. The other rules are the fleet's other roles (never true for a bench agent, but
# evaluated for every hidden tool, as in production) and the seed's argument-aware breaker.
MCP_SERVER = "bench-tools"
MCP_ALLOWED_PREFIXES = ("nmap", "trivy", "falco")


def mcp_section(upstream_port: int) -> str:
    """Declare the upstream's ``/mcp`` an MCP server with per-role ``mcpAuthorization``."""
    allowed = " ||\n          ".join(f'mcp.tool.name.startsWith("{p}")' for p in MCP_ALLOWED_PREFIXES)
    return f"""mcp:
  servers:
  - name: {MCP_SERVER}
    hosts: ["{upstream_hostport(upstream_port)}"]
    path: /mcp
    mcpAuthorization:
      rules:
      - >-
        jwt.agent_role == "{BENCH_ROLE}" && (
          {allowed}
        )
      - >-
        jwt.agent_role == "cloud" && (
          mcp.tool.name.startsWith("terraform") || mcp.tool.name.startsWith("kubectl") ||
          mcp.tool.name.startsWith("istioctl") || mcp.tool.name.startsWith("helm")
        )
      - >-
        jwt.agent_role == "network" && (
          mcp.tool.name.startsWith("dig") || mcp.tool.name.startsWith("traceroute") ||
          mcp.tool.name.startsWith("tcpdump")
        )
      - id: {MCP_SERVER}.not-agent-infra
        deny: >-
          mcp.tool.arguments.exists(k, type(mcp.tool.arguments[k]) == string &&
            mcp.tool.arguments[k].contains("agent-infra"))
        reason: agent-infra hosts fleetgate itself; no tool call may name it
"""


def _loads(workdir: Path, text: str) -> bool:
    from fleetgate.policy.loader import PolicyError, load_policy

    probe = workdir / "section-probe.yaml"
    probe.write_text(text)
    try:
        load_policy(probe)
        return True
    except PolicyError:
        return False
    finally:
        probe.unlink()


def supports_llm_section(workdir: Path) -> bool:
    """Whether this fleetgate tree accepts the rules' ``llm:`` section (LLM metering)."""
    return _loads(workdir, small_policy(443, llm=True, mcp=False))


def supports_mcp_section(workdir: Path) -> bool:
    """Whether this fleetgate tree accepts the rules' ``mcp:`` section (MCP governance)."""
    return _loads(workdir, small_policy(443, llm=False, mcp=True))


def supports_limits_section(workdir: Path) -> bool:
    """Whether this fleetgate tree accepts a profile's ``policies: {localRateLimit: [...]}``."""
    return _loads(workdir, small_policy(443, llm=False, mcp=False, limits=True))


# Scenario (a)'s "fleetgate with rate limits": the seed's security route (rules/fleet.yaml:
# `type: tokens` and `type: requests`, fillInterval 1m) with buckets so large that no request of
# the run is ever refused, so every chat call takes from two buckets of its agent's own (a token
# reservation settled to the metered usage, and a request count) and the difference to plain
# fleetgate is what the limiter costs, never what a refusal saves.
LIMIT_SIZE = 10**9
LIMIT_FILL = "1m"
LIMIT_TYPES = ("tokens", "requests")


def limits_block() -> str:
    """The bench profile's ``policies:`` block (indented for a profile entry)."""
    return "  policies:\n    localRateLimit:\n" + "".join(
        f"    - maxTokens: {LIMIT_SIZE}\n      tokensPerFill: {LIMIT_SIZE}\n"
        f"      fillInterval: {LIMIT_FILL}\n      type: {kind}\n" for kind in LIMIT_TYPES)


def small_policy(upstream_port: int, llm: bool = False, mcp: bool = True, limits: bool = False) -> str:
    """What the gateway runs in scenarios (a)-(f): the seed's global deny rules, four decoy
    profiles like rules/fleet.yaml's specialists, the ``bench`` profile the agents match (egress
    to the upstream by name, ``localhost:<port>``; ``allowPrivate`` admits the one address that
    name resolves to, 127.0.0.1, as a private upstream must be admitted in production),
    (``llm``) the upstream declared as an LLM provider and (``mcp``) its ``/mcp`` declared as
    an MCP server whose rules let the bench agents use 120 of its 1,000 tools; (``limits``) the
    bench profile with :func:`limits_block`, for scenario (a)'s rate-limit variant only."""
    up = upstream_hostport(upstream_port)
    decoys = "".join(f"""- name: {role}
  match: 'jwt.agent_role == "{role}"'
  egress:
    hosts: [api.anthropic.com, api.openai.com, "*.{role}.example.com"]
  authorization:
    rules:
    - allow: 'request.method in ["GET", "POST"]'
    - hosts: ["*.{role}.example.com"]
      require: 'request.method == "GET"'
""" for role in ("coordinator", "security", "network", "cloud"))
    return f"""apiVersion: fleetgate/v1
kind: Policy
metadata: {{name: bench}}
destinations:
  allowPrivate: ["127.0.0.1/32"]
{SEED_DENY}agents:
{decoys}- name: {BENCH_ROLE}
  match: 'jwt.agent_role == "{BENCH_ROLE}"'
{limits_block() if limits else ""}  egress:
    hosts: ["{up}", api.openai.com]
  authorization:
    rules:
    - id: bench.no-admin
      deny: 'request.path.startsWith("/admin")'
      reason: agents never call admin APIs
    - id: bench.llm
      allow: 'request.method == "POST" && request.path in ["/v1/chat/completions", "/mcp"]'
    - id: bench.download
      allow: 'request.method == "GET" && request.path.startsWith("/download/")'
""" + (llm_section(upstream_port) if llm else "") + (mcp_section(upstream_port) if mcp else "")


RULES_PER_AGENT = 5


def scale_agent_id(i: int) -> str:
    return f"agent-{i:04d}"


def scale_policy(upstream_port: int, agents: int = 1000, variant: int = 0, llm: bool = False) -> str:
    """``agents`` profiles, each selecting one ``jwt.agent_id`` and carrying 5 rules (deny,
    host-scoped require, deny on a header, two allows): 1,000 agents -> 5,000 rules, plus the
    seed's 3 global deny rules. ``variant`` changes one reason so a rewrite is a new revision."""
    up = upstream_hostport(upstream_port)
    out = [f"""apiVersion: fleetgate/v1
kind: Policy
metadata: {{name: bench-scale, variant: {variant}}}
destinations:
  allowPrivate: ["127.0.0.1/32"]
{llm_section(upstream_port) if llm else ""}{SEED_DENY}agents:
"""]
    for i in range(agents):
        a = scale_agent_id(i)
        reason = f"{a} never calls admin APIs" + (f" (v{variant})" if i == 0 else "")
        out.append(f"""- name: {a}
  match: 'jwt.agent_id == "{a}"'
  egress:
    hosts: ["{up}", api-{i:04d}.example.com, "*.tools-{i:04d}.example.com"]
  authorization:
    rules:
    - id: {a}.no-admin
      deny: 'request.path.startsWith("/admin")'
      reason: {json.dumps(reason)}
    - id: {a}.tools-read-only
      hosts: ["*.tools-{i:04d}.example.com"]
      require: 'request.method == "GET"'
    - id: {a}.no-debug
      deny: '"x-debug-override" in request.headers'
    - id: {a}.llm
      allow: 'request.method == "POST" && request.path in ["/v1/chat/completions", "/mcp"]'
    - id: {a}.download
      allow: 'request.method == "GET" && request.path.startsWith("/download/")'
""")
    return "".join(out)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` in one rename, as an editor's save or a ConfigMap swap does."""
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
