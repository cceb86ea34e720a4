"""The rules format, described once: every object's keys, their types, enums and meaning.

This is the one place a key of the rules YAML is declared. The parsers take their allowed
keys from it (``keys("Rule")`` is what :func:`~fleetgate.policy.report.check_keys` accepts
for a rule), :func:`json_schema` turns it into the JSON Schema editors use
(``fleetgate rules schema``, committed as ``rules/fleetgate-rules.schema.json``), and the
lint (:mod:`fleetgate.policy.lint`) walks a document along it to find the CEL expressions
and host lists it checks. A key added here appears in all three; a key a parser reads but
that is missing here is refused by that parser as unknown, so the two cannot drift apart
silently.

**Adding a key**: add a :class:`Field` to its object in :data:`MODEL` (``"mode":
Field("enforce or report: ...", enum=("enforce", "report"))``), read it in the parser,
then run ``fleetgate rules schema > rules/fleetgate-rules.schema.json`` (a test fails until
the committed schema matches).

The schema describes shapes, not everything the loader checks (unique ids, CEL that
compiles, a duration that parses): it is for editors. The loader stays the judge.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fleetgate.kill.model import Verb
from fleetgate.kill.triggers import Metric
from fleetgate.limits.bucket import LimitKind
from fleetgate.limits.budget import Period
from fleetgate.llm.providers import APIS
from fleetgate.mcp.mode import McpMode
from fleetgate.rule import Mode

__all__ = ["MODEL", "STANDARD_CLAIMS", "Field", "Obj", "json_schema", "keys",
           "schema_text"]

# The claims the gateway itself reads or that every JWT may carry (RFC 7519 registered
# claims): what `jwt.X` is checked against when the rules declare no `claims:` list.
STANDARD_CLAIMS = ("sub", "agent_id", "agent_role", "session_id", "sid", "user",
                   "parent_session", "root_session", "iss", "aud", "exp", "iat", "nbf", "jti",
                   "scope", "scopes", "groups")


@dataclass(frozen=True)
class Field:
    """One key: its JSON types, meaning, and what the lint does with its value.

    ``ref``: the value is the object of that name in :data:`MODEL`; ``items``: the value is a
    list of these; ``values``: a map with free keys (model names, role names) and these
    values; ``any_of``: one of these shapes. ``cel``: the value is a CEL expression
    (``"rule"``), or a profile selector (``"selector"``: the lint warns about unguarded
    claims); ``hosts``: the value lists host patterns.
    """

    doc: str
    type: tuple[str, ...] = ("string",)
    required: bool = False
    enum: tuple[Any, ...] = ()
    ref: str | None = None
    items: Field | None = None
    values: Field | None = None
    any_of: tuple[Field, ...] = ()
    cel: str = ""
    hosts: bool = False


@dataclass(frozen=True)
class Obj:
    """A mapping of the rules format. ``one_of``: exactly one of these keys must be set
    (a rule's ``allow``/``deny``/``require``)."""

    doc: str
    fields: Mapping[str, Field]
    one_of: tuple[str, ...] = ()


# -- shorthands -------------------------------------------------------------------------

def _text(doc: str, required: bool = False) -> Field:
    return Field(doc, required=required)


def _int(doc: str, required: bool = False) -> Field:
    return Field(doc, ("integer",), required=required)


def _num(doc: str, required: bool = False) -> Field:
    return Field(doc, ("number",), required=required)


def _bool(doc: str) -> Field:
    return Field(doc, ("boolean",))


def _duration(doc: str, required: bool = False) -> Field:
    return Field(doc + " (a duration: 30s, 10m, 24h; or seconds)", ("string", "number"),
                 required=required)


def _strings(doc: str, required: bool = False) -> Field:
    return Field(doc, ("array",), required=required, items=Field("", ("string", "integer")))


def _hosts(doc: str, required: bool = False) -> Field:
    return Field(doc + " (host names: api.example.com, *.example.com, host:port; not URLs)",
                 ("array",), required=required, items=Field("", ("string",)), hosts=True)


def _cel(doc: str, required: bool = False, *, selector: bool = False,
         boolean: bool = False) -> Field:
    return Field(doc + " (CEL)", ("string", "boolean") if boolean else ("string",),
                 required=required, cel="selector" if selector else "rule")


def _ref(name: str, doc: str, required: bool = False) -> Field:
    return Field(doc, ("object",), required=required, ref=name)


def _list(name: str, doc: str, required: bool = False) -> Field:
    return Field(doc, ("array",), required=required, items=Field("", ("object",), ref=name))


def _enum(doc: str, values: tuple[Any, ...], required: bool = False,
          types: tuple[str, ...] = ("string",)) -> Field:
    return Field(doc, types, required=required, enum=values)


def _rules_list(rule: str, doc: str) -> Field:
    return Field(doc, ("array",), items=Field("", (), any_of=(
        _cel("a bare expression: allows when true"), Field("", ("object",), ref=rule))))


def _mode(what: str) -> Field:
    """``mode: enforce | report`` (report: log what would be denied, enforce nothing)."""
    return _enum(f"enforce (default) or report: log what {what} would deny, deny nothing",
                 tuple(m.value for m in Mode))


_RULE_TEXT = ("allow", "deny", "require")
_SCOPES = ("agent", "token", "session", "role", "user", "all")


def _kill_action(doc: str, throttle: bool) -> Obj:
    keys: dict[str, Field] = {s: _text(f"act on this {s}") for s in _SCOPES if s != "all"}
    keys["all"] = _bool("true: act on every agent")
    keys["cascade"] = _bool("also every sub-agent session below (default false)")
    keys["reason"] = _text("why, shown to operators and in the kill log")
    if throttle:
        keys["requests"] = _int("requests allowed per 'per'", required=True)
        keys["per"] = _duration("the throttle's period", required=True)
    return Obj(doc, keys, one_of=_SCOPES)


# -- the model --------------------------------------------------------------------------

MODEL: dict[str, Obj] = {
    "Policy": Obj("One fleetgate rules document (apiVersion fleetgate/v1).", {
        "apiVersion": _enum("always fleetgate/v1", ("fleetgate/v1",), required=True),
        "kind": _enum("always Policy (the default)", ("Policy",)),
        "metadata": Field("free-form: name, labels, anything for people", ("object",)),
        "claims": _strings("the JWT claims agents' tokens carry: `jwt.X` in a rule is "
                           "checked against this list (without it: the standard claims)"),
        "authorization": _ref("Authorization", "HTTP rules for every agent"),
        "agents": _list("Agent", "agent profiles: who (match) may do what"),
        "revoked": _ref("Revoked", "identities refused whatever the rules say"),
        "llm": _ref("Llm", "operator-defined LLM providers and prices"),
        "destinations": _ref("Destinations", "private networks rules may reach"),
        "mcpAuthorization": _ref("McpAuthorization", "MCP tool rules for every agent"),
        "mcp": _ref("Mcp", "MCP servers: tool vetting, pins, per-server rules"),
        "policies": _ref("Policies", "rate limits for every agent"),
        "budgets": _list("Budget", "spend limits (USD and/or tokens)"),
        "killswitch": _ref("Killswitch", "declared stops, pauses, throttles and triggers"),
        "delegation": _ref("Delegation", "which roles may spawn which, and how far"),
        "credentials": _list("Credential", "secrets the gateway adds to outgoing requests"),
        "a2a": _ref("A2a", "Agent2Agent endpoints and hop depth"),
        "approvals": _list("Approval", "tiers of human approval, first match wins"),
    }),
    "Authorization": Obj("A list of HTTP rules.", {
        "rules": _rules_list("Rule", "deny rules win, then require, then the first allow"),
    }),
    "Rule": Obj("One HTTP rule: exactly one of allow, deny, require.", {
        "allow": _cel("allowed when true", boolean=True),
        "deny": _cel("denied when true (wins over every allow)", boolean=True),
        "require": _cel("denied unless true", boolean=True),
        "id": _text("unique id, in the decision log (default <file>.authorization[i])"),
        "reason": _text("shown to the agent when this rule denies"),
        "hosts": _hosts("the destinations the rule applies to (default: all)"),
        "mode": _mode("this rule"),
    }, one_of=_RULE_TEXT),
    "Agent": Obj("An agent profile.", {
        "name": _text("unique profile name", required=True),
        "description": _text("for people"),
        "match": _cel("which tokens this profile applies to, over jwt", selector=True),
        "egress": _ref("Egress", "where these agents may connect"),
        "authorization": _ref("Authorization", "HTTP rules for these agents"),
        "mcpAuthorization": _ref("McpAuthorization", "MCP tool rules for these agents"),
        "allowed_tools": _strings("MCP tool globs these agents may call"),
        "denied_tools": _strings("MCP tool globs these agents may not call"),
        "policies": _ref("Policies", "rate limits for these agents"),
        "budgets": _list("Budget", "spend limits for these agents"),
        "telemetry": _ref("Telemetry", "which LLM contents their traces carry"),
        "mode": _mode("every rule, limit and budget of this profile"),
    }),
    "Egress": Obj("Egress allow-list of a profile.", {
        "hosts": _hosts("allowed destinations; '*' is every internet host (never a "
                        "private address), CIDRs allowed"),
    }),
    "Telemetry": Obj("LLM contents in traces (nothing unless asked).", {
        "capture": Field("prompts and/or completions, or true/false", ("array", "boolean"),
                         items=_enum("", ("prompts", "completions"))),
        "maxBytes": _int("largest captured attribute, 1 to 1048576 (default 4096)"),
    }),
    "Revoked": Obj("Identities refused outright.", {
        "agents": _strings("agent ids"),
        "tokens": _strings("token ids (jti)"),
        "roles": _strings("agent roles"),
        "sessions": _strings("session ids"),
    }),
    "Destinations": Obj("Private destinations.", {
        "allowPrivate": _strings("CIDRs of private networks that explicit egress entries "
                                 "may reach (wildcards never do)"),
    }),
    "McpAuthorization": Obj("A list of MCP tool rules.", {
        "rules": _rules_list("McpRule", "a bare expression allows; deny entries win"),
    }),
    "McpRule": Obj("One MCP rule: allow or deny.", {
        "allow": _cel("allowed when true", boolean=True),
        "deny": _cel("denied when true", boolean=True),
        "id": _text("unique id, in the decision log"),
        "reason": _text("shown to the agent when this rule denies"),
        "mode": _mode("this rule"),
    }, one_of=("allow", "deny")),
    "Mcp": Obj("MCP servers and how tools are vetted.", {
        "servers": _list("McpServer", "the MCP endpoints"),
        "revealDenied": _bool("list denied tools too (calls still refused; default false)"),
        "detect": _bool("recognise MCP traffic to undeclared servers (default true)"),
    }),
    "McpServer": Obj("One MCP endpoint.", {
        "name": _text("unique server name (mcp.server in rules)", required=True),
        "hosts": _hosts("its hosts", required=True),
        "path": _text("path prefix of the endpoint, starting with '/'"),
        "poisoning": _enum("tool-description poisoning checks", tuple(m.value for m in McpMode)),
        "pins": _enum("tool definition pinning", tuple(m.value for m in McpMode)),
        "mcpAuthorization": _ref("McpAuthorization", "rules for this server's tools"),
        "mode": _mode("every rule of this server"),
    }),
    "Policies": Obj("Rate limits.", {
        "localRateLimit": _list("RateLimit", "token buckets"),
    }),
    "RateLimit": Obj("A token bucket.", {
        "id": _text("unique among limits and budgets"),
        "maxTokens": _int("bucket size", required=True),
        "tokensPerFill": _int("added every fillInterval", required=True),
        "fillInterval": _duration("how often the bucket refills", required=True),
        "type": _enum("what a token is (default requests)", tuple(k.value for k in LimitKind)),
        "key": _cel("what the bucket is per (default: the agent)"),
        "when": _cel("applies only when true"),
        "mode": _mode("this limit (it counts in buckets of its own)"),
    }),
    "Budget": Obj("A spend limit: per or key, period or rolling, usd and/or tokens.", {
        "id": _text("unique among limits and budgets"),
        "per": _enum("whose spend (default agent)", ("agent", "role", "session", "fleet")),
        "key": _cel("a CEL key instead of per"),
        "when": _cel("applies only when true"),
        "period": _enum("UTC calendar period",
                        tuple(p.value for p in Period if p is not Period.ROLLING)),
        "rolling": _duration("a rolling window instead of a period"),
        "usd": _ref("BudgetAmounts", "limits in US dollars"),
        "tokens": _ref("BudgetAmounts", "limits in tokens"),
        "mode": _mode("this budget (its spend is still recorded)"),
    }),
    "BudgetAmounts": Obj("Soft (warn) and hard (refuse) limits.", {
        "soft": _num("warn above this"),
        "hard": _num("refuse above this"),
    }),
    "Llm": Obj("LLM providers and prices.", {
        "providers": _list("Provider", "operator-defined providers (tried before built-ins)"),
        "pricing": _ref("Pricing", "prices per million tokens"),
    }),
    "Provider": Obj("An LLM provider.", {
        "name": _text("unique provider name", required=True),
        "api": _enum("the API it speaks", APIS, required=True),
        "hosts": _hosts("its hosts", required=True),
        "pathPrefix": _text("prefix before the API's standard paths"),
    }),
    "Pricing": Obj("The price table.", {
        "source": _text("a price list in LiteLLM's format: 'litellm' (the snapshot fleetgate "
                        "ships) or a file path relative to this rules file"),
        "models": Field("model name -> price", ("object",),
                        values=Field("", ("object",), ref="Price")),
        "overrides": Field("model name -> price that replaces any other", ("object",),
                           values=Field("", ("object",), ref="Price")),
        "aliases": Field("model name -> priced model name", ("object",),
                         values=Field("", ("string",))),
    }),
    "Price": Obj("USD per million tokens.", {
        "input": _num("input tokens", required=True),
        "output": _num("output tokens", required=True),
        "cacheRead": _num("cached input read (default: input)"),
        "cacheWrite": _num("cache write (default: input)"),
    }),
    "Credential": Obj("A credential route: the gateway's secret, added on the way out.", {
        "id": _text("unique id"),
        "hosts": _hosts("the hosts it is for", required=True),
        "ports": Field("ports (default any)", ("array",), items=Field("", ("integer",))),
        "pathPrefix": _text("only under this path"),
        "header": _text("the header to set (default Authorization)"),
        "value": _text("template with {secret} once (default 'Bearer {secret}')"),
        "secretFile": _text("absolute path of the secret"),
        "secretEnv": _text("environment variable holding the secret"),
        "remove": _strings("headers to remove"),
    }),
    "Killswitch": Obj("Kill-switch actions and triggers.", {
        "stop": _list("KillAction", "stopped: refused, in-flight cut"),
        "pause": _list("KillAction", "paused: refused until resumed"),
        "throttle": _list("ThrottleAction", "slowed to requests per period"),
        "triggers": _list("Trigger", "automatic triggers"),
        "files": _strings("KILLSWITCH.md documents next to the rules"),
    }),
    "KillAction": _kill_action("A stop or pause: exactly one scope.", throttle=False),
    "ThrottleAction": _kill_action("A throttle: exactly one scope, requests per period.",
                                   throttle=True),
    "Trigger": Obj("An automatic kill-switch trigger.", {
        "id": _text("unique trigger id", required=True),
        "metric": _enum("what is measured", tuple(m.value for m in Metric), required=True),
        "above": _num("fires above this", required=True),
        "window": _duration("measurement window (default 60s)"),
        "per": _enum("measured per (default agent)", ("agent", "session")),
        "roles": _strings("only these roles"),
        "agents": _strings("only these agent ids"),
        "ladder": Field("escalation steps", ("array",),
                        items=_enum("", tuple(v.value for v in Verb))),
        "throttle": _ref("TriggerThrottle", "the throttle step's rate"),
        "hold": _duration("how long an automatic throttle or pause lasts"),
        "cooldown": _duration("minimum time on a step before escalating"),
        "minRequests": _int("rates only: fewest requests before judging"),
        "mode": _enum("report: log and count what it would do, never act (default enforce)",
                      ("enforce", "report")),
    }),
    "TriggerThrottle": Obj("A throttle rate.", {
        "requests": _int("requests per 'per'", required=True),
        "per": _duration("the period (default 1s)"),
    }),
    "Delegation": Obj("Sub-agent delegation.", {
        "roles": Field("parent role -> roles it may spawn", ("object",),
                       values=Field("", ("array",), items=Field("", ("string",)))),
        "maxDepth": _int("deepest delegation chain"),
        "maxChildren": _int("most children per session"),
        "maxTtl": _duration("longest child session"),
    }),
    "A2a": Obj("Agent2Agent.", {
        "agents": _list("A2aAgent", "agents with an A2A endpoint"),
        "maxDepth": _int("deepest hop allowed (default 5; 0: unchecked)"),
    }),
    "A2aAgent": Obj("An A2A agent.", {
        "name": _text("the agent id its tokens carry", required=True),
        "url": _text("its A2A JSON-RPC endpoint (https://...)", required=True),
    }),
    "Approval": Obj("A tier of human approval.", {
        "id": _text("unique tier id", required=True),
        "when": _cel("requests this tier holds", required=True),
        "approvers": _enum("0: none, 1, 2: two distinct people (default 1)", (0, 1, 2),
                           types=("integer",)),
        "approvedBy": _strings("operator names or group:NAME (empty: any operator)"),
        "secondary": _strings("who may give the second of two approvals"),
        "escalateTo": _strings("notified when the window passes"),
        "window": _duration("time to decide before escalating (default 24h)"),
        "hold": _duration("how long the agent's request waits (default 30s)"),
        "reason": _text("shown to approvers and agents"),
    }),
}


def keys(name: str) -> frozenset[str]:
    """The keys object ``name`` accepts: what its parser passes to ``check_keys``."""
    return frozenset(MODEL[name].fields)


# -- JSON Schema ------------------------------------------------------------------------

def _field_schema(f: Field) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if f.doc:
        out["description"] = f.doc
    if f.any_of:
        out["anyOf"] = [_field_schema(a) for a in f.any_of]
        return out
    if f.ref is not None:
        out["$ref"] = f"#/$defs/{f.ref}"
        return out
    if f.type:
        out["type"] = f.type[0] if len(f.type) == 1 else list(f.type)
    if f.enum:
        out["enum"] = list(f.enum)
    if f.items is not None:
        out["items"] = _field_schema(f.items)
    if f.values is not None:
        out["additionalProperties"] = _field_schema(f.values)
    return out


def _object_schema(obj: Obj) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "description": obj.doc,
                           "properties": {k: _field_schema(f) for k, f in obj.fields.items()},
                           "additionalProperties": False}
    required = [k for k, f in obj.fields.items() if f.required]
    if required:
        out["required"] = required
    if obj.one_of:
        out["oneOf"] = [{"required": [k]} for k in obj.one_of]
    return out


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one rules document, generated from :data:`MODEL`."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "fleetgate rules (apiVersion fleetgate/v1)",
        "description": "Generated by `fleetgate rules schema` from fleetgate.policy.schema; "
                       "do not edit by hand.",
        "$ref": "#/$defs/Policy",
        "$defs": {name: _object_schema(obj) for name, obj in MODEL.items()},
    }


def schema_text() -> str:
    """:func:`json_schema` as the committed file holds it (stable, one trailing newline)."""
    return json.dumps(json_schema(), indent=2) + "\n"
