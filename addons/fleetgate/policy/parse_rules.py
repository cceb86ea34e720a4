"""The HTTP side of the rules: ``authorization: {rules: [...]}`` and ``destinations``.

A rule is one of ``allow``/``deny``/``require`` with a CEL expression over ``jwt``,
``request``, ``llm`` and ``a2a`` (:data:`REQUEST_ROOTS`), an optional ``id``, ``reason`` and
``hosts`` (the destinations it applies to). Rule ids are unique across every file and
shared with the MCP rules (:mod:`fleetgate.policy.parse_mcp`): both go to one decision log.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fleetgate.celexpr import CelError, compile_expr
from fleetgate.netaddr import HostPattern, IPNetwork, parse_networks
from fleetgate.policy.report import Ids, Reporter, as_list, check_keys, str_list
from fleetgate.policy.schema import keys
from fleetgate.rule import Effect, Mode, Rule, parse_mode

__all__ = ["REQUEST_ROOTS", "mode_of", "parse_authorization", "parse_destinations", "parse_rule",
           "parse_rules_section"]

REQUEST_ROOTS = ("jwt", "request", "llm", "a2a")
_RULE_KEYS = keys("Rule")


def parse_rules_section(node: Any, where: str, report: Reporter, *,
                        build: Callable[[Any, str, int], Rule | None],
                        section: str = "Authorization") -> list[Rule]:
    """``{rules: [...]}``, each entry built by ``build(entry, key path, index)``; ``section``:
    its object in :data:`fleetgate.policy.schema.MODEL` (the keys it accepts)."""
    if not isinstance(node, dict):
        report.error(where, "must be a mapping with a 'rules' list")
        return []
    check_keys(node, where, keys(section), report)
    rules = []
    for i, entry in enumerate(as_list(node.get("rules"), f"{where}.rules", report)):
        rule = build(entry, f"{where}.rules[{i}]", i)
        if rule is not None:
            rules.append(rule)
    return rules


def parse_authorization(node: Any, where: str, report: Reporter, *, owner: str,
                        ids: Ids) -> list[Rule]:
    """An ``authorization`` section; default rule ids are ``<owner>.authorization[<i>]``."""
    return parse_rules_section(node, where, report, build=lambda entry, at, i: parse_rule(
        entry, at, report, default_id=f"{owner}.authorization[{i}]", ids=ids))


def parse_rule(node: Any, where: str, report: Reporter, *, default_id: str,
               ids: Ids) -> Rule | None:
    """One rule: a mapping, or a bare CEL string (agentgateway style: it allows)."""
    if isinstance(node, str):
        node = {"allow": node}
    if not isinstance(node, dict):
        report.error(where, "a rule is a mapping with one of allow/deny/require")
        return None
    check_keys(node, where, _RULE_KEYS, report)
    effects = [e for e in Effect if e.value in node]
    if len(effects) != 1:
        report.error(where, "a rule needs exactly one of 'allow', 'deny', 'require'")
        return None
    effect = effects[0]
    if isinstance(node[effect.value], bool):  # `allow: true` in plain YAML
        node = {**node, effect.value: "true" if node[effect.value] else "false"}
    rule_id = node.get("id", default_id)
    if not isinstance(rule_id, str) or not rule_id:
        report.error(f"{where}.id", "id must be a non-empty string")
        return None
    first = ids.claim(rule_id, report.source(where))
    if first is not None:
        report.error(f"{where}.id", f"duplicate rule id {rule_id!r} (first at {first})")
        return None
    reason = node.get("reason")
    if reason is not None and not isinstance(reason, str):
        report.error(f"{where}.reason", "reason must be a string")
    hosts = host_patterns(node.get("hosts"), f"{where}.hosts", report)
    mode = mode_of(node, where, report)
    try:
        expr = compile_expr(node[effect.value], REQUEST_ROOTS)
    except CelError as exc:
        report.error(f"{where}.{effect.value}", f"CEL: {exc}")
        return None
    return Rule(id=rule_id, effect=effect, expr=expr,
                reason=reason if isinstance(reason, str) else None, source=report.source(where),
                hosts=tuple(hosts), mode=mode)


def mode_of(node: dict[str, Any], where: str, report: Reporter,
            default: Mode = Mode.ENFORCE) -> Mode:
    """The optional ``mode: enforce | report`` of a rule, profile, limit, budget, MCP server
    or trigger (``default`` when absent: a profile's rules inherit the profile's)."""
    if "mode" not in node:
        return default
    try:
        return parse_mode(node["mode"])
    except ValueError as exc:
        report.error(f"{where}.mode", str(exc))
        return default


def host_patterns(node: Any, where: str, report: Reporter, *,
                  cidr: bool = True) -> list[HostPattern]:
    """A list of destinations (``host``, ``*.domain``, ``host:port``, with ``cidr`` a CIDR)."""
    out: list[HostPattern] = []
    for i, host in enumerate(str_list(node, where, report)):
        try:
            out.append(HostPattern(host, cidr=cidr))
        except ValueError as exc:
            report.error(f"{where}[{i}]", str(exc))
    return out


def parse_destinations(node: Any, where: str, report: Reporter) -> list[IPNetwork] | None:
    """``destinations: {allowPrivate: [CIDR, ...]}``: private networks rules may reach."""
    if node is None:
        return None
    if not isinstance(node, dict):
        report.error(where, "destinations must be a mapping")
        return None
    check_keys(node, where, keys("Destinations"), report)
    out: list[IPNetwork] = []
    for i, cidr in enumerate(str_list(node.get("allowPrivate"), f"{where}.allowPrivate", report)):
        try:
            out.extend(parse_networks([cidr]))
        except ValueError as exc:
            report.error(f"{where}.allowPrivate[{i}]", str(exc))
    return out
