"""A session family as a call tree, from decision records: what ``fleetgate trace`` prints.

Pure (no mitmproxy, no I/O): the admin API hands the records it kept in memory
(:mod:`fleetgate.telemetry.recent`), ``fleetgate trace --log`` the lines it read from decision
log files; both get the same :class:`Trace` from :func:`build` and the same picture from
:func:`render_text` / :func:`to_json`. Operators without a tracing backend see what the
OTLP spans (:mod:`fleetgate.telemetry.spans`) show, from the same records, so the two cannot
disagree.

Each session is a node: its calls in time order, the sub-agents it delegated nested under the
``delegate(role)`` call that created them, its own totals and its family's. The records do not
name the child a delegation created (the answer holding the child's session id is not logged),
so children are matched to delegate calls by time: each child, in the order it first showed
up, goes to the earliest unmatched delegation of its parent that ended before it started. A
child whose delegation the records lack (another replica answered it, or it was dropped) is
shown after its parent's calls.

Labels follow the seed's picture: MCP ``initialize``, ``list_tools``, ``call_tool(<tool>)``,
other MCP methods by name; ``llm_call(<model>)``; ``delegate(<child role>)``; anything else
``METHOD host/path``. Tokens are ``input + output`` as :mod:`fleetgate.llm.usage` normalises
them (input counts cached tokens, output counts reasoning), so a family's total is the sum of
what the providers reported.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["Call", "SessionNode", "Totals", "Trace", "build", "call_label", "family_of",
           "human_cost", "human_duration", "render_text", "to_json"]

# a child's first call may start a little before its delegation's answer was logged as ended
# when another replica's clock is ahead; beyond this the child is not matched to that call
_DELEGATION_SLACK_S = 0.25


@dataclass(frozen=True)
class Call:
    """One judged flow of a session."""

    label: str
    start: float
    end: float
    result: str  # allow | deny
    rule: str
    reason: str
    status: int | None
    outcome: str  # ok | denied | cut | error | http-error
    decision_id: str
    input_tokens: int = 0
    output_tokens: int = 0
    tokens_estimated: bool = False
    cost_usd: float | None = None
    llm: bool = False  # an LLM call: tokens and cost apply (cost None: unpriced)
    ttft_ms: float | None = None
    error: str | None = None
    mcp_hidden: int = 0
    delegation: bool = False  # an allowed POST /v1/delegate

    @property
    def duration(self) -> float:
        return max(0.0, self.end - self.start)

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class Totals:
    """Sums over calls: a session's own, or its family's (the session and every descendant)."""

    start: float | None = None
    end: float | None = None
    calls: int = 0
    denied: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: int = 0  # LLM calls without a price: not counted as free
    estimated: bool = False
    dropped: int = 0  # calls the in-memory store did not keep
    sessions: int = 1

    @property
    def duration(self) -> float:
        """First start to last end: wall time, not the sum of (overlapping) calls."""
        if self.start is None or self.end is None:
            return 0.0
        return max(0.0, self.end - self.start)

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Totals) -> Totals:
        starts = [t for t in (self.start, other.start) if t is not None]
        ends = [t for t in (self.end, other.end) if t is not None]
        return Totals(start=min(starts) if starts else None, end=max(ends) if ends else None,
                      calls=self.calls + other.calls, denied=self.denied + other.denied,
                      input_tokens=self.input_tokens + other.input_tokens,
                      output_tokens=self.output_tokens + other.output_tokens,
                      cost_usd=self.cost_usd + other.cost_usd,
                      unpriced=self.unpriced + other.unpriced,
                      estimated=self.estimated or other.estimated,
                      dropped=self.dropped + other.dropped,
                      sessions=self.sessions + other.sessions)


@dataclass
class SessionNode:
    """One agent session: who, its calls in time order, the sessions it delegated."""

    session: str
    agent: str | None
    role: str | None
    user: str | None
    parent_session: str | None
    calls: list[Call]
    children: list[SessionNode] = field(default_factory=list)
    delegated_by: str | None = None  # decision id of the parent's delegate call, when matched
    dropped: int = 0

    @property
    def totals(self) -> Totals:
        t = Totals(dropped=self.dropped)
        for c in self.calls:
            t = t + Totals(start=c.start, end=c.end, calls=1,
                           denied=int(c.result == "deny"), input_tokens=c.input_tokens,
                           output_tokens=c.output_tokens, cost_usd=c.cost_usd or 0.0,
                           unpriced=int(c.llm and c.cost_usd is None),
                           estimated=c.tokens_estimated, sessions=0)
        return t

    @property
    def family(self) -> Totals:
        t = self.totals
        for child in self.children:
            t = t + child.family
        return t

    @property
    def start(self) -> float | None:
        return self.totals.start

    @property
    def end(self) -> float | None:
        return self.totals.end


@dataclass
class Trace:
    """The tree of one session's family. ``focus`` is the session asked for; ``root`` is it,
    or its topmost known ancestor when the trace was built in context."""

    focus: str
    root: SessionNode


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _span(rec: Mapping[str, Any]) -> tuple[float, float]:
    end = _num(rec.get("ts")) or 0.0
    start = _num(rec.get("start_ts"))
    if start is None:
        latency = _num(rec.get("latency_ms"))
        start = end - latency / 1000 if latency is not None else end
    return start, max(start, end)


def _mcp_label(method: str, target: str | None) -> str:
    if method == "tools/list":
        return "list_tools"
    if method == "tools/call":
        return f"call_tool({target or '?'})"
    if method in ("prompts/get", "resources/read") and target:
        return f"{method}({target})"
    return method


def call_label(rec: Mapping[str, Any], child_role: str | None = None) -> str:
    """The seed's names: ``initialize``, ``list_tools``, ``call_tool(nmap)``,
    ``llm_call(gpt-4o)``, ``delegate(security)``; ``METHOD host/path`` for the rest."""
    llm = rec.get("llm")
    if isinstance(llm, dict):
        model = llm.get("model") or llm.get("response_model") or "?"
        return f"llm_call({model})"
    mcp = rec.get("mcp")
    if isinstance(mcp, dict):
        calls = [c for c in mcp.get("calls") or [] if isinstance(c, dict) and c.get("method")]
        labels = [_mcp_label(str(c["method"]), str(c["target"]) if c.get("target") else None)
                  for c in calls]
        if len(labels) == 1:
            return labels[0]
        if labels:  # a JSON-RPC batch: every method, in order
            return f"batch[{', '.join(labels)}]"
    if _is_delegation(rec):
        return f"delegate({child_role})" if child_role else "delegate"
    host, path = str(rec.get("host") or ""), str(rec.get("path") or "")
    port = rec.get("port")
    where = host if port in (None, 80, 443) else f"{host}:{port}"
    return f"{rec.get('method') or '?'} {where}{path}"


def _is_delegation(rec: Mapping[str, Any]) -> bool:
    rule = str(rec.get("rule") or "")
    return (rec.get("method") == "POST" and str(rec.get("path") or "") == "/v1/delegate"
            and (rule == "delegation" or rule.startswith("delegation.")))


def _call(rec: Mapping[str, Any]) -> Call:
    start, end = _span(rec)
    result = "deny" if rec.get("result") == "deny" else "allow"
    status = rec.get("status") if isinstance(rec.get("status"), int) else None
    llm = rec.get("llm") if isinstance(rec.get("llm"), dict) else None
    tokens = (llm or {}).get("tokens")
    tokens = tokens if isinstance(tokens, dict) else {}
    if result == "deny":
        outcome = "cut" if llm and llm.get("outcome") == "cut" else "denied"
    elif rec.get("error"):
        outcome = "error"
    elif status is not None and status >= 400:
        outcome = "http-error"
    else:
        outcome = "ok"
    mcp = rec.get("mcp") if isinstance(rec.get("mcp"), dict) else {}
    return Call(
        label=call_label(rec), start=start, end=end, result=result,
        rule=str(rec.get("rule") or ""), reason=str(rec.get("reason") or ""), status=status,
        outcome=outcome, decision_id=str(rec.get("decision_id") or ""),
        input_tokens=_int(tokens.get("input")), output_tokens=_int(tokens.get("output")),
        tokens_estimated=bool(tokens.get("estimated") or (llm or {}).get("estimated")),
        cost_usd=_num(llm.get("cost_usd")) if llm else None, llm=llm is not None,
        ttft_ms=_num(llm.get("ttft_ms")) if llm else None,
        error=str(rec["error"]) if rec.get("error") else None,
        mcp_hidden=_int((mcp or {}).get("hidden_count")),
        delegation=_is_delegation(rec) and result == "allow")


def build(records: Iterable[Mapping[str, Any]], session: str, *, context: bool = False,
          dropped: Mapping[str, int] | None = None) -> Trace | None:
    """The family of ``session`` from any records (others' are ignored), or ``None`` when no
    record names it. ``context``: root the tree at its topmost known ancestor instead.
    ``dropped``: per session, calls the store did not keep (reported, never guessed)."""
    by_session: dict[str, dict[str, Mapping[str, Any]]] = {}
    for rec in records:
        sid = rec.get("session")
        if not isinstance(sid, str) or not sid or rec.get("phase"):
            continue  # no session: not part of a family; a "request" pre-line: not final
        seen = by_session.setdefault(sid, {})
        key = str(rec.get("decision_id") or len(seen))
        seen.setdefault(key, rec)  # rotated and live files may overlap: one call once
    if session not in by_session:
        return None
    parents: dict[str, str] = {}
    for sid, recs in by_session.items():
        for rec in recs.values():
            parent = rec.get("parent_session")
            if isinstance(parent, str) and parent and parent != sid:
                parents[sid] = parent
                break
    children: dict[str, list[str]] = {}
    for sid, parent in parents.items():
        children.setdefault(parent, []).append(sid)
    root = session
    if context:
        seen_up = {root}
        while parents.get(root) in by_session and parents[root] not in seen_up:
            root = parents[root]
            seen_up.add(root)
    node = _node(root, by_session, parents, children, dropped or {}, set())
    return Trace(focus=session, root=node)


def family_of(parents: Mapping[str, str], session: str, ancestors: bool = False) -> set[str]:
    """``session``, its descendants and (``ancestors``) the sessions above it, from a map of
    session -> parent session: what a reader of large log files keeps in its second pass."""
    children: dict[str, list[str]] = {}
    for sid, parent in parents.items():
        children.setdefault(parent, []).append(sid)
    out: set[str] = set()
    stack = [session]
    while stack:
        sid = stack.pop()
        if sid not in out:
            out.add(sid)
            stack.extend(children.get(sid, ()))
    up = parents.get(session)
    while ancestors and up is not None and up not in out:
        out.add(up)
        up = parents.get(up)
    return out


def _node(sid: str, by_session: Mapping[str, Mapping[str, Mapping[str, Any]]],
          parents: Mapping[str, str], children: Mapping[str, list[str]],
          dropped: Mapping[str, int], visiting: set[str]) -> SessionNode:
    visiting.add(sid)
    recs = sorted(by_session[sid].values(),
                  key=lambda r: (*_span(r), str(r.get("decision_id") or "")))
    first = recs[0]
    kids = [_node(c, by_session, parents, children, dropped, visiting)
            for c in children.get(sid, []) if c not in visiting]
    kids.sort(key=lambda k: (k.start if k.start is not None else float("inf"), k.session))
    calls = [_call(r) for r in recs]
    calls = _match_delegations(calls, kids)
    return SessionNode(session=sid, agent=first.get("agent"), role=first.get("role"),
                       user=first.get("user"), parent_session=parents.get(sid),
                       calls=calls, children=kids, dropped=max(0, dropped.get(sid, 0)))


def _match_delegations(calls: list[Call], kids: list[SessionNode]) -> list[Call]:
    """Each child (in start order) to the earliest unmatched delegation ended before it
    started; the delegation's label gets the child's role."""
    free = [i for i, c in enumerate(calls) if c.delegation]
    out = list(calls)
    for kid in kids:
        start = kid.start
        if start is None:
            continue
        for i in free:
            if calls[i].end <= start + _DELEGATION_SLACK_S:
                kid.delegated_by = calls[i].decision_id or f"#{i}"
                if kid.role:
                    out[i] = replace(calls[i], label=f"delegate({kid.role})")
                free.remove(i)
                break
    return out


# -- text ---------------------------------------------------------------------------------

def human_duration(seconds: float) -> str:
    """``0.4ms``, ``12ms``, ``4.2s``, ``2m05s``, ``1h02m``: the seed's spelling."""
    ms = seconds * 1000
    if ms < 10:
        return f"{ms:.1f}ms"
    if ms < 999.5:
        return f"{ms:.0f}ms"
    if seconds < 59.95:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        m, s = divmod(round(seconds), 60)
        return f"{m}m{s:02d}s"
    h, m = divmod(round(seconds / 60), 60)
    return f"{h}h{m:02d}m"


def human_cost(usd: float) -> str:
    """``$0.38``; a fraction of a cent keeps two significant digits (``$0.00012``), so a
    cheap call does not read as free."""
    if usd == 0:
        return "$0.00"
    if usd >= 0.01:
        return f"${usd:,.2f}"
    digits = 2
    while usd < 10 ** -digits and digits < 10:
        digits += 1
    return f"${usd:.{digits + 1}f}"


def _tokens_text(call: Call) -> str:
    if not call.llm:
        return ""
    return ("~" if call.tokens_estimated else "") + f"{call.tokens:,}"


def _cost_text(call: Call) -> str:
    if not call.llm:
        return ""
    return "unpriced" if call.cost_usd is None else human_cost(call.cost_usd)


def _outcome_text(call: Call) -> str:
    status = f" ({call.status})" if call.status is not None else ""
    if call.outcome == "denied":
        text = f"DENIED {call.rule}{status}"
    elif call.outcome == "cut":
        text = f"CUT {call.rule}"
    elif call.outcome == "error":  # after a status: the answer was (partly) delivered first
        err = call.error or ""
        text = "error" + (f" after {call.status}" if call.status is not None else "") + ": " + \
            (err if len(err) <= 40 else err[:39] + "...")
    elif call.outcome == "http-error":
        text = f"HTTP {call.status}"
    else:
        text = "ok"
    if call.ttft_ms is not None:
        text += f", ttft {human_duration(call.ttft_ms / 1000)}"
    if call.mcp_hidden:
        text += f", {call.mcp_hidden} hidden"
    return text


def _totals_text(t: Totals) -> str:
    calls = f"Calls: {t.calls:,}" + (f" ({t.denied:,} denied)" if t.denied else "") + \
        (f" (+{t.dropped:,} not kept)" if t.dropped else "")
    tokens = f"Tokens: {'~' if t.estimated else ''}{t.tokens:,}"
    cost = f"Cost: {human_cost(t.cost_usd)}" + (f" (+{t.unpriced} unpriced)" if t.unpriced
                                                else "")
    return f"{human_duration(t.duration)} | {calls} | {tokens} | {cost}"


def _who(node: SessionNode) -> str:
    parts = [node.agent or "anonymous"]
    if node.role:
        parts.append(f"role {node.role}")
    if node.user:
        parts.append(f"user {node.user}")
    parts.append(f"session {node.session}")
    return ", ".join(parts)


# a row: a call (6 columns), text from the label column on (a 1-tuple), or a full-width line
_Row = tuple[str, ...] | str


def _rows(node: SessionNode, origin: float, depth: int, ascii_only: bool,
          many: bool, focus: str) -> list[_Row]:
    pad = "   " * depth
    rows: list[_Row] = []
    if node.dropped:
        rows.append((f"{pad}... {node.dropped:,} earlier call(s) not kept in memory "
                     "(--log FILE has them)",))
    for i, call in enumerate(node.calls):
        offset = call.start - origin
        rows.append((f"+{human_duration(offset)}" if offset >= 0.0005 else "+0ms", pad + call.label,
                     human_duration(call.duration), _tokens_text(call), _cost_text(call),
                     _outcome_text(call)))
        key = call.decision_id or f"#{i}"
        for kid in node.children:  # the sub-agents this delegation created, right under it
            if kid.delegated_by == key:
                rows += _child_rows(kid, origin, depth, ascii_only, focus)
    for kid in node.children:  # delegated by a call these records lack: after the calls
        if kid.delegated_by is None:
            rows += _child_rows(kid, origin, depth, ascii_only, focus)
    if many:
        rows.append((f"{pad}Session: {_totals_text(node.totals)}",))
    return rows


def _child_rows(kid: SessionNode, origin: float, depth: int, ascii_only: bool,
                focus: str) -> list[_Row]:
    pad = "   " * depth
    branch = "`- " if ascii_only else "└─ "
    mark = "  <- asked" if kid.session == focus else ""
    head = f"{pad}{branch}{_who(kid)}{mark}"
    if not kid.delegated_by:
        head += " (its delegation is not in these records)"
    return [(head,), *_rows(kid, origin, depth + 1, ascii_only, True, focus)]


def render_text(trace: Trace, *, ascii_only: bool = False) -> str:
    """The seed's box: one line per call with its offset from the family's start, duration,
    tokens, cost and outcome (denials name their rule); sub-agents nested under the delegation
    that created them; per-session and family totals."""
    root = trace.root
    fam = root.family
    origin = fam.start or 0.0
    many = fam.sessions > 1
    rows: list[_Row] = [_who(root)]
    if fam.start is not None:
        rows.append("started " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(fam.start)))
    rows.append("")
    rows += _rows(root, origin, 0, ascii_only, many, trace.focus)
    rows.append("")
    label = f"Total ({fam.sessions} sessions)" if many else "Total"
    rows.append(f"{label}: {_totals_text(fam)}")
    calls = [r for r in rows if isinstance(r, tuple) and len(r) == 6]
    widths = [max((len(r[i]) for r in calls), default=0) for i in range(6)]
    lines: list[str] = []
    for r in rows:
        if isinstance(r, str):
            lines.append(r)
        elif len(r) == 1:
            lines.append(" " * (widths[0] + 2) + r[0])
        else:
            off, lab, dur, tok, cost, outcome = r
            lines.append(f"{off:>{widths[0]}}  {lab:<{widths[1]}}  {dur:>{widths[2]}}  "
                         f"{tok:>{widths[3]}}  {cost:>{widths[4]}}  {outcome}".rstrip())
    title = f" Trace: {trace.focus} "
    inner = max([len(line) for line in lines] + [len(title) + 2])
    h, v, tl, tr, bl, br = ("-", "|", "+", "+", "+", "+") if ascii_only else \
        ("─", "│", "┌", "┐", "└", "┘")
    box = [f"{tl}{h}{title}{h * (inner + 1 - len(title))}{tr}"]
    box += [f"{v} {line:<{inner}} {v}" for line in lines]
    box.append(f"{bl}{h * (inner + 2)}{br}")
    return "\n".join(box)


