"""Judge MCP requests and rewrite MCP responses for one agent. No mitmproxy, no I/O.

Requests (:func:`judge_request`): every element of a body (single message or batch) is
judged on its own. A call (``tools/call``, ``prompts/get``, ``resources/read``...) needs an
allow rule and no deny rule (:func:`fleetgate.mcp.policy.may_call`); protocol messages
(``initialize``, list calls, notifications) pass unless a deny rule is true.

A denied request never reaches the server. When the gateway can answer on the same HTTP
exchange (streamable HTTP) and nothing else in the body is allowed, it answers at once with
the JSON-RPC error(s). Otherwise (a batch with allowed elements; the older HTTP+SSE transport,
where answers arrive on another stream) the denied element is replaced by a ``ping`` with the
same id, a request every MCP server must answer, and that answer is swapped for the denial
error on its way back (:attr:`RequestPlan.substitutions`). The server sees a ping: not the
tool, not its arguments.

Responses (:func:`rewrite_message`): list results are filtered per agent (pagination cursors
kept); tools are vetted for poisoning and pins by a :class:`ToolVetter`; placeholders are
swapped for their denial errors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fleetgate.celexpr import Activation, over_budget_count
from fleetgate.mcp.facts import LIST_METHODS, base_facts, item_facts, mcp_facts, target_kind
from fleetgate.mcp.listcache import ListVerdicts
from fleetgate.mcp.messages import FORBIDDEN, HEADER_MISMATCH, McpError, Message
from fleetgate.mcp.mode import McpMode
from fleetgate.mcp.policy import LIST_VARS, McpVerdict, fast_listing, may_call, may_deny, may_list
from fleetgate.mcp.vetting import Vetting
from fleetgate.rule import Rule, WouldDeny
from fleetgate.wire import jsonrpc_error

__all__ = ["CallRecord", "McpScope", "RequestPlan", "check_headers", "id_key", "judge_request",
           "rewrite_message"]

RESOURCE_NOT_FOUND = -32002  # MCP: resources/read of an unknown URI
INVALID_PARAMS = -32602  # MCP: unknown tool / prompt


def id_key(value: Any) -> str:
    """A JSON-RPC id as a dict key that keeps ``1`` and ``"1"`` apart."""
    return json.dumps(value, separators=(",", ":"))


@dataclass(frozen=True)
class McpScope:
    """Everything about the exchange except the message: who asks, where, which rules."""

    claims: Mapping[str, Any]
    request: Mapping[str, Any]  # the request's CEL facts (request.*)
    server: str  # the MCP server's name (declared name, or host for undeclared)
    host: str
    path: str
    session_id: str | None
    rules: tuple[Rule, ...]
    reveal_denied: bool = False
    decision_id: str = ""
    poisoning: McpMode = McpMode.ENFORCE
    pins: McpMode = McpMode.ENFORCE
    vetting: Vetting | None = None
    # remembered list verdicts (see fleetgate.mcp.listcache); None: judge every entry
    verdicts: ListVerdicts | None = None

    def activation(self) -> Activation:
        return Activation({"jwt": dict(self.claims), "request": dict(self.request), "mcp": {}})


@dataclass(frozen=True)
class CallRecord:
    """One judged message, for the decision log, metrics and mitmweb."""

    method: str
    target: str  # tool name, prompt name or resource URI; "" for protocol messages
    allow: bool
    rule: str
    reason: str
    id: Any = None
    would_deny: tuple[WouldDeny, ...] = ()  # report-mode rules that would have denied it

    def as_dict(self) -> dict[str, Any]:
        out = {"method": self.method, "target": self.target, "allow": self.allow,
               "rule": self.rule, "reason": self.reason}
        if self.would_deny:
            out["would_deny"] = [w.as_dict() for w in self.would_deny]
        return out


@dataclass
class RequestPlan:
    """What to do with one request body."""

    records: list[CallRecord] = field(default_factory=list)
    # JSON value to answer with at once (never forwarded); with status 202 and no value
    # when only notifications were sent and all were denied.
    answer: Any = None
    answer_status: int = 0
    # rewritten body to forward instead of the original (placeholders), None: unchanged
    forward: Any = None
    # id key -> JSON-RPC error object, for placeholder answers coming back
    substitutions: dict[str, dict[str, Any]] = field(default_factory=dict)
    # id key -> method, to know which list a result answers
    methods: dict[str, str] = field(default_factory=dict)
    # the ``mcp`` facts of the first request or notification (rate-limit keys and conditions)
    facts: dict[str, Any] | None = None

    @property
    def denied(self) -> list[CallRecord]:
        return [r for r in self.records if not r.allow]


def _target(facts: Mapping[str, Any], kind: str | None) -> str:
    if kind == "tool":
        return str(facts["tool"]["name"])
    if kind == "prompt":
        return str(facts["prompt"]["name"])
    if kind in ("resource", "completion"):
        return str(facts["resource"]["uri"] or facts["prompt"]["name"])
    return ""


def denial_error(method: str, kind: str | None, target: str, verdict: McpVerdict,
                 scope: McpScope) -> dict[str, Any]:
    """The JSON-RPC error object for a denied request.

    By default the agent is answered as if the target did not exist (what an MCP server says
    for an unknown tool, prompt or resource): a denied tool and a missing one look the same.
    With ``mcp.revealDenied`` it learns the rule and what to do.
    """
    data: dict[str, Any] = {"decision_id": scope.decision_id} if scope.decision_id else {}
    if scope.reveal_denied or kind is None:
        what = f"{method} {target!r}" if target else method
        agent = scope.claims.get("agent_id") or scope.claims.get("sub")
        msg = (f"fleetgate denied {what} for agent {agent!r}: "
               f"{verdict.reason} (rule {verdict.rule}); ask an operator to allow it in the "
               "mcpAuthorization rules")
        return {"code": FORBIDDEN, "message": msg, "data": {**data, "rule": verdict.rule}}
    if kind == "tool":
        return {"code": INVALID_PARAMS, "message": f"Unknown tool: {target}", "data": data}
    if kind == "prompt" or (kind == "completion" and not target.count(":")):
        return {"code": INVALID_PARAMS, "message": f"Unknown prompt: {target}", "data": data}
    return {"code": RESOURCE_NOT_FOUND, "message": "Resource not found",
            "data": {**data, "uri": target}}


def check_headers(headers: Mapping[str, str], messages: list[Message], batch: bool) -> None:
    """MCP 2026-07-28 stateless requests repeat the method (``Mcp-Method``) and the tool,
    prompt or resource (``Mcp-Name``) in headers that routers act on. A header that disagrees
    with the body would let a router and the server see two different calls: rejected
    (-32020). ``headers`` keys are lower case."""
    h_method = headers.get("mcp-method")
    h_name = headers.get("mcp-name")
    if h_method is None and h_name is None:
        return
    if batch:
        raise McpError(HEADER_MISMATCH, "Mcp-Method/Mcp-Name headers cannot describe a batch")
    msg = messages[0]
    if h_method is not None and h_method != (msg.method or ""):
        raise McpError(HEADER_MISMATCH, f"Mcp-Method header {h_method!r} does not match the "
                       f"body's method {msg.method!r}")
    if h_name is not None:
        p = msg.params
        kind = target_kind(msg.method)
        name = p.get("uri") if kind == "resource" else p.get("name")
        if kind is None or h_name != (name if isinstance(name, str) else None):
            raise McpError(HEADER_MISMATCH, f"Mcp-Name header {h_name!r} does not match the "
                           f"body's target {name!r}")


def _judge(msg: Message, scope: McpScope, act: Activation) -> tuple[CallRecord, str | None]:
    method = msg.method or ""
    facts = mcp_facts(msg, scope.host, scope.path, scope.session_id, scope.server)
    act.set("mcp", facts)
    kind = target_kind(method)
    verdict = may_call(scope.rules, act) if kind else may_deny(scope.rules, act)
    if verdict.allow and kind == "tool" and scope.vetting is not None:
        why = scope.vetting.blocked(scope.server, facts["tool"]["name"], scope.poisoning,
                                    scope.pins)
        if why:
            verdict = McpVerdict(False, "mcp.vetting", f"{why}; an operator must review it "
                                 "(fleetgate mcp pending / approve)")
    return CallRecord(method, _target(facts, kind), verdict.allow, verdict.rule, verdict.reason,
                      msg.id, verdict.would_deny), kind


def judge_request(messages: list[Message], batch: bool, scope: McpScope,
                  answer_directly: bool) -> RequestPlan:
    """Judge every element of a request body. ``answer_directly``: the HTTP response to this
    request carries the JSON-RPC answers (streamable HTTP), so a fully denied body can be
    answered without contacting the server."""
    plan = RequestPlan()
    act = scope.activation()
    out: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    allowed_work = False  # something in the body must still reach the server
    for msg in messages:
        if msg.is_response:  # the client answering a server request (sampling, elicitation)
            out.append(msg.raw)
            allowed_work = True
            continue
        record, kind = _judge(msg, scope, act)
        plan.records.append(record)
        if plan.facts is None:
            plan.facts = act.data["mcp"]
        if msg.is_request:
            plan.methods[id_key(msg.id)] = record.method
        if record.allow:
            out.append(msg.raw)
            allowed_work = True
            continue
        if msg.is_notification:
            continue  # dropped: a notification has no answer
        verdict = McpVerdict(False, record.rule, record.reason)
        e = denial_error(record.method, kind, record.target, verdict, scope)
        err = jsonrpc_error(msg.id, e["code"], e["message"], **e["data"])
        errors.append(err)
        plan.substitutions[id_key(msg.id)] = err
        out.append({"jsonrpc": "2.0", "id": msg.id, "method": "ping"})
    if not plan.denied:
        plan.substitutions.clear()
        return plan
    if not out:  # only denied notifications
        plan.answer_status = 202
        return plan
    if answer_directly and not allowed_work:
        plan.answer = errors if batch else errors[0]
        plan.answer_status = 200
        plan.substitutions.clear()
        return plan
    plan.forward = out if batch else out[0]
    return plan


def _filter_list(method: str, result: dict[str, Any], scope: McpScope, act: Activation,
                 hidden: list[tuple[str, str]]) -> bool:
    key, kind = LIST_METHODS[method]
    items = result.get(key)
    if not isinstance(items, list):
        return False
    valid = [i for i in items if isinstance(i, dict)]
    verdicts: dict[str, str | None] = {}
    if kind == "tool" and scope.vetting is not None:
        verdicts = scope.vetting.vet(scope.server, valid, not result.get("nextCursor"),
                                     scope.poisoning, scope.pins)
    fast = fast_listing(scope.rules)
    base = base_facts(method, scope.host, scope.path, scope.session_id, scope.server,
                      listing=True)
    if fast:  # the facts are the same for every entry but its name: set them once
        act.set("mcp", base)
        for var in LIST_VARS.values():
            act.set(var, "")
    cache = scope.verdicts
    ckey = (cache.key(scope.rules, scope.claims, scope.request, base) if cache is not None
            else 0)
    name_var = {"tool": "__tool_name", "prompt": "__prompt_name"}.get(kind, "__resource_uri")
    kept = []
    for item in valid:
        name = str(item.get("name") or item.get("uri") or item.get("uriTemplate") or "")
        why = verdicts.get(name) if kind == "tool" else None
        if why is None:
            # all the rules see of the entry (fleetgate.mcp.facts.item_facts): its target
            target = (str(item.get("uri") or item.get("uriTemplate") or "") if kind == "resource"
                      else name if fast else str(item.get("name") or ""))
            shown = cache.get(ckey, kind, target) if cache is not None else None
            if shown is None:
                over = over_budget_count()
                if fast:
                    act.set(name_var, target)
                else:
                    act.set("mcp", item_facts(method, kind, item, scope.host, scope.path,
                                              scope.session_id, scope.server))
                shown = may_list(scope.rules, act, listing=fast)
                if cache is not None and over_budget_count() == over:  # a verdict judged in time
                    cache.put(ckey, kind, target, shown)
            if not shown:
                why = "no mcpAuthorization rule allows it"
        if why is None:
            kept.append(item)
        else:
            hidden.append((name, why))
    if len(kept) == len(items):
        return False
    result[key] = kept
    return True


def rewrite_message(obj: Any, methods: Mapping[str, str], substitutions: Mapping[str, Any],
                    scope: McpScope, hidden: list[tuple[str, str]]) -> Any:
    """The message (or batch) the agent should receive instead of ``obj``; ``obj`` itself
    (same object) when nothing changes. Hidden list entries are appended to ``hidden``.

    ``methods`` maps request ids to their method, when known; a result whose request is not
    known is recognised by its shape (``tools``, ``prompts``...), so nothing escapes
    filtering for lack of correlation."""
    if isinstance(obj, list):
        new = [rewrite_message(o, methods, substitutions, scope, hidden) for o in obj]
        return obj if all(a is b for a, b in zip(new, obj, strict=True)) else new
    if not isinstance(obj, dict) or "method" in obj:
        return obj  # server requests and notifications pass (tools/list_changed, sampling...)
    key = id_key(obj.get("id"))
    if key in substitutions:
        return substitutions[key]
    result = obj.get("result")
    if not isinstance(result, dict):
        return obj
    method = methods.get(key)
    if method is None:
        method = next((m for m, (k, _) in LIST_METHODS.items() if isinstance(result.get(k), list)),
                      None)
    if method not in LIST_METHODS:
        return obj
    new_result = dict(result)
    if _filter_list(method, new_result, scope, scope.activation(), hidden):
        return {**obj, "result": new_result}
    return obj
