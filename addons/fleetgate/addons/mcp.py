"""McpGuard: MCP tool governance on every transport, as a thin mitmproxy addon.

The logic is pure (:mod:`fleetgate.mcp.engine`, :mod:`.vetting`, :mod:`.sse`); this addon
finds MCP traffic, feeds it in and applies the answer:

``request`` (after HttpAuthorization allowed the HTTP request): every identifier the gateway
judges must have one reading and the method must be POST, or GET/DELETE without a body
(:mod:`fleetgate.mcp.exchange`; else ``400 mcp.ambiguous`` / ``405 mcp.method``, never
forwarded); the body is decoded and parsed strictly (bounded, no duplicate keys, JSON-RPC
only), ``Mcp-Method``/``Mcp-Name`` checked against it, the session's owner checked, every
element judged. A fully denied body is answered here with JSON-RPC errors; otherwise denied
elements become ``ping`` placeholders (see the engine). ``Accept-Encoding`` is pinned to
identity so answers can be read as they stream.

``responseheaders``: event streams get a re-framing callable (one event held at a time, never
the stream), every event's data parsed strictly; every other answer, whatever its
Content-Type, is read whole as JSON within ``fleetgate_mcp_max_body`` and withheld if it is
not JSON. List results are filtered for the agent, tools vetted (poisoning, pins),
placeholders swapped for errors.

Operators: ``fleetgate.mcp.pending``, ``fleetgate.mcp.approve``, ``fleetgate.mcp.pins``
commands (mitmweb's command bar), the same as ``/mcp/pins`` and ``/mcp/approve`` on the
metrics port, and the ``fleetgate mcp`` CLI.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mitmproxy import command, ctx, exceptions, http

from fleetgate.addons.flowtools import (
    CLAIMS,
    DECISION,
    HEADER,
    IDENTITY,
    LLM_REQUEST,
    MCP,
    NEEDS_BODY,
    allowed,
    cut_flow,
    decision_id,
    fail_closed,
    record_decision,
)
from fleetgate.addons.rules import PolicyStore
from fleetgate.bodies import BodyError, decode_body, parse_json
from fleetgate.llm.decoding import StreamDecoder
from fleetgate.mcp.engine import McpScope, check_headers, id_key, judge_request, rewrite_message
from fleetgate.mcp.exchange import (
    JUDGED_HEADERS,
    SessionRef,
    method_problem,
    read_identifiers,
    session_candidates,
)
from fleetgate.mcp.messages import INVALID_REQUEST, McpError, parse_messages
from fleetgate.mcp.pins import PinStore
from fleetgate.mcp.sessions import Sessions
from fleetgate.mcp.sse import Event, SseRewriter
from fleetgate.mcp.vetting import Report, Vetting
from fleetgate.metrics import GatewayMetrics, HealthServer, LabelBudget
from fleetgate.policy.model import McpMode, McpServer, Policy, Rule
from fleetgate.policy.normalize import normalize_host, normalize_path, request_facts

log = logging.getLogger("fleetgate.mcp")

PARSE_ERROR = -32700
_MCP_HEADERS = JUDGED_HEADERS


def _ctype(headers: Any) -> str:
    return str(headers.get("content-type", "")).split(";", 1)[0].strip().lower()


def _rpc_error(rid: Any, code: int, message: str, did: str) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rid,
                       "error": {"code": code, "message": message,
                                 "data": {"decision_id": did}}}).encode()


class McpGuard:
    def __init__(self, store: PolicyStore, metrics: GatewayMetrics,
                 health: HealthServer | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.sessions = Sessions()
        self.vetting = Vetting(PinStore(None), self._on_report)
        self.agent_labels = LabelBudget(1000)
        self.tool_labels = LabelBudget(500)
        self._rules_cache: dict[tuple[str, tuple[str, ...]], tuple[Rule, ...]] = {}
        self._rules_policy: Policy | None = None
        if health is not None:  # the admin API
            health.json_routes["/mcp/pins"] = self.pins_report
            health.admin_routes["/mcp/approve"] = self._admin_approve

    # -- options ----------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        loader.add_option(
            "fleetgate_mcp_pins", str, "",
            "JSON file of approved MCP tool definitions (server -> tool -> sha256). Read at "
            "start, written when a tool is pinned or approved. '' keeps pins in memory only.")
        loader.add_option(
            "fleetgate_mcp_trust_first_use", bool, True,
            "Pin every tool of a server's first listing. Off: every tool of a server absent "
            "from the pin file waits for approval.")
        loader.add_option(
            "fleetgate_mcp_max_body", int, 16 * 1024 * 1024,
            "Largest MCP request body, JSON answer or single event fleetgate reads; larger ones "
            "are refused (requests) or cut (answers), never passed on unread.")

    def configure(self, updated: set[str]) -> None:
        if "fleetgate_mcp_max_body" in updated and ctx.options.fleetgate_mcp_max_body <= 0:
            raise exceptions.OptionsError("fleetgate_mcp_max_body must be > 0")
        if {"fleetgate_mcp_pins", "fleetgate_mcp_trust_first_use"} & updated:
            path = ctx.options.fleetgate_mcp_pins
            try:
                pins = PinStore(Path(path) if path else None,
                                ctx.options.fleetgate_mcp_trust_first_use)
            except (OSError, ValueError) as exc:
                raise exceptions.OptionsError(f"fleetgate_mcp_pins: {exc}") from None
            self.vetting = Vetting(pins, self._on_report)

    # -- which flows are MCP ----------------------------------------------------------

    def _server(self, policy: Policy, flow: http.HTTPFlow) -> McpServer | None:
        req = flow.request
        host = normalize_host(req.host)
        path = normalize_path(req.path)
        server = policy.mcp.server_for(host, req.port, path)
        if server is not None or not policy.mcp.detect or flow.metadata.get(LLM_REQUEST):
            return server
        h = req.headers
        accept = h.get("accept", "").lower()
        name = host if req.port == 443 else f"{host}:{req.port}"
        if (any(k in h for k in _MCP_HEADERS)
                or (req.method == "POST" and "text/event-stream" in accept
                    and "application/json" in accept)
                or (req.method == "GET" and "text/event-stream" in accept)  # sniffed: see below
                # any reading of the query naming a known session: judged (and refused if
                # the readings differ)
                or any(self.sessions.get(name, s) is not None
                       for s in session_candidates(req.path))):
            return McpServer(name=name, hosts=(), declared=False)
        return None

    def _rules(self, policy: Policy, server: McpServer, profiles: Sequence[str]) -> tuple[Rule, ...]:
        if policy is not self._rules_policy:
            self._rules_cache.clear()
            self._rules_policy = policy
        key = (server.name, tuple(profiles))
        rules = self._rules_cache.get(key)
        if rules is None:
            picked = [r for p in policy.agents if p.name in profiles for r in p.mcp_rules]
            rules = (*policy.mcp.rules, *server.rules, *picked)
            self._rules_cache[key] = rules
        return rules

    def _scope(self, policy: Policy, flow: http.HTTPFlow, server: McpServer,
               sid: str | None) -> McpScope:
        req = flow.request
        decision = flow.metadata.get(DECISION) or {}
        facts = request_facts(req.method, req.scheme, req.host, req.port, req.path,
                              list(req.headers.items(multi=True)))
        return McpScope(
            claims=flow.metadata.get(CLAIMS) or {}, request=facts.to_cel(policy.cel_inputs),
            server=server.name, host=normalize_host(req.host),
            path=normalize_path(req.path.partition("?")[0]), session_id=sid,
            rules=self._rules(policy, server, decision.get("profiles") or ()),
            reveal_denied=policy.mcp.reveal_denied, decision_id=decision_id(flow),
            poisoning=server.poisoning, pins=server.pins, vetting=self.vetting)

    @staticmethod
    def _identifiers(flow: http.HTTPFlow) -> SessionRef:
        """The one session the request names; raises McpError if any identifier the gateway
        judges appears twice or could be read two ways (see :mod:`fleetgate.mcp.exchange`)."""
        req = flow.request
        return read_identifiers(req.headers.items(multi=True), req.path)

    @staticmethod
    def _has_body(req: http.Request) -> bool:
        if req.raw_content is None:  # streamed: not read, so not empty as far as we know
            return True
        return bool(req.raw_content) or bool(req.headers.get("transfer-encoding"))

    # -- requests ---------------------------------------------------------------------

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        policy = self.store.policy
        if policy is None or allowed(flow) is None:
            return
        server = self._server(policy, flow)
        if server is None:
            return
        req = flow.request
        agent = str((flow.metadata.get(IDENTITY) or {}).get("agent") or "")
        meta: dict[str, Any] = {"server": server.name, "declared": server.declared,
                                "session": None, "calls": [], "hidden": []}
        flow.metadata[MCP] = meta
        try:
            ref = self._identifiers(flow)
        except McpError as exc:
            self.metrics.mcp_refused.labels(reason="ambiguous").inc()
            self._refuse(flow, 400, exc.code, exc.message, "mcp.ambiguous",
                         self._best_id(req), meta)
            return
        sid, in_query = ref.id, ref.in_query
        meta["session"] = sid
        problem = method_problem(req.method, self._has_body(req))
        if problem:
            self.metrics.mcp_refused.labels(reason="method").inc()
            self._refuse(flow, 405, INVALID_REQUEST, problem, "mcp.method", self._best_id(req),
                         meta)
            assert flow.response is not None
            flow.response.headers["Allow"] = "GET, POST, DELETE"
            return
        if not server.declared and req.method == "GET" and not any(k in req.headers
                                                                  for k in _MCP_HEADERS):
            # An event stream from an undeclared host may be the older MCP transport (its GET
            # carries no MCP header): it is MCP only if its first event is ``endpoint``.
            meta["sniff"] = True
        # Answers must be readable as they pass: no compression on MCP responses.
        req.headers["accept-encoding"] = "identity"
        if sid:
            owner_problem = self.sessions.claim(server.name, sid, agent)
            if owner_problem:
                self._refuse(flow, 403, INVALID_REQUEST, owner_problem, "mcp.session-owner",
                             None, meta)
                return
        if req.method == "DELETE" and sid:
            self.sessions.forget(server.name, sid)
            return
        if req.method != "POST":  # a GET without a body: the event stream
            meta["transport"] = "stream"
            return
        session = self.sessions.get(server.name, sid) if sid else None
        legacy = bool(session and session.legacy) or (
            in_query and "text/event-stream" not in req.headers.get("accept", "").lower())
        meta["transport"] = "sse-legacy" if legacy else "streamable-http"
        scope = self._scope(policy, flow, server, sid)
        # an undeclared server recognised only by the client's Accept header: a body that is
        # not JSON-RPC means this is not MCP after all (only the HTTP rules apply)
        guessed = not server.declared and session is None and not any(
            k in req.headers for k in _MCP_HEADERS)
        body: Any = None
        try:
            raw = decode_body(req.raw_content or b"", req.headers.get("content-encoding", ""),
                              ctx.options.fleetgate_mcp_max_body)
            body = parse_json(raw)
            messages, batch = parse_messages(body)
            check_headers({k.lower(): v for k, v in req.headers.items()}, messages, batch)
        except (BodyError, McpError) as exc:
            if guessed:
                flow.metadata.pop(MCP, None)
                return
            self._refuse_unreadable(flow, exc, body, meta)
            return
        plan = judge_request(messages, batch, scope, answer_directly=not legacy)
        for rec in plan.records:
            meta["calls"].append(rec.as_dict())
            self.metrics.mcp_messages.labels(
                server=server.name, method=rec.method, tool=self.tool_labels(rec.target),
                decision="allow" if rec.allow else "deny", rule=rec.rule,
                agent=self.agent_labels(agent)).inc()
        meta["methods"], meta["substitutions"] = plan.methods, plan.substitutions
        meta["facts"] = plan.facts
        if sid and legacy:  # the answers will come on the session's GET stream
            self.sessions.expect(server.name, sid, plan.methods, plan.substitutions)
        denied = plan.denied
        if denied:
            first = denied[0]
            what = f"{first.method} {first.target}".strip()
            flow.marked = ":no_entry:"
            flow.comment = (f"MCP {server.name}: denied {what} by {first.rule}: {first.reason}"
                            + (f" (+{len(denied) - 1} more)" if len(denied) > 1 else ""))
        if plan.answer_status:
            body_out = b"" if plan.answer is None else json.dumps(plan.answer).encode()
            headers = {HEADER: decision_id(flow)}
            if body_out:
                headers["Content-Type"] = "application/json"
            flow.response = http.Response.make(plan.answer_status, body_out, headers)
            record_decision(flow, False, denied[0].rule, denied[0].reason, plan.answer_status,
                            profiles=(flow.metadata.get(DECISION) or {}).get("profiles"))
            return
        if plan.forward is not None:
            req.headers.pop("content-encoding", None)
            req.content = json.dumps(plan.forward).encode()

    @staticmethod
    def _best_id(req: http.Request) -> Any:
        """The JSON-RPC id of a single-message body, for a refusal's answer; None if none can
        be read (the refusal never depends on it)."""
        try:
            raw = decode_body(req.raw_content or b"", req.headers.get("content-encoding", ""),
                              ctx.options.fleetgate_mcp_max_body)
            body = parse_json(raw)
        except (BodyError, ValueError):
            return None
        rid = body.get("id") if isinstance(body, dict) else None
        return rid if isinstance(rid, str | int) and not isinstance(rid, bool) else None

    def _refuse_unreadable(self, flow: http.HTTPFlow, exc: BodyError | McpError, body: Any,
                           meta: dict[str, Any]) -> None:
        if isinstance(exc, BodyError):
            self.metrics.mcp_refused.labels(reason=f"body-{exc.status}").inc()
            self._refuse(flow, exc.status, PARSE_ERROR if exc.status == 400 else INVALID_REQUEST,
                         exc.message, "mcp.body", None, meta)
            return
        self.metrics.mcp_refused.labels(reason=str(exc.code)).inc()
        rid = body.get("id") if isinstance(body, dict) else None
        rule = "mcp.header-mismatch" if exc.code == -32020 else "mcp.body"
        self._refuse(flow, 400, exc.code, exc.message, rule, rid, meta)

    def _refuse(self, flow: http.HTTPFlow, status: int, code: int, message: str, rule: str,
                rid: Any, meta: dict[str, Any]) -> None:
        did = decision_id(flow)
        text = (f"fleetgate refused this MCP request: {message}. Send one well-formed JSON-RPC "
                "message or batch per request, unchanged headers, on your own session.")
        flow.response = http.Response.make(status, _rpc_error(rid, code, text, did),
                                           {"Content-Type": "application/json", HEADER: did})
        record_decision(flow, False, rule, message, status)
        meta["calls"].append({"method": "", "target": "", "allow": False, "rule": rule,
                              "reason": message})
        flow.marked = ":no_entry:"
        flow.comment = f"MCP refused by {rule}: {message}"

    # -- responses --------------------------------------------------------------------

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(MCP)
        resp = flow.response
        if not isinstance(meta, dict) or resp is None or flow.error:
            return
        decision = flow.metadata.get(DECISION) or {}
        if not decision.get("allow"):
            return
        policy = self.store.policy
        if policy is None:
            cut_flow(flow, "no-policy", "the gateway lost its policy")
            return
        server = self._server(policy, flow) or McpServer(meta["server"], (), declared=False)
        if len(resp.headers.get_all("mcp-session-id")) > 1:
            cut_flow(flow, "mcp.answer", "the MCP server named two sessions in one answer")
            return
        sid = resp.headers.get("mcp-session-id") or meta.get("session")
        if sid and not meta.get("session"):  # initialize: the server names the session
            agent = str((flow.metadata.get(IDENTITY) or {}).get("agent") or "")
            problem = self.sessions.claim(server.name, sid, agent)
            if problem:
                cut_flow(flow, "mcp.session-owner", problem)
                return
        scope = self._scope(policy, flow, server, sid)
        ctype = _ctype(resp.headers)
        limit = ctx.options.fleetgate_mcp_max_body
        encoding = resp.headers.get("content-encoding", "")
        if meta.get("sniff") and ctype != "text/event-stream":
            flow.metadata.pop(MCP, None)  # a GET of something else: not the older MCP transport
            return
        if ctype == "text/event-stream":
            resp.headers.pop("content-encoding", None)
            resp.headers.pop("content-length", None)
            resp.stream = _StreamRewriter(self, flow, scope, meta, encoding, limit, sse=True)
        else:
            # JSON, or labelled otherwise (text/plain, none at all): every answer is read by
            # the same strict parser; what is not JSON is withheld (see response()).
            length = resp.headers.get("content-length")
            if length is not None and length.strip().isdigit() and int(length) <= limit:
                meta["buffered"] = True  # read whole by mitmproxy; rewritten in response()
                flow.metadata[NEEDS_BODY] = True
                return
            resp.headers.pop("content-encoding", None)
            resp.headers.pop("content-length", None)
            resp.stream = _StreamRewriter(self, flow, scope, meta, encoding, limit, sse=False)

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(MCP)
        resp = flow.response
        if not isinstance(meta, dict) or not meta.get("buffered") or resp is None:
            return
        policy = self.store.policy
        assert policy is not None
        server = self._server(policy, flow) or McpServer(meta["server"], (), declared=False)
        scope = self._scope(policy, flow, server, meta.get("session"))
        raw = resp.raw_content or b""
        try:
            text = decode_body(raw, resp.headers.get("content-encoding", ""),
                               ctx.options.fleetgate_mcp_max_body)
            new = self.rewrite_json(flow, scope, meta, text)
        except (BodyError, ValueError) as exc:
            self._bad_answer(flow, meta, exc.message if isinstance(exc, BodyError) else str(exc))
            return
        if new is not None:
            resp.headers.pop("content-encoding", None)
            resp.content = new

    def _bad_answer(self, flow: http.HTTPFlow, meta: dict[str, Any], why: str) -> None:
        """An answer we cannot judge is not passed on: the agent gets a JSON-RPC error."""
        self.metrics.mcp_refused.labels(reason="answer").inc()
        did = decision_id(flow)
        msg = f"fleetgate could not check the MCP server's answer ({why}); it was withheld"
        assert flow.response is not None
        # an error status is kept (a client re-initialises on 404...), its body is not
        status = flow.response.status_code if flow.response.status_code >= 400 else 502
        flow.response = http.Response.make(
            status, _rpc_error(None, INVALID_REQUEST, msg, did),
            {"Content-Type": "application/json", HEADER: did})
        record_decision(flow, False, "mcp.answer", msg, status)
        flow.marked = ":no_entry:"
        flow.comment = msg

    def rewrite_json(self, flow: http.HTTPFlow, scope: McpScope, meta: dict[str, Any],
                     text: bytes) -> bytes | None:
        """The rewritten JSON answer, or ``None`` to pass it unchanged. Raises BodyError or
        ValueError: the answer is withheld."""
        if not text.strip():
            return None
        try:
            obj = parse_json(text)
        except BodyError:
            if flow.response is not None and flow.response.status_code == 202:
                # "Accepted" (the older transport's POST answer; its JSON-RPC answer comes on
                # the GET stream): the agent gets the status, not text nobody could check
                meta["dropped_body"] = len(text)
                return b""
            raise
        hidden: list[tuple[str, str]] = []
        new = rewrite_message(obj, meta.get("methods") or {}, meta.get("substitutions") or {},
                              scope, hidden)
        self._hidden(flow, scope, meta, hidden)
        return None if new is obj else json.dumps(new, separators=(",", ":")).encode()

    def rewrite_event(self, flow: http.HTTPFlow, scope: McpScope, meta: dict[str, Any],
                      event: Event) -> str | None:
        if meta.get("sniff"):
            if meta.get("not_mcp"):
                return None
            if event.type != "endpoint":
                meta["not_mcp"] = True  # some other event stream: passed through untouched
                flow.metadata.pop(MCP, None)
                return None
            meta["sniff"] = False
        if event.type == "endpoint":  # older transport: where this session's POSTs go
            try:
                sid = read_identifiers((), event.data.strip()).id
            except McpError as exc:
                raise ValueError(f"the endpoint event cannot be used: {exc.message}") from None
            if sid:
                agent = str((flow.metadata.get(IDENTITY) or {}).get("agent") or "")
                self.sessions.claim(scope.server, sid, agent, legacy=True)
                meta["session"] = sid
            return None
        if not event.data.strip():
            return None
        # Every event with data, whatever its type (a raw client may read any), through the
        # parser JSON answers go through: strict, duplicate keys refused.
        try:
            obj = parse_json(event.data.encode())
        except BodyError as exc:
            raise ValueError(f"an event's data is unreadable: {exc.message}") from None
        methods: dict[str, str] = meta.get("methods") or {}
        subs: dict[str, dict[str, Any]] = meta.get("substitutions") or {}
        sid = meta.get("session")
        if sid:  # answers to requests sent on other exchanges of the session
            s_methods, s_subs = self.sessions.owed(scope.server, sid)
            ids = [id_key(o.get("id")) for o in (obj if isinstance(obj, list) else [obj])
                   if isinstance(o, dict) and "method" not in o]
            methods = {**methods, **{k: s_methods.pop(k) for k in ids if k in s_methods}}
            subs = {**subs, **{k: s_subs.pop(k) for k in ids if k in s_subs}}
        hidden: list[tuple[str, str]] = []
        new = rewrite_message(obj, methods, subs, scope, hidden)
        self._hidden(flow, scope, meta, hidden)
        return None if new is obj else json.dumps(new, separators=(",", ":"))

    def _hidden(self, flow: http.HTTPFlow, scope: McpScope, meta: dict[str, Any],
                hidden: list[tuple[str, str]]) -> None:
        for name, why in hidden:
            reason = ("poisoning" if why.startswith("tool poisoning") else
                      "pin" if "approv" in why else "policy")
            self.metrics.mcp_hidden.labels(server=scope.server, kind="entry", reason=reason).inc()
            meta["hidden_count"] = meta.get("hidden_count", 0) + 1
            if len(meta["hidden"]) < 20:  # the log line names the first few; metrics count all
                meta["hidden"].append({"name": name, "why": why})
        if hidden and not flow.comment:
            flow.comment = f"MCP {scope.server}: {meta['hidden_count']} list entries hidden"

    # -- vetting reports and operator actions -----------------------------------------

    def _on_report(self, r: Report) -> None:
        self.metrics.mcp_findings.labels(server=r.server, rule=r.rule, mode=r.mode.value).inc()
        self.metrics.mcp_pending.set(len(self.vetting.pins.pending()))
        action = {McpMode.ENFORCE: "hidden", McpMode.REPORT: "reported only (report mode)",
                  McpMode.OFF: "ignored"}[r.mode]
        log.warning("fleetgate: MCP server %r tool %r: %s in %s (%s): %s; sha256 %s",
                    r.server, r.tool, r.rule, r.field, r.detail, action, r.fingerprint[:12])

    def pins_report(self) -> dict[str, Any]:
        pins = self.vetting.pins
        return {"pins": pins.pins(),
                "pending": [{"server": p.server, "tool": p.tool, "state": p.state.value,
                             "sha256": p.fingerprint} for p in pins.pending()]}

    def approve(self, server: str, tool: str) -> bool:
        ok = self.vetting.pins.approve(server, tool)
        self.metrics.mcp_pending.set(len(self.vetting.pins.pending()))
        if ok:
            log.warning("fleetgate: MCP tool %r of server %r approved by an operator", tool, server)
        return ok

    def _admin_approve(self, args: dict[str, Any]) -> dict[str, Any]:
        server, tool = args.get("server"), args.get("tool")
        if not isinstance(server, str) or not isinstance(tool, str):
            raise ValueError("send {\"server\": ..., \"tool\": ...}")
        if not self.approve(server, tool):
            raise ValueError(f"nothing pending for tool {tool!r} of server {server!r}")
        return {"approved": {"server": server, "tool": tool}}

    @command.command("fleetgate.mcp.pending")
    def cmd_pending(self) -> Sequence[str]:
        """MCP tools waiting for approval: server, tool, new/changed, sha256."""
        return [f"{p.server} {p.tool} {p.state.value} {p.fingerprint[:12]}"
                for p in self.vetting.pins.pending()]

    @command.command("fleetgate.mcp.approve")
    def cmd_approve(self, server: str, tool: str) -> str:
        """Approve the pending definition of one MCP tool (pins it, shows it again)."""
        if self.approve(server, tool):
            return f"approved {tool} of {server}"
        raise exceptions.CommandError(f"nothing pending for {tool!r} of {server!r}")

    @command.command("fleetgate.mcp.pins")
    def cmd_pins(self) -> Sequence[str]:
        """Pinned MCP tool definitions: server, tool, sha256."""
        return [f"{s} {t} {h[:12]}" for s, tools in sorted(self.vetting.pins.pins().items())
                for t, h in sorted(tools.items())]


class _StreamRewriter:
    """mitmproxy's stream callable for one MCP answer: events re-framed one at a time (SSE),
    or a JSON answer held within the limit and rewritten at its end. Never raises: anything
    that cannot be judged cuts the flow (fail closed)."""

    def __init__(self, guard: McpGuard, flow: http.HTTPFlow, scope: McpScope,
                 meta: dict[str, Any], encoding: str, limit: int, sse: bool) -> None:
        self.guard, self.flow, self.scope, self.meta = guard, flow, scope, meta
        self.limit = limit
        self.sse = sse
        self.decoder = StreamDecoder(encoding)
        self.rewriter = SseRewriter(self._event, limit)
        self.body = bytearray()
        self.dead = False

    def _event(self, event: Event) -> str | None:
        return self.guard.rewrite_event(self.flow, self.scope, self.meta, event)

    def __call__(self, data: bytes) -> list[bytes]:
        # A list, never b"": mitmproxy frames every returned bytes object as an HTTP/1 chunk,
        # and an empty one is the zero-length chunk that ends the body.
        out = self._feed(data)
        return [out] if out else []

    def _feed(self, data: bytes) -> bytes:
        if self.dead:
            return b""
        try:
            if self.sse:
                if self.meta.get("not_mcp"):  # sniffed: another kind of event stream
                    return self.rewriter.drain() + self.decoder.feed(data)
                if data:
                    return self.rewriter.feed(self.decoder.feed(data))
                return self.rewriter.finish()
            if data:
                self.body += self.decoder.feed(data)
                if len(self.body) > self.limit:
                    raise ValueError(f"answer larger than {self.limit} bytes")
                return b""
            new = self.guard.rewrite_json(self.flow, self.scope, self.meta, bytes(self.body))
            return bytes(self.body) if new is None else new
        except Exception as exc:
            self.dead = True
            self.guard.metrics.mcp_refused.labels(reason="answer").inc()
            log.error("fleetgate: MCP answer on flow %s cut: %s", self.flow.id, exc)
            cut_flow(self.flow, "mcp.answer", f"the MCP server's answer could not be checked "
                     f"({exc}); cut rather than passed on")
            return b""