# -- JSON ---------------------------------------------------------------------------------

def _totals_json(t: Totals) -> dict[str, Any]:
    return {"start": t.start, "end": t.end, "duration_ms": round(t.duration * 1000, 2),
            "calls": t.calls, "denied": t.denied, "sessions": t.sessions,
            "tokens": {"input": t.input_tokens, "output": t.output_tokens, "total": t.tokens,
                       "estimated": t.estimated},
            "cost_usd": round(t.cost_usd, 8), "unpriced_calls": t.unpriced,
            "dropped_calls": t.dropped}


def _call_json(c: Call) -> dict[str, Any]:
    return {"label": c.label, "start": c.start, "end": c.end,
            "duration_ms": round(c.duration * 1000, 2), "result": c.result, "rule": c.rule,
            "reason": c.reason, "status": c.status, "outcome": c.outcome,
            "decision_id": c.decision_id,
            "tokens": {"input": c.input_tokens, "output": c.output_tokens, "total": c.tokens,
                       "estimated": c.tokens_estimated} if c.llm else None,
            "cost_usd": c.cost_usd, "ttft_ms": c.ttft_ms, "error": c.error}


def _node_json(n: SessionNode) -> dict[str, Any]:
    return {"session": n.session, "agent": n.agent, "role": n.role, "user": n.user,
            "parent_session": n.parent_session, "delegated_by": n.delegated_by,
            "dropped_calls": n.dropped, "totals": _totals_json(n.totals),
            "family_totals": _totals_json(n.family),
            "calls": [_call_json(c) for c in n.calls],
            "children": [_node_json(k) for k in n.children]}


def to_json(trace: Trace) -> dict[str, Any]:
    """The tree as plain JSON (the admin API's ``tree``, ``fleetgate trace --json``)."""
    return {"focus": trace.focus, "root": _node_json(trace.root),
            "totals": _totals_json(trace.root.family)}
