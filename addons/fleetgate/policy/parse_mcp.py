"""The MCP side of the rules: ``mcpAuthorization``, capability lists and ``mcp.servers``.

The rules themselves compile in :mod:`fleetgate.mcp.policy` (which needs nothing from the
policy package); here they get their ids checked (unique across every file, shared with the
HTTP rules), their origin (``file:line``) and their place in the document.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from fleetgate.mcp.mode import McpMode
from fleetgate.mcp.policy import compile_capability, compile_mcp_entry
from fleetgate.policy.model import McpServer
from fleetgate.policy.parse_rules import host_patterns, mode_of, parse_rules_section
from fleetgate.policy.report import Ids, Reporter, as_list, check_keys, str_list
from fleetgate.policy.schema import keys
from fleetgate.rule import Mode, Rule

__all__ = ["McpSection", "compile_registered", "parse_capabilities", "parse_mcp",
           "parse_mcp_authorization"]

_SERVER_KEYS = keys("McpServer")


def compile_registered(rule_id: str, where: str, report: Reporter, ids: Ids,
                       build: Callable[[str], Rule]) -> Rule | None:
    """Build one MCP rule with ``build(rule_id)``, record its id, report its problems."""
    try:
        rule = build(rule_id)
    except ValueError as exc:
        report.error(where, str(exc))
        return None
    first = ids.claim(rule.id, report.source(where))
    if first is not None:
        report.error(where, f"duplicate rule id {rule.id!r} (first at {first})")
        return None
    return replace(rule, source=report.source(where))


def parse_mcp_authorization(node: Any, where: str, report: Reporter, *, owner: str,
                            ids: Ids) -> list[Rule]:
    """The seed's ``mcpAuthorization: rules: [...]``: CEL strings allow; fleetgate adds
    ``{deny: CEL}`` entries (argument-aware exceptions) with optional id and reason."""
    def build(entry: Any, at: str, i: int) -> Rule | None:
        # keys first (with "did you mean"); an entry with neither allow nor deny is
        # explained by compile_mcp_entry ("a rule is a CEL string, or ... allow or deny")
        if isinstance(entry, dict) and {"allow", "deny"} & set(entry) \
                and not check_keys(entry, at, keys("McpRule"), report):
            return None
        return compile_registered(f"{owner}.mcpAuthorization[{i}]", at, report, ids,
                                  lambda rid: compile_mcp_entry(entry, rid))

    return parse_rules_section(node, where, report, build=build, section="McpAuthorization")


def parse_capabilities(node: dict[str, Any], where: str, report: Reporter, *, owner: str,
                       ids: Ids) -> list[Rule]:
    """A profile's ``allowed_tools`` / ``denied_tools`` globs, as allow / deny rules."""
    rules = []
    for kind in ("allowed_tools", "denied_tools"):
        for i, pattern in enumerate(str_list(node.get(kind), f"{where}.{kind}", report)):
            rule = compile_registered(
                f"{owner}.{kind}[{i}]", f"{where}.{kind}[{i}]", report, ids,
                partial(compile_capability, kind, pattern))
            if rule is not None:
                rules.append(rule)
    return rules


@dataclass(frozen=True)
class McpSection:
    """One document's ``mcp`` section; ``None``: the key is not set in this file."""

    servers: tuple[McpServer, ...] = ()
    reveal_denied: bool | None = None
    detect: bool | None = None


def parse_mcp(node: Any, where: str, report: Reporter, *, ids: Ids,
              names: set[str]) -> McpSection | None:
    """``mcp: {servers, revealDenied, detect}``. ``names``: server names already declared
    (by other files); this file's are added."""
    if node is None:
        return None
    if not isinstance(node, dict):
        report.error(where, "mcp must be a mapping with 'servers', 'revealDenied', 'detect'")
        return None
    check_keys(node, where, keys("Mcp"), report)
    flags: dict[str, bool] = {}
    for key in ("revealDenied", "detect"):
        if key in node:
            if isinstance(node[key], bool):
                flags[key] = node[key]
            else:
                report.error(f"{where}.{key}", f"{key} must be true or false")
    servers = []
    for i, entry in enumerate(as_list(node.get("servers"), f"{where}.servers", report)):
        server = parse_server(entry, f"{where}.servers[{i}]", report, ids=ids, names=names)
        if server is not None:
            servers.append(server)
    return McpSection(tuple(servers), flags.get("revealDenied"), flags.get("detect"))


def parse_server(node: Any, where: str, report: Reporter, *, ids: Ids,
                 names: set[str]) -> McpServer | None:
    """One ``mcp.servers[]`` entry: an MCP endpoint, how its tools are vetted, its rules."""
    if not isinstance(node, dict):
        report.error(where, "a server is a mapping {name, hosts, path, poisoning, pins, "
                     "mcpAuthorization}")
        return None
    check_keys(node, where, _SERVER_KEYS, report)
    name = node.get("name")
    if not isinstance(name, str) or not name.strip():
        report.error(f"{where}.name", "every MCP server needs a 'name'")
        return None
    if name in names:
        report.error(f"{where}.name", f"duplicate MCP server name {name!r}")
        return None
    names.add(name)
    hosts = host_patterns(node.get("hosts"), f"{where}.hosts", report, cidr=False)
    if not hosts:
        report.error(f"{where}.hosts", "an MCP server needs at least one host")
    mpath = node.get("path", "")
    if not isinstance(mpath, str) or (mpath and not mpath.startswith("/")):
        report.error(f"{where}.path", "path must be a path prefix starting with '/'")
        mpath = ""
    modes: dict[str, McpMode] = {}
    for key in ("poisoning", "pins"):
        try:
            modes[key] = McpMode(node.get(key, "enforce"))
        except ValueError:
            report.error(f"{where}.{key}", f"{key} must be one of enforce, report, off")
            modes[key] = McpMode.ENFORCE
    rules = (parse_mcp_authorization(node["mcpAuthorization"], f"{where}.mcpAuthorization",
                                     report, owner=name, ids=ids)
             if "mcpAuthorization" in node else [])
    mode = mode_of(node, where, report)
    if mode is Mode.REPORT:  # every rule of a report-mode server reports
        rules = [replace(r, mode=mode) for r in rules]
    return McpServer(name=name, hosts=tuple(hosts), path=mpath, poisoning=modes["poisoning"],
                     pins=modes["pins"], rules=tuple(rules), source=report.source(where),
                     mode=mode)
