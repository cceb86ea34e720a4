"""A judged flow as an OpenTelemetry span: names, ids and attributes, from its decision record.

Pure (no mitmproxy, no SDK): the tracing addon hands the decision record DecisionLog built,
plus the two facts that are not in it (the agent's ``traceparent`` header and, when a
profile opted in, the captured prompt and completion), and gets a :class:`SpanSpec` back that
:mod:`fleetgate.telemetry.export` turns into an SDK span. One record shape feeds the log, the
traces, the OTLP metrics and ``fleetgate trace``, so they cannot disagree.

Ids are derived, not random, where a trace must come together without shared state:

* every session has a trace: ``trace_id = H128(root_session or session)``, so a delegated
  child (whose token names its family's ``root_session``) lands in its coordinator's trace;
* every session has one span, ``span_id = H64(session)``, the parent of each of its calls;
  a child session's span has the parent session's span as its parent, so the coordinator's
  trace shows its sub-agents nested under it, on any replica, with nothing shared;
* a flow without a session is a trace of its own (random ids).

Names and attributes follow the OpenTelemetry GenAI and MCP semantic conventions
(``chat gpt-4o``, ``tools/call nmap``; ``gen_ai.*``, ``mcp.*``, ``http.*``, ``url.*``), and
fleetgate's own facts go under ``fleetgate.*``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Event",
    "Link",
    "SpanSpec",
    "flow_span",
    "parse_traceparent",
    "session_span",
    "session_span_id",
    "session_trace_id",
    "traceparent",
]

KIND_CLIENT = "client"
KIND_INTERNAL = "internal"

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@dataclass(frozen=True)
class Event:
    name: str
    time_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Link:
    trace_id: int
    span_id: int
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class SpanSpec:
    """Everything an exporter needs to emit one finished span."""

    name: str
    trace_id: int
    span_id: int
    parent_id: int | None  # None: a root span
    start_ns: int
    end_ns: int
    kind: str = KIND_CLIENT
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    error: str | None = None  # set: status ERROR with this description
    remote_parent: bool = False  # the parent is the agent's span (its traceparent)


def _h(text: str, bits: int) -> int:
    digest = hashlib.blake2b(text.encode(), digest_size=bits // 8, person=b"fleetgate.trace").digest()
    return int.from_bytes(digest, "big") or 1  # 0 is the invalid id


def session_trace_id(session: str) -> int:
    """The trace of a session's family (pass the family's root session)."""
    return _h(session, 128)


def session_span_id(session: str) -> int:
    return _h("span:" + session, 64)


def parse_traceparent(value: str | None) -> tuple[int, int, bool] | None:
    """``(trace_id, span_id, sampled)`` of a valid W3C ``traceparent``, else ``None``
    (a malformed header from an agent is ignored, never an error: it is the agent's own)."""
    if not value:
        return None
    m = _TRACEPARENT.match(value.strip().lower())
    if m is None or m.group(1) == "ff":
        return None
    trace_id, span_id = int(m.group(2), 16), int(m.group(3), 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(int(m.group(4), 16) & 1)


def traceparent(trace_id: int, span_id: int, sampled: bool = True) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _identity_attrs(rec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("agent", "role", "session", "user", "parent_session", "root_session"):
        value = rec.get(key)
        if value:
            out[f"fleetgate.{key}"] = value
    if rec.get("agent"):
        out["gen_ai.agent.id"] = rec["agent"]
    if rec.get("session"):
        out["gen_ai.conversation.id"] = rec["session"]
    if rec.get("user"):
        out["user.id"] = rec["user"]
    return out


def _http_attrs(rec: dict[str, Any]) -> dict[str, Any]:
    host, port, path = rec.get("host") or "", rec.get("port"), rec.get("path") or ""
    out: dict[str, Any] = {"http.request.method": rec.get("method") or "_OTHER",
                           "server.address": host, "url.path": path}
    if port:
        out["server.port"] = port
        out["url.full"] = f"https://{host}{'' if port == 443 else f':{port}'}{path}"
    if rec.get("status") is not None:
        out["http.response.status_code"] = rec["status"]
    return out


def _llm_attrs(llm: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, attr in (("operation", "gen_ai.operation.name"), ("provider", "gen_ai.provider.name"),
                      ("model", "gen_ai.request.model"),
                      ("response_model", "gen_ai.response.model")):
        if llm.get(key):
            out[attr] = llm[key]
    tokens = llm.get("tokens")
    if isinstance(tokens, dict):
        for key, attr in (("input", "gen_ai.usage.input_tokens"),
                          ("output", "gen_ai.usage.output_tokens"),
                          ("cache_read", "gen_ai.usage.cache_read.input_tokens"),
                          ("cache_write", "gen_ai.usage.cache_creation.input_tokens"),
                          ("reasoning", "gen_ai.usage.reasoning.output_tokens")):
            if isinstance(tokens.get(key), int):
                out[attr] = tokens[key]
        out["fleetgate.usage.estimated"] = bool(tokens.get("estimated"))
    if llm.get("cost_usd") is not None:
        out["fleetgate.cost_usd"] = llm["cost_usd"]
    elif llm.get("priced") is False:
        out["fleetgate.cost_usd.unpriced"] = True
    if llm.get("ttft_ms") is not None:
        out["gen_ai.response.time_to_first_chunk"] = llm["ttft_ms"] / 1000
    if llm.get("outcome"):
        out["fleetgate.llm.outcome"] = llm["outcome"]
    return out


def _mcp_attrs(mcp: dict[str, Any]) -> tuple[dict[str, Any], str | None, str | None]:
    """Attributes, the span name's method and target (the first call's)."""
    out: dict[str, Any] = {}
    if mcp.get("server"):
        out["fleetgate.mcp.server"] = mcp["server"]
    if mcp.get("session"):
        out["mcp.session.id"] = mcp["session"]
    if mcp.get("transport"):
        out["network.protocol.name"] = "http"
        out["fleetgate.mcp.transport"] = mcp["transport"]
    calls = [c for c in mcp.get("calls") or [] if isinstance(c, dict)]
    method = target = None
    if calls:
        method = str(calls[0].get("method") or "") or None
        target = str(calls[0].get("target") or "") or None
        out["mcp.method.name"] = method or ""
        if method == "tools/call" and target:
            out["gen_ai.tool.name"] = target
            out["gen_ai.operation.name"] = "execute_tool"
        elif method == "prompts/get" and target:
            out["gen_ai.prompt.name"] = target
        elif method == "resources/read" and target:
            out["mcp.resource.uri"] = target
        if len(calls) > 1:  # a JSON-RPC batch: every method, in order
            out["fleetgate.mcp.methods"] = [str(c.get("method") or "") for c in calls]
    if mcp.get("hidden_count"):
        out["fleetgate.mcp.hidden_count"] = mcp["hidden_count"]
    return out, method, target


def _client_left_after_answer(rec: dict[str, Any]) -> bool:
    status = rec.get("status")
    llm = rec.get("llm")
    return (isinstance(status, int) and 200 <= status < 400
            and "client disconnected" in str(rec.get("error")).lower()
            and (not isinstance(llm, dict) or llm.get("outcome") in (None, "ok")))


def _name(rec: dict[str, Any], mcp_method: str | None, mcp_target: str | None) -> str:
    llm = rec.get("llm")
    if isinstance(llm, dict) and llm.get("operation"):
        model = llm.get("model") or llm.get("response_model") or ""
        return f"{llm['operation']} {model}".strip()
    if mcp_method:
        return f"{mcp_method} {mcp_target}" if mcp_target and mcp_method in (
            "tools/call", "prompts/get", "resources/read") else mcp_method
    if rec.get("rule") == "delegation":
        return "fleetgate delegate"
    return str(rec.get("method") or "HTTP")


def flow_span(rec: dict[str, Any], *, agent_traceparent: str | None = None,
              random_ids: tuple[int, int] = (1, 1),
              captured: dict[str, str] | None = None) -> SpanSpec:
    """The span of one judged flow. ``random_ids`` (trace id, span id) are used where the ids
    are not derived: the flow's own span id always, its trace id when it has no session."""
    end_s = float(rec.get("ts") or 0.0)
    start_s = float(rec.get("start_ts") or end_s - (rec.get("latency_ms") or 0) / 1000)
    attrs: dict[str, Any] = {**_identity_attrs(rec), **_http_attrs(rec)}
    attrs["fleetgate.decision_id"] = rec.get("decision_id")
    attrs["fleetgate.result"] = rec.get("result")
    attrs["fleetgate.rule"] = rec.get("rule")
    if rec.get("policy_revision"):
        attrs["fleetgate.policy_revision"] = rec["policy_revision"]
    llm = rec.get("llm")
    if isinstance(llm, dict):
        attrs.update(_llm_attrs(llm))
    method = target = None
    mcp = rec.get("mcp")
    if isinstance(mcp, dict):
        mcp_attrs, method, target = _mcp_attrs(mcp)
        attrs.update(mcp_attrs)
    if captured:
        attrs.update(captured)
    events: list[Event] = []
    if isinstance(llm, dict) and llm.get("ttft_ms") is not None:
        events.append(Event("gen_ai.first_chunk", _ns(start_s) + int(llm["ttft_ms"] * 1e6)))
    for name, key in (("fleetgate.rate_limit", "limits"), ("fleetgate.budget", "budgets")):
        for item in rec.get(key) or []:
            if isinstance(item, dict):
                events.append(Event(name, _ns(start_s), {
                    f"fleetgate.{k}": v for k, v in item.items()
                    if isinstance(v, str | int | float | bool)}))
    if rec.get("killswitch_action"):
        attrs["fleetgate.killswitch.action"] = str(rec["killswitch_action"])
    error = None
    if rec.get("result") == "deny":
        reason = rec.get("reason") or ""
        cut = isinstance(llm, dict) and llm.get("outcome") == "cut"
        verb = "cut" if cut else "denied"
        error = f"{verb} by {rec.get('rule')}: {reason}"
        attrs["error.type"] = str(rec.get("rule"))
        events.append(Event(f"fleetgate.{verb}", _ns(end_s), {
            "fleetgate.rule": str(rec.get("rule")), "fleetgate.reason": str(reason),
            **({"http.response.status_code": rec["status"]} if rec.get("status") else {})}))
    elif rec.get("error") and _client_left_after_answer(rec):
        # SDKs close a stream once they read its last event, before the final chunk: the
        # agent got its answer, so this is not a failed call
        events.append(Event("fleetgate.client_disconnected", _ns(end_s),
                            {"fleetgate.error": str(rec["error"])}))
    elif rec.get("error"):
        error = str(rec["error"])
        attrs["error.type"] = "upstream"
    elif isinstance(rec.get("status"), int) and rec["status"] >= 500:
        error = f"HTTP {rec['status']}"
        attrs["error.type"] = str(rec["status"])
    spec = SpanSpec(name=_name(rec, method, target), trace_id=random_ids[0],
                    span_id=random_ids[1], parent_id=None, start_ns=_ns(start_s),
                    end_ns=max(_ns(end_s), _ns(start_s)), attributes=attrs, events=events,
                    error=error)
    session = rec.get("session")
    theirs = parse_traceparent(agent_traceparent)
    if theirs is not None:  # the agent traces itself: continue its trace, link ours
        spec.trace_id, spec.parent_id, spec.remote_parent = theirs[0], theirs[1], True
        if session:
            root = rec.get("root_session") or session
            spec.links.append(Link(session_trace_id(root), session_span_id(session),
                                   {"fleetgate.link": "agent-session"}))
    elif session:
        spec.trace_id = session_trace_id(rec.get("root_session") or session)
        spec.parent_id = session_span_id(session)
    return spec


@dataclass
class SessionTally:
    """What a gateway saw of one session: the span it emits for it once the session idles."""

    session: str
    agent: str
    role: str | None
    user: str | None
    parent_session: str | None
    root_session: str | None
    start: float
    end: float
    calls: int = 0
    denied: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    @classmethod
    def first(cls, rec: dict[str, Any], start: float, end: float) -> SessionTally:
        return cls(session=str(rec["session"]), agent=str(rec.get("agent") or ""),
                   role=rec.get("role"), user=rec.get("user"),
                   parent_session=rec.get("parent_session"),
                   root_session=rec.get("root_session"), start=start, end=end)

    def add(self, rec: dict[str, Any], start: float, end: float) -> None:
        self.start, self.end = min(self.start, start), max(self.end, end)
        self.calls += 1
        if rec.get("result") == "deny":
            self.denied += 1
        llm = rec.get("llm")
        if isinstance(llm, dict):
            tokens = llm.get("tokens") or {}
            self.input_tokens += int(tokens.get("input") or 0)
            self.output_tokens += int(tokens.get("output") or 0)
            self.cost_usd += float(llm.get("cost_usd") or 0.0)


def session_span(t: SessionTally) -> SpanSpec:
    """The span of a session (as this gateway saw it): its calls' parent, a child of the
    parent session's span for a delegated agent."""
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.id": t.agent,
        "gen_ai.conversation.id": t.session, "fleetgate.agent": t.agent,
        "fleetgate.session": t.session, "fleetgate.session.calls": t.calls,
        "fleetgate.session.denied": t.denied,
        "gen_ai.usage.input_tokens": t.input_tokens,
        "gen_ai.usage.output_tokens": t.output_tokens,
        "fleetgate.cost_usd": round(t.cost_usd, 8)}
    for key, value in (("fleetgate.role", t.role), ("fleetgate.user", t.user),
                       ("user.id", t.user), ("fleetgate.parent_session", t.parent_session),
                       ("fleetgate.root_session", t.root_session)):
        if value:
            attrs[key] = value
    root = t.root_session or t.session
    return SpanSpec(
        name=f"invoke_agent {t.agent}", trace_id=session_trace_id(root),
        span_id=session_span_id(t.session),
        parent_id=session_span_id(t.parent_session) if t.parent_session else None,
        start_ns=_ns(t.start), end_ns=_ns(t.end), kind=KIND_INTERNAL, attributes=attrs)
