"""One MCP answer rewritten for its agent: a JSON body, or an event stream one event at a time.

:class:`AnswerFilter` holds what one answer is judged under (the flow's scope and what its
request recorded) and feeds each JSON-RPC message to the pure engine
(:func:`fleetgate.mcp.engine.rewrite_message`): list results filtered for the agent, tools
vetted (poisoning, pins), placeholders swapped for their denial errors. Answers to requests
sent on other exchanges of a session (the older transport) are found in the session's
answers owed (:class:`fleetgate.runtime.mcp.McpService`). :class:`StreamRewriter` is the
mitmproxy stream callable around it. Not an addon: used by
:class:`fleetgate.addons.mcp_answers.McpAnswers`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from mitmproxy import http

from fleetgate.addons.flowtools import cut_flow
from fleetgate.addons.state import agent_of, clear_mcp, comment_text, set_comment
from fleetgate.bodies import BodyError, max_json_depth, parse_json
from fleetgate.llm.decoding import StreamDecoder
from fleetgate.mcp.engine import McpScope, id_key, rewrite_message
from fleetgate.mcp.exchange import read_identifiers
from fleetgate.mcp.facts import base_facts
from fleetgate.mcp.listcache import AnswerCache, HiddenSummary
from fleetgate.mcp.messages import McpError
from fleetgate.mcp.sse import Event, SseRewriter
from fleetgate.metrics import GatewayMetrics
from fleetgate.runtime.mcp import McpService

__all__ = ["AnswerFilter", "StreamRewriter"]

log = logging.getLogger("fleetgate.mcp")


class AnswerFilter:
    def __init__(self, mcp: McpService, metrics: GatewayMetrics, flow: http.HTTPFlow,
                 scope: McpScope, meta: dict[str, Any]) -> None:
        self.mcp, self.metrics, self.flow = mcp, metrics, flow
        self.scope, self.meta = scope, meta

    def json(self, text: bytes) -> bytes | None:
        """The rewritten JSON answer, or ``None`` to pass it unchanged. Raises BodyError or
        ValueError: the answer is withheld."""
        if not text.strip():
            return None
        known = self._cached(text, self.meta.get("methods") or {},
                             self.meta.get("substitutions") or {})
        if known is not None:
            return known[0]
        try:
            obj = parse_json(text)
        except BodyError:
            if self.flow.response is not None and self.flow.response.status_code == 202:
                # "Accepted" (the older transport's POST answer; its JSON-RPC answer comes on
                # the GET stream): the agent gets the status, not text nobody could check
                self.meta["dropped_body"] = len(text)
                return b""
            raise
        methods: dict[str, str] = self.meta.get("methods") or {}
        subs: dict[str, Any] = self.meta.get("substitutions") or {}
        key, version = self._cache_key(text, methods, subs)
        hidden: list[tuple[str, str]] = []
        new = rewrite_message(obj, methods, subs, self.scope, hidden)
        self._hidden(hidden)
        out = None if new is obj else json.dumps(new, separators=(",", ":")).encode()
        self._remember(key, version, out, hidden)
        return out

    def event(self, event: Event) -> str | None:
        """The event's new data, or ``None`` to pass it unchanged. Raises ValueError: the
        stream is cut."""
        meta = self.meta
        if meta.get("sniff"):
            if meta.get("not_mcp"):
                return None
            if event.type != "endpoint":
                meta["not_mcp"] = True  # some other event stream: passed through untouched
                clear_mcp(self.flow)
                return None
            meta["sniff"] = False
        if event.type == "endpoint":  # older transport: where this session's POSTs go
            try:
                sid = read_identifiers((), event.data.strip()).id
            except McpError as exc:
                raise ValueError(f"the endpoint event cannot be used: {exc.message}") from None
            if sid:
                self.mcp.sessions.claim(self.scope.server, sid, agent_of(self.flow), legacy=True)
                meta["session"] = sid
            return None
        if not event.data.strip():
            return None
        sid = meta.get("session")
        data = event.data.encode()
        if not sid:  # answers owed on other exchanges are looked up by id: parsed below
            known = self._cached(data, meta.get("methods") or {}, meta.get("substitutions") or {})
            if known is not None:
                return None if known[0] is None else known[0].decode()
        # Every event with data, whatever its type (a raw client may read any), through the
        # parser JSON answers go through: strict, duplicate keys refused.
        try:
            obj = parse_json(data)
        except BodyError as exc:
            raise ValueError(f"an event's data is unreadable: {exc.message}") from None
        methods: dict[str, str] = meta.get("methods") or {}
        subs: dict[str, dict[str, Any]] = meta.get("substitutions") or {}
        if sid:  # answers to requests sent on other exchanges of the session
            s_methods, s_subs = self.mcp.sessions.owed(self.scope.server, sid)
            ids = [id_key(o.get("id")) for o in (obj if isinstance(obj, list) else [obj])
                   if isinstance(o, dict) and "method" not in o]
            methods = {**methods, **{k: s_methods.pop(k) for k in ids if k in s_methods}}
            subs = {**subs, **{k: s_subs.pop(k) for k in ids if k in s_subs}}
        key, version = self._cache_key(data, methods, subs) if not sid else (None, None)
        hidden: list[tuple[str, str]] = []
        new = rewrite_message(obj, methods, subs, self.scope, hidden)
        self._hidden(hidden)
        out = None if new is obj else json.dumps(new, separators=(",", ":"))
        self._remember(key, version, None if out is None else out.encode(), hidden)
        return out

    # -- answers already judged (fleetgate.mcp.listcache.AnswerCache) ------------------------

    def _cache_key(self, body: bytes, methods: dict[str, str],
                   subs: dict[str, Any]) -> tuple[Any, Any]:
        """The answer cache key for ``body`` and the vetting version it was taken at;
        ``(None, None)``: not cached (placeholders to swap, or no list verdicts)."""
        s = self.scope
        if subs or s.verdicts is None:
            return None, None
        base = base_facts("", s.host, s.path, s.session_id, s.server, listing=True)
        number = s.verdicts.key(s.rules, s.claims, s.request, base)
        version = s.vetting.version if s.vetting is not None else None
        return AnswerCache.key(body, methods, number, s.vetting, version,
                               (s.poisoning, s.pins, max_json_depth())), version

    def _cached(self, body: bytes, methods: dict[str, str],
                subs: dict[str, Any]) -> tuple[bytes | None] | None:
        """The rewritten answer for ``body`` when these bytes were judged under the same key
        (its hidden entries counted again), else ``None``."""
        key, _ = self._cache_key(body, methods, subs)
        hit = self.mcp.answers.get(key) if key is not None else None
        if hit is None:
            return None
        self._hidden(hit[1])
        return (hit[0],)

    def _remember(self, key: Any, version: Any, out: bytes | None,
                  hidden: list[tuple[str, str]]) -> None:
        vetting = self.scope.vetting
        if key is None or (vetting is not None and vetting.version != version):
            return  # judging it moved the vetting state: judged again next time
        self.mcp.answers.put(key, out, hidden)

    def _hidden(self, hidden: list[tuple[str, str]] | HiddenSummary) -> None:
        """Count hidden entries (metrics, the flow's log record, its comment)."""
        meta, server = self.meta, self.scope.server
        summary = hidden if isinstance(hidden, HiddenSummary) else HiddenSummary.of(hidden)
        for name, why in summary.first:
            if len(meta["hidden"]) < HiddenSummary.NAMED:
                meta["hidden"].append({"name": name, "why": why})
        for reason, n in summary.reasons:  # one counter update per reason, not per entry
            self.metrics.mcp_hidden.labels(server=server, kind="entry", reason=reason).inc(n)
        meta["hidden_count"] = meta.get("hidden_count", 0) + summary.total
        if summary.total and not comment_text(self.flow):
            set_comment(self.flow, f"MCP {server}: {meta['hidden_count']} list entries hidden")


class StreamRewriter:
    """mitmproxy's stream callable for one MCP answer: events re-framed one at a time (SSE),
    or a JSON answer held within the limit and rewritten at its end. Never raises: anything
    that cannot be judged cuts the flow (fail closed)."""

    def __init__(self, answer: AnswerFilter, encoding: str, limit: int, sse: bool) -> None:
        self.answer = answer
        self.limit = limit
        self.sse = sse
        self.decoder = StreamDecoder(encoding)
        self.rewriter = SseRewriter(answer.event, limit)
        self.body = bytearray()
        self.dead = False

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
                if self.answer.meta.get("not_mcp"):  # sniffed: another kind of event stream
                    return self.rewriter.drain() + self.decoder.feed(data)
                if data:
                    return self.rewriter.feed(self.decoder.feed(data))
                return self.rewriter.finish()
            if data:
                self.body += self.decoder.feed(data)
                if len(self.body) > self.limit:
                    raise ValueError(f"answer larger than {self.limit} bytes")
                return b""
            new = self.answer.json(bytes(self.body))
            return bytes(self.body) if new is None else new
        except Exception as exc:
            self.dead = True
            flow = self.answer.flow
            self.answer.metrics.mcp_refused.labels(reason="answer").inc()
            log.error("fleetgate: MCP answer on flow %s cut: %s", flow.id, exc)
            cut_flow(flow, "mcp.answer", f"the MCP server's answer could not be checked "
                     f"({exc}); cut rather than passed on")
            return b""
