"""``agents: [...]`` (agent profiles) and ``revoked`` (identities refused outright).

A profile selects identities with a CEL ``match`` over ``jwt`` and carries what they may
do: egress hosts, authorization rules, MCP rules and capability lists, rate limits and
budgets, each read by its own domain's parser with the profile's name as the owner of the
default ids (``<name>.authorization[0]``...).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fleetgate.celexpr import CelError, compile_expr
from fleetgate.netaddr import HostPattern
from fleetgate.policy.model import AgentProfile, Capture, Revocations
from fleetgate.policy.parse_budgets import parse_budgets
from fleetgate.policy.parse_limits import parse_policies
from fleetgate.policy.parse_mcp import parse_capabilities, parse_mcp_authorization
from fleetgate.policy.parse_rules import host_patterns, mode_of, parse_authorization
from fleetgate.policy.report import IdSpaces, Reporter, check_keys, str_list
from fleetgate.policy.schema import keys
from fleetgate.rule import Mode

__all__ = ["MATCH_ROOTS", "parse_agent", "parse_revoked"]

MATCH_ROOTS = ("jwt",)
_AGENT_KEYS = keys("Agent")
_CAPTURE_MAX = 1 << 20  # a span attribute past 1 MiB is a collector's problem, not insight


def parse_agent(node: Any, where: str, report: Reporter, *, ids: IdSpaces) -> AgentProfile | None:
    """One ``agents[]`` entry."""
    if not isinstance(node, dict):
        report.error(where, "an agent profile must be a mapping")
        return None
    check_keys(node, where, _AGENT_KEYS, report)
    name = node.get("name")
    if not isinstance(name, str) or not name:
        report.error(f"{where}.name", "every agent profile needs a 'name'")
        return None
    first = ids.agents.claim(name, report.source(where))
    if first is not None:
        report.error(f"{where}.name", f"duplicate agent name {name!r} (first at {first})")
        return None
    try:
        match = compile_expr(node.get("match", ""), MATCH_ROOTS)
    except CelError as exc:
        report.error(f"{where}.match", f"CEL: {exc}")
        return None
    egress: list[HostPattern] = []
    eg = node.get("egress", {})
    if not isinstance(eg, dict):
        report.error(f"{where}.egress", "egress must be a mapping with a 'hosts' list")
    else:
        check_keys(eg, f"{where}.egress", keys("Egress"), report)
        egress = host_patterns(eg.get("hosts"), f"{where}.egress.hosts", report)
    rules = (parse_authorization(node["authorization"], f"{where}.authorization", report,
                                 owner=name, ids=ids.rules)
             if "authorization" in node else [])
    mcp_rules = (parse_mcp_authorization(node["mcpAuthorization"], f"{where}.mcpAuthorization",
                                         report, owner=name, ids=ids.rules)
                 if "mcpAuthorization" in node else [])
    mcp_rules += parse_capabilities(node, where, report, owner=name, ids=ids.rules)
    limits = (parse_policies(node["policies"], f"{where}.policies", report, owner=name,
                             ids=ids.limits)
              if "policies" in node else [])
    budgets = (parse_budgets(node["budgets"], f"{where}.budgets", report, owner=name,
                             ids=ids.limits)
               if "budgets" in node else [])
    capture = (parse_telemetry(node["telemetry"], f"{where}.telemetry", report)
               if "telemetry" in node else None)
    mode = mode_of(node, where, report)
    if mode is Mode.REPORT:  # every element of a report-mode profile reports, none enforces
        rules = [replace(r, mode=mode) for r in rules]
        mcp_rules = [replace(r, mode=mode) for r in mcp_rules]
        limits = [replace(lim, mode=mode) for lim in limits]
        budgets = [replace(b, mode=mode) for b in budgets]
    return AgentProfile(name=name, match=match, egress=tuple(egress), rules=tuple(rules),
                        source=report.source(where), mcp_rules=tuple(mcp_rules),
                        limits=tuple(limits), budgets=tuple(budgets), capture=capture,
                        mode=mode)


def parse_telemetry(node: Any, where: str, report: Reporter) -> Capture | None:
    """``telemetry: {capture: [prompts, completions] | true, maxBytes: 4096}``: which LLM
    contents the traces of this profile's agents carry (nothing unless asked)."""
    if not isinstance(node, dict):
        report.error(where, "telemetry must be a mapping such as {capture: [prompts, "
                     "completions], maxBytes: 4096}")
        return None
    check_keys(node, where, keys("Telemetry"), report)
    raw = node.get("capture", False)
    if raw is True:
        parts = {"prompts", "completions"}
    elif raw is False or raw is None:
        parts = set()
    else:
        parts = set(str_list(raw, f"{where}.capture", report))
        unknown = parts - {"prompts", "completions"}
        if unknown:
            report.error(f"{where}.capture", f"unknown capture {sorted(unknown)}: use "
                         "'prompts', 'completions', true or false")
            return None
    size = node.get("maxBytes", 4096)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= _CAPTURE_MAX:
        report.error(f"{where}.maxBytes", f"maxBytes must be an integer from 1 to {_CAPTURE_MAX}")
        return None
    if not parts:
        return None
    return Capture(prompts="prompts" in parts, completions="completions" in parts,
                   max_bytes=size)


def parse_revoked(node: Any, where: str, report: Reporter) -> Revocations | None:
    """``revoked: {agents, tokens, roles, sessions}``: refused whatever else the rules say."""
    if node is None:
        return None
    if not isinstance(node, dict):
        report.error(where, "revoked must be a mapping with 'agents', 'tokens', 'roles' "
                     "and/or 'sessions'")
        return None
    check_keys(node, where, keys("Revoked"), report)
    return Revocations(*(frozenset(str_list(node.get(k), f"{where}.{k}", report))
                         for k in ("agents", "tokens", "roles", "sessions")))
