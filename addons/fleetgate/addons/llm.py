"""LlmInspector and LlmMeter: recognise LLM calls, give rules ``llm.*``, count every token.

LlmInspector (``request``, before the rules): routes by host and path through the policy's
provider table, decodes and parses the body once (refusing what cannot be read: 400/413),
asks OpenAI chat streams for their usage chunk, and stores the facts in
``flow.metadata["fleetgate.llm"]`` where the rules and mitmweb see them.

LlmMeter (``responseheaders``): every LLM response passes through a streaming callable that
hands each chunk to the agent unchanged and tees a decoded copy into the usage parser, so a
stream is never buffered. At the end (or when the flow errors or is cut) the usage, as the
provider reported it or else estimated from what streamed, is priced, logged, exported as
GenAI metrics and added to the ledger.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from mitmproxy import ctx, exceptions, http

from fleetgate.addons.flowtools import (
    DECISION,
    IDENTITY,
    LLM_REQUEST,
    LLM_USAGE,
    close_flow,
    deny,
    fail_closed,
    mark_cut,
    settled,
)
from fleetgate.addons.rules import PolicyStore
from fleetgate.llm.decoding import StreamDecoder
from fleetgate.llm.ledger import Ledger
from fleetgate.llm.request import LlmRequestError, decode_body, parse_json, parse_request
from fleetgate.llm.tokenizer import count_tokens
from fleetgate.llm.usage import StreamAccountant, Usage, usage_from_json
from fleetgate.metrics import GatewayMetrics, LabelBudget
from fleetgate.policy.normalize import normalize_host, normalize_path

log = logging.getLogger(__name__)

class LlmInspector:
    def __init__(self, store: PolicyStore, metrics: GatewayMetrics) -> None:
        self.store = store
        self.metrics = metrics

    def load(self, loader: Any) -> None:
        loader.add_option(
            "fleetgate_llm_max_body", int, 16 * 1024 * 1024,
            "Largest LLM request body (after decompression) fleetgate inspects; larger ones "
            "are refused with 413 rather than passed on unread.")

    def configure(self, updated: set[str]) -> None:
        if "fleetgate_llm_max_body" in updated and ctx.options.fleetgate_llm_max_body <= 0:
            raise exceptions.OptionsError("fleetgate_llm_max_body must be > 0")

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if settled(flow) or self.store.policy is None:
            return
        req = flow.request
        path = normalize_path(req.path.partition("?")[0])
        route = self.store.policy.providers.route(normalize_host(req.host), req.port, path)
        if route is None or req.method != "POST":
            return
        try:
            raw = decode_body(req.raw_content or b"", req.headers.get("content-encoding", ""),
                              ctx.options.fleetgate_llm_max_body)
            body = parse_json(raw)
            facts = parse_request(route, body, path)
        except LlmRequestError as exc:
            self.metrics.llm_refused.labels(reason=str(exc.status)).inc()
            deny(flow, exc.status, "llm.body", exc.message,
                 hint="send a JSON body the provider accepts, within the gateway's inspection "
                      "limit")
            return
        meta = {"is_llm": True, **facts.to_cel(), "injected_usage": False}
        if (facts.api == "openai" and facts.streaming and not facts.include_usage
                and facts.operation in ("chat", "text_completion")):
            # Without it an OpenAI stream carries no usage and could only be estimated.
            opts = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
            body["stream_options"] = {**opts, "include_usage": True}
            req.content = json.dumps(body).encode()  # re-encoded per Content-Encoding
            meta["injected_usage"] = True
        flow.metadata[LLM_REQUEST] = meta


class LlmMeter:
    def __init__(self, store: PolicyStore, metrics: GatewayMetrics, ledger: Ledger) -> None:
        self.store = store
        self.metrics = metrics
        self.ledger = ledger
        self.agent_labels = LabelBudget(1000)
        self.model_labels = LabelBudget(200)
        self._meters: dict[str, _Meter] = {}
        # Called as a stream's output grows: (flow, estimated input, output so far) -> a reason
        # to end the stream now (a budget or token limit crossed mid-stream), or None.
        self.stream_guards: list[Callable[[http.HTTPFlow, int, int], str | None]] = []
        # flows some guard holds a reservation for: only their output is counted as it streams
        self.watched: set[str] = set()

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        llm = flow.metadata.get(LLM_REQUEST)
        decision = flow.metadata.get(DECISION)
        if (not isinstance(llm, dict) or flow.response is None or flow.error
                or not (isinstance(decision, dict) and decision.get("allow"))):
            return
        meter = _Meter(self, flow, llm)
        self._meters[flow.id] = meter
        flow.response.stream = meter.chunk

    def response(self, flow: http.HTTPFlow) -> None:
        meter = self._meters.pop(flow.id, None)
        if meter is not None:
            meter.finish(cut=False)

    def error(self, flow: http.HTTPFlow) -> None:
        meter = self._meters.pop(flow.id, None)
        if meter is not None:
            meter.finish(cut=True)

    # -- accounting -------------------------------------------------------------------

    def record(self, flow: http.HTTPFlow, llm: dict[str, Any], usage: Usage | None,
               outcome: str, response_model: str | None, ttft: float | None) -> None:
        policy = self.store.policy
        model = llm.get("model") or response_model or ""
        ident = flow.metadata.get(IDENTITY) or {}
        agent = self.agent_labels(ident.get("agent"))
        role = ident.get("role") or ""
        cost = policy.pricing.cost(model, usage) if (policy and usage) else None
        priced = usage is None or cost is not None
        labels = {"gen_ai_provider_name": llm.get("provider", ""),
                  "gen_ai_request_model": self.model_labels(model),
                  "gen_ai_operation_name": llm.get("operation", "")}
        m = self.metrics
        m.genai_calls.labels(**labels, agent=agent, role=role, outcome=outcome,
                             usage="none" if usage is None else
                             ("estimated" if usage.estimated else "reported"),
                             priced=str(priced).lower()).inc()
        if flow.request.timestamp_start:
            m.genai_duration.labels(**labels).observe(time.time() - flow.request.timestamp_start)
        if ttft is not None:
            m.genai_ttft.labels(**labels).observe(ttft)
        result: dict[str, Any] = {"provider": llm.get("provider"), "model": model,
                                  "response_model": response_model, "outcome": outcome}
        if usage is not None:
            for kind, value in (("input", usage.input), ("output", usage.output),
                                ("cache_read", usage.cache_read),
                                ("cache_write", usage.cache_write),
                                ("reasoning", usage.reasoning)):
                if value:
                    m.genai_tokens.labels(gen_ai_token_type=kind, **labels, agent=agent, role=role,
                                          estimated=str(usage.estimated).lower()).inc(value)
                    m.genai_token_histogram.labels(gen_ai_token_type=kind, **labels).observe(value)
            if cost is not None:
                m.genai_cost.labels(**labels, agent=agent, role=role).inc(cost)
            self.ledger.add(ident.get("agent"), ident.get("session"), usage, cost)
            result.update(tokens=usage.as_dict(), cost_usd=None if cost is None else round(cost, 8),
                          priced=cost is not None, estimated=usage.estimated)
        flow.metadata[LLM_USAGE] = result
        if usage is not None and not flow.comment:  # one glance in mitmweb's flow list
            price = "unpriced" if cost is None else f"${cost:.6f}"
            est = " (estimated)" if usage.estimated else ""
            flow.comment = (f"{llm.get('provider')} {model}: {usage.input} in / {usage.output} "
                            f"out tokens{est}, {price}")


class _Meter:
    """One response's tee: pass every chunk on unchanged, count a decoded copy."""

    def __init__(self, owner: LlmMeter, flow: http.HTTPFlow, llm: dict[str, Any]) -> None:
        assert flow.response is not None
        self.owner = owner
        self.flow = flow
        self.llm = llm
        self.status = flow.response.status_code
        ctype = flow.response.headers.get("content-type", "").split(";")[0].strip().lower()
        self.sse = ctype == "text/event-stream"
        self.accountant = StreamAccountant(str(llm.get("api")), llm.get("model") or None)
        self.body = bytearray()
        self.limit = ctx.options.fleetgate_llm_max_body
        self.overflow = False
        self.first_at: float | None = None
        self.done = False
        self.broken: str | None = None
        self.stopped: str | None = None  # a guard ended the stream: why
        self.out_tokens = 0  # output tokens so far (estimated from the streamed text)
        self._counted = 0  # how many text pieces out_tokens covers
        try:
            self.decoder: StreamDecoder | None = StreamDecoder(
                flow.response.headers.get("content-encoding", ""))
        except ValueError as exc:
            self.decoder, self.broken = None, str(exc)

    def chunk(self, data: bytes) -> bytes | list[bytes]:
        """mitmproxy's stream callable: must return the bytes to send, and never raise."""
        if self.stopped:
            return []  # never b"": an empty HTTP/1 chunk would end the body cleanly
        if data:
            if self.first_at is None:
                self.first_at = time.time()
            try:
                if self.decoder is not None and not self.broken:
                    text = self.decoder.feed(data)
                    if self.sse:
                        self.accountant.feed(text)
                        if self.flow.id in self.owner.watched:
                            stop = self._guard()
                            if stop:
                                return [data, self._stop(stop)]
                    elif len(self.body) + len(text) <= self.limit:
                        self.body += text
                    else:
                        self.overflow = True
            except Exception as exc:  # accounting must never corrupt the agent's stream
                self.broken = f"{type(exc).__name__}: {exc}"
        else:
            self.finish(cut=False)
        return data

    def _guard(self) -> str | None:
        pieces = self.accountant.text
        if len(pieces) == self._counted:
            return None
        self.out_tokens += count_tokens("".join(pieces[self._counted:]), self.llm.get("model"))
        self._counted = len(pieces)
        est_in = int(self.llm.get("estimated_input_tokens") or 0)
        for guard in self.owner.stream_guards:
            reason = guard(self.flow, est_in, self.out_tokens)
            if reason:
                return reason
        return None

    def _stop(self, reason: str) -> bytes:
        """End the stream here: a final error event the provider's SDK raises, then the
        connection is closed (shortly, so the event is flushed first)."""
        self.stopped = reason
        rule, _, why = reason.partition(": ")
        message = f"fleetgate ended this stream ({rule}): {why}"
        if self.llm.get("api") == "anthropic":
            event = ("event: error\ndata: " + json.dumps(
                {"type": "error", "error": {"type": "rate_limit_error", "message": message}})
                + "\n\n")
        else:
            event = "data: " + json.dumps({"error": {"message": message, "type": "budget_exceeded",
                                                     "code": rule, "param": None}}) + "\n\n"
        self.owner.metrics.flows_cut.labels(rule=rule).inc()
        log.warning("fleetgate: stream %s of agent %r cut mid-way: %s", self.flow.id,
                    (self.flow.metadata.get(IDENTITY) or {}).get("agent"), reason)
        mark_cut(self.flow, rule, why)
        # closed a moment later, so the error event is flushed to the agent first
        asyncio.get_running_loop().call_later(0.2, close_flow, self.flow)
        return event.encode()

    def finish(self, cut: bool) -> None:
        if self.done:
            return
        self.done = True
        try:
            self._finish(cut)
        except Exception:
            log.exception("fleetgate: LLM accounting failed for flow %s", self.flow.id)

    def _finish(self, cut: bool) -> None:
        flow, llm = self.flow, self.llm
        req_end = flow.request.timestamp_end
        ttft = (self.first_at - req_end) if (self.first_at and req_end and self.sse) else None
        est_in = int(llm.get("estimated_input_tokens") or 0)
        usage: Usage | None = None
        response_model: str | None = None
        if self.broken:
            log.warning("fleetgate: could not meter flow %s: %s", flow.id, self.broken)
        if self.sse:
            response_model = self.accountant.model
            if self.accountant.events or cut:
                usage = self.accountant.finish(est_in)
        elif not self.overflow and not self.broken and self.body:
            try:
                parsed = json.loads(bytes(self.body))
            except ValueError:
                parsed = None
            usage = usage_from_json(str(llm.get("api")), parsed)
            if isinstance(parsed, dict):
                response_model = parsed.get("model") or parsed.get("modelVersion")
        if self.broken and usage is not None:
            usage = replace(usage, estimated=True)  # we may have missed part of the stream
        if usage is None and (cut or self.broken or self.overflow):
            usage = Usage(input=est_in, estimated=True)
        if not llm.get("operation") or llm.get("operation") == "count_tokens":
            usage = None  # counting tokens is free: nothing was generated or billed
        outcome = "cut" if cut else ("ok" if 200 <= self.status < 300 else f"http_{self.status}")
        self.owner.record(flow, llm, usage, outcome, response_model, ttft)
