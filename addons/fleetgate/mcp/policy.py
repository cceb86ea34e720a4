"""``mcpAuthorization``: which tools, prompts and resources an agent may see and use.

The seed's dialect, verbatim: a list of CEL expressions, each one an allow rule
(``- 'jwt.agent_role == "security" && mcp.tool.name.startsWith("nmap")'``). fleetgate adds
``- deny: '<CEL>'`` entries, for argument-aware exceptions (the cloud agent's ``kubectl`` in
every namespace but ``agent-infra``), and seed 004's capability lists (``allowed_tools`` /
``denied_tools``, glob patterns) as a shorthand compiled to the same rules.

Deny by default. Two questions, one rule set:

* :func:`may_call` — at call time (``tools/call``, ``prompts/get``, ``resources/read``...):
  any deny that is true or errors denies; otherwise an allow must be true.
* :func:`may_list` — for a list result entry, when the call's arguments are not known yet:
  a deny that is true hides the entry; a deny that cannot be judged without arguments
  (an evaluation error) is left to call time; an allow must be true.

Report mode (``mode: report`` on a rule, or on its server or profile): a report-mode deny
that is true (or errors, at call time) is recorded in :attr:`McpVerdict.would_deny` and the
next rule decides; it never hides a list entry. A report-mode allow grants only when every
rule in force is report-mode; then ``mcp.default-deny`` is reported too, and the call is
allowed as ``report-mode``. With no rule at all, the default deny is enforced.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fleetgate.celexpr import Activation, CelError, Expr, compile_expr, rename_fields
from fleetgate.rule import Effect, Mode, Rule, WouldDeny, parse_mode

__all__ = ["MCP_ROOTS", "McpVerdict", "compile_capability", "compile_mcp_entry", "compile_mcp_rules",
           "glob_to_cel", "may_call", "may_deny", "may_list"]

MCP_ROOTS = ("jwt", "request", "mcp")

# List filtering judges up to thousands of entries per answer. Each rule also gets a variant
# reading the entry's name from a plain string variable, so only that string is converted
# per entry (~2 µs) instead of the whole ``mcp`` map (~40 µs).
LIST_VARS = {"mcp.tool.name": "__tool_name", "mcp.prompt.name": "__prompt_name",
             "mcp.resource.uri": "__resource_uri"}
# after renaming, any other way to reach those fields makes the variant unsafe
_LIST_UNSAFE = re.compile(r"\bmcp\b(?!\s*\.)|\bmcp\s*\.\s*(tool|prompt|resource)\b"
                          r"(?!\s*\.\s*arguments\b)")


def list_variant(source: str) -> Expr | None:
    """The list-filtering form of an MCP rule, or ``None`` (then the full facts are used)."""
    text = rename_fields(source, LIST_VARS, _LIST_UNSAFE)
    if text is None:
        return None
    try:
        return compile_expr(text, (*MCP_ROOTS, *LIST_VARS.values()))
    except CelError:
        return None


@dataclass(frozen=True)
class McpVerdict:
    allow: bool
    rule: str
    reason: str
    would_deny: tuple[WouldDeny, ...] = ()


def glob_to_cel(pattern: str) -> str:
    """``nmap*`` -> ``mcp.tool.name.startsWith("nmap")``; other globs become a full regex."""
    if not pattern or any(c in pattern for c in "\n\r"):
        raise ValueError(f"bad tool pattern {pattern!r}")
    lit = json.dumps  # a CEL string literal is a JSON string literal for these characters
    if "*" not in pattern and "?" not in pattern:
        return f"mcp.tool.name == {lit(pattern)}"
    if pattern.endswith("*") and "*" not in pattern[:-1] and "?" not in pattern:
        return f"mcp.tool.name.startsWith({lit(pattern[:-1])})"
    rx = "^" + "".join(".*" if c == "*" else "." if c == "?" else re.escape(c)
                       for c in pattern) + "$"
    return f"mcp.tool.name.matches({lit(rx)})"


def compile_mcp_entry(entry: Any, rule_id: str) -> Rule:
    """One ``mcpAuthorization.rules`` entry: a CEL string (allow), or a mapping with
    ``allow`` or ``deny`` (+ optional ``id``, ``reason``). Raises ``ValueError``."""
    mode = Mode.ENFORCE
    if isinstance(entry, str):
        effect, source, reason = Effect.ALLOW, entry, None
    elif isinstance(entry, Mapping) and len({"allow", "deny"} & set(entry)) == 1:
        effect = Effect.ALLOW if "allow" in entry else Effect.DENY
        source = entry[effect.value]
        if isinstance(source, bool):  # `allow: true` in plain YAML
            source = "true" if source else "false"
        rule_id = str(entry.get("id", rule_id))
        reason = entry.get("reason") if isinstance(entry.get("reason"), str) else None
        unknown = set(entry) - {"allow", "deny", "id", "reason", "mode"}
        if unknown:
            raise ValueError(f"{rule_id}: unknown key(s) {sorted(unknown)}; expected allow or "
                             "deny, id, reason, mode")
        try:
            mode = parse_mode(entry.get("mode", "enforce"))
        except ValueError as exc:
            raise ValueError(f"{rule_id}: {exc}") from None
    else:
        raise ValueError(f"{rule_id}: a rule is a CEL string, or a mapping with 'allow' or 'deny'")
    try:
        expr = compile_expr(str(source), MCP_ROOTS)
    except CelError as exc:
        raise ValueError(f"{rule_id}: CEL: {exc}") from None
    return Rule(rule_id, effect, expr, reason, list_expr=list_variant(expr.source), mode=mode)


def compile_capability(kind: str, pattern: str, rule_id: str, match: str | None = None) -> Rule:
    """One ``allowed_tools`` / ``denied_tools`` glob as an allow / deny rule."""
    effect = {"allowed_tools": Effect.ALLOW, "denied_tools": Effect.DENY}[kind]
    scope = f"({match}) && " if match else ""
    try:
        expr = compile_expr(f"{scope}{glob_to_cel(str(pattern))}", MCP_ROOTS)
    except CelError as exc:
        raise ValueError(f"{rule_id}: CEL: {exc}") from None
    return Rule(rule_id, effect, expr, f"tool pattern {pattern!r} in {kind}",
                list_expr=list_variant(expr.source))


def compile_mcp_rules(owner: str, entries: Iterable[Any], allowed_tools: Iterable[str] = (),
                      denied_tools: Iterable[str] = (), match: str | None = None) -> list[Rule]:
    """Compile one ``mcpAuthorization.rules`` list (plus capability lists) into rules.

    ``match``: a selector ANDed into the capability-list rules, for use outside an agent
    profile. Raises ``ValueError`` naming the entry.
    """
    rules = [compile_mcp_entry(e, f"{owner}.mcpAuthorization[{i}]") for i, e in enumerate(entries)]
    for kind, patterns in (("allowed_tools", allowed_tools), ("denied_tools", denied_tools)):
        rules.extend(compile_capability(kind, p, f"{owner}.{kind}[{i}]", match)
                     for i, p in enumerate(patterns))
    return rules


def all_report(rules: list[Rule]) -> bool:
    """Every rule in force is report-mode: the default deny is reported, not enforced."""
    return bool(rules) and all(r.report for r in rules)


def may_call(rules: Iterable[Rule], activation: Activation | Mapping[str, Any]) -> McpVerdict:
    """Judge a call whose target and arguments are known."""
    act = activation if isinstance(activation, Activation) else Activation(activation)
    rules = list(rules)
    would: list[WouldDeny] = []
    for r in rules:
        if r.effect is Effect.DENY:
            try:
                hit = r.expr.evaluate(act)
                reason = r.reason or f"denied by {r.id}"
            except CelError as exc:
                hit, reason = True, f"deny rule could not be evaluated ({exc})"
            if not hit:
                continue
            if r.report:
                would.append(WouldDeny(r.id, reason))
                continue
            return McpVerdict(False, r.id, reason, tuple(would))
    reporting = all_report(rules)
    allowed_by = _first_allow(rules, act, granting=reporting)
    if allowed_by is not None:
        return McpVerdict(True, allowed_by.id, "allowed", tuple(would))
    why = "no mcpAuthorization rule allows it"
    if reporting:
        would.append(WouldDeny("mcp.default-deny", why))
        return McpVerdict(True, "report-mode", "allowed: only report-mode rules apply and "
                          "they would deny it", tuple(would))
    return McpVerdict(False, "mcp.default-deny", why, tuple(would))


def _first_true(rules: Iterable[Rule], effect: Effect, act: Activation,
                listing: bool = False, report: bool = False) -> Rule | None:
    """The first rule of ``effect`` whose expression is true; one that fails to evaluate is
    skipped (an allow that errors does not allow; a deny that errors on a protocol message or
    a list entry reads a call's fields and is judged at call time). ``report``: report-mode
    rules count too (otherwise they are skipped: they never hide nor grant)."""
    for r in rules:
        if r.effect is effect and (report or not r.report):
            expr = r.list_expr if listing and r.list_expr is not None else r.expr
            try:
                if expr.evaluate(act):
                    return r
            except CelError:
                continue
    return None


def _first_allow(rules: list[Rule], act: Activation, listing: bool = False,
                 granting: bool = False) -> Rule | None:
    """``granting``: report-mode allows grant (every rule in force is report-mode)."""
    return _first_true(rules, Effect.ALLOW, act, listing, report=granting)


def fast_listing(rules: Iterable[Rule]) -> bool:
    """Whether every rule has a list variant (see :data:`LIST_VARS`)."""
    return all(r.list_expr is not None for r in rules)


def may_list(rules: Iterable[Rule], activation: Activation | Mapping[str, Any],
             listing: bool = False) -> bool:
    """Whether a list entry is shown: some allow is true and no deny is surely true.
    Report-mode denies never hide an entry (the call is reported when it is made).

    ``listing``: evaluate the rules' list variants (the activation then holds the entry's
    name in the :data:`LIST_VARS` variables; every rule must have a variant)."""
    act = activation if isinstance(activation, Activation) else Activation(activation)
    rules = list(rules)
    if _first_true(rules, Effect.DENY, act, listing) is not None:
        return False
    reporting = all_report(rules)
    return reporting or _first_allow(rules, act, listing, granting=reporting) is not None


def may_deny(rules: Iterable[Rule], activation: Activation) -> McpVerdict:
    """Methods that act on no tool, prompt or resource (``initialize``, ``ping``, list calls,
    notifications): allowed unless a deny rule is true. A deny rule that cannot be evaluated
    here reads a call's fields (``mcp.tool.arguments``...) and is about calls, not these."""
    would: list[WouldDeny] = []
    for r in rules:
        if r.effect is not Effect.DENY:
            continue
        try:
            hit = r.expr.evaluate(activation)
        except CelError:
            continue
        if not hit:
            continue
        if r.report:
            would.append(WouldDeny(r.id, r.reason or f"denied by {r.id}"))
            continue
        return McpVerdict(False, r.id, r.reason or f"denied by {r.id}", tuple(would))
    return McpVerdict(True, "mcp.protocol", "protocol message", tuple(would))
