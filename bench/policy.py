"""Rules the benchmark runs fleetgate with: a small realistic policy, and the 1,000-agent /
5,000-rule policy of scenario (g). Both use the dialect in README.md ("Rules reference").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

BENCH_ROLE = "bench"

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
    hosts: ["127.0.0.1:{upstream_port}"]
  pricing:
    models:
      bench-model: {{input: 1.0, output: 2.0}}
"""


def supports_llm_section(workdir: Path) -> bool:
    """Whether this fleetgate tree accepts the rules' ``llm:`` section (LLM metering)."""
    from fleetgate.policy.loader import PolicyError, load_policy

    probe = workdir / "llm-probe.yaml"
    probe.write_text(small_policy(443, llm=True))
    try:
        load_policy(probe)
        return True
    except PolicyError:
        return False
    finally:
        probe.unlink()


def small_policy(upstream_port: int, llm: bool = False) -> str:
    """What the gateway runs in scenarios (a)-(f): the seed's global deny rules, four decoy
    profiles like rules/fleet.yaml's specialists, the ``bench`` profile the agents match, and
    (``llm``) the upstream declared as an LLM provider."""
    up = f"127.0.0.1:{upstream_port}"
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
  egress:
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
""" + (llm_section(upstream_port) if llm else "")


RULES_PER_AGENT = 5


def scale_agent_id(i: int) -> str:
    return f"agent-{i:04d}"


def scale_policy(upstream_port: int, agents: int = 1000, variant: int = 0, llm: bool = False) -> str:
    """``agents`` profiles, each selecting one ``jwt.agent_id`` and carrying 5 rules (deny,
    host-scoped require, deny on a header, two allows): 1,000 agents -> 5,000 rules, plus the
    seed's 3 global deny rules. ``variant`` changes one reason so a rewrite is a new revision."""
    up = f"127.0.0.1:{upstream_port}"
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
