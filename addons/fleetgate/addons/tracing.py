"""Tracing: an OpenTelemetry span for every flow the gateway judges, exported over OTLP.

Spans are built from the decision record DecisionLog writes (it calls :meth:`on_record`
with each final record), so traces, the log and ``fleetgate trace`` say the same thing;
:mod:`fleetgate.telemetry.spans` shapes them, :mod:`fleetgate.telemetry.export` hands them to
the SDK, whose worker threads batch and export them (the event loop only enqueues).

Per flow, before it is forwarded (``request``, after every check): its span id is fixed, so
with ``fleetgate_otel_propagate`` the upstream gets a ``traceparent`` naming the gateway's
span; when a profile captures LLM contents, the stream counter is told to keep the answer's
text. Per session: a span covering the calls this gateway saw, emitted once the session has
been idle ``fleetgate_otel_session_idle`` seconds (and at shutdown).

Off unless an OTLP endpoint is configured (option or ``OTEL_EXPORTER_OTLP_ENDPOINT``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from typing import Any

from mitmproxy import ctx, exceptions, http

from fleetgate import __version__
from fleetgate.addons.flowtools import fail_closed, settled
from fleetgate.addons.state import decision_of, identity_of, llm_request_of, verified_claims
from fleetgate.metrics import GatewayMetrics
from fleetgate.policy.model import Capture
from fleetgate.runtime.policy import PolicyService
from fleetgate.telemetry.capture import (
    CAPTURE,
    CAPTURED_OUTPUT,
    completion_attributes,
    prompt_attributes,
)
from fleetgate.telemetry.export import ExportConfig, OtlpExport, resolve
from fleetgate.telemetry.spans import (
    SessionTally,
    flow_span,
    parse_traceparent,
    session_span,
    session_trace_id,
    traceparent,
)

__all__ = ["TRACE", "Tracing"]

log = logging.getLogger("fleetgate.telemetry")

TRACE = "fleetgate.trace"  # flow.metadata: {"span_id": hex, "agent_traceparent": str|None}
MAX_SESSIONS = 10_000  # open session tallies; the oldest is emitted early past this
_OPTIONS = {"fleetgate_otel_endpoint", "fleetgate_otel_protocol", "fleetgate_otel_service_name",
            "fleetgate_otel_queue", "fleetgate_otel_metrics"}


class Tracing:
    def __init__(self, policies: PolicyService, metrics: GatewayMetrics) -> None:
        self.policies = policies
        self.metrics = metrics
        self.export: OtlpExport | None = None
        self.config: ExportConfig | None = None
        self.sessions: OrderedDict[str, SessionTally] = OrderedDict()
        self._sweeper: asyncio.Task[None] | None = None
        policies.add_status("telemetry", self._status)

    def load(self, loader: Any) -> None:
        loader.add_option("fleetgate_otel_endpoint", str, "",
                          "OTLP endpoint for traces and metrics (e.g. http://collector:4318 "
                          "for http/protobuf, http://collector:4317 for grpc). Empty: "
                          "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT; "
                          "neither set: no export.")
        loader.add_option("fleetgate_otel_protocol", str, "",
                          "'http/protobuf' or 'grpc'. Empty: OTEL_EXPORTER_OTLP_PROTOCOL, "
                          "else http/protobuf.")
        loader.add_option("fleetgate_otel_service_name", str, "",
                          "service.name of the spans. Empty: OTEL_SERVICE_NAME, else "
                          "'fleetgate'.")
        loader.add_option("fleetgate_otel_queue", int, 2048,
                          "Spans waiting for export at most; past it spans are dropped and "
                          "counted (fleetgate_otel_spans_total{result=\"dropped\"}), never "
                          "queued without bound.")
        loader.add_option("fleetgate_otel_metrics", bool, True,
                          "Also export metrics over OTLP (gen_ai.client.token.usage, "
                          "gen_ai.client.operation.duration, mcp.client.operation.duration, "
                          "...) when exporting. /metrics (Prometheus) is served either way.")
        loader.add_option("fleetgate_otel_session_idle", int, 30,
                          "Seconds without a call after which a session's span (its calls' "
                          "parent, with the session's totals) is exported.")
        loader.add_option("fleetgate_otel_propagate", bool, False,
                          "Send a W3C traceparent naming the gateway's span to the upstream "
                          "(replacing the agent's, which the gateway's span continues).")

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if opts.fleetgate_otel_queue < 1:
            raise exceptions.OptionsError("fleetgate_otel_queue must be >= 1")
        if opts.fleetgate_otel_session_idle < 1:
            raise exceptions.OptionsError("fleetgate_otel_session_idle must be >= 1 second")
        if self.export is not None and not updated & _OPTIONS:
            return
        try:
            cfg = resolve(endpoint=opts.fleetgate_otel_endpoint,
                          protocol=opts.fleetgate_otel_protocol,
                          service_name=opts.fleetgate_otel_service_name,
                          queue=opts.fleetgate_otel_queue, metrics=opts.fleetgate_otel_metrics)
        except ValueError as exc:
            raise exceptions.OptionsError(f"fleetgate_otel: {exc}") from None
        if cfg == self.config:
            return
        self._close()
        self.config = cfg
        if cfg is not None:
            self.export = OtlpExport(cfg, version=__version__, count=self._count)
            log.info("fleetgate: exporting traces%s over OTLP %s to %s",
                     " and metrics" if cfg.metrics else "", cfg.protocol, cfg.endpoint)
        self.metrics.otel_enabled.set(1 if cfg is not None else 0)

    def running(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def done(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._emit_sessions(force=True)
        self._close()

    def _close(self) -> None:
        if self.export is not None:
            export, self.export = self.export, None
            export.shutdown()

    def _count(self, result: str, n: int) -> None:  # the SDK's threads call this too
        self.metrics.otel_spans.labels(result=result).inc(n)

    def _status(self) -> dict[str, Any]:
        cfg = self.config
        if cfg is None:
            return {"ok": True, "exporting": False}
        gate = self.export.gate if self.export is not None else None
        return {"ok": True, "exporting": True, "endpoint": cfg.endpoint,
                "protocol": cfg.protocol, "queued": gate.pending if gate else 0,
                "failing": bool(gate and gate.failing), "sessions_open": len(self.sessions)}

    # -- per flow -------------------------------------------------------------------------

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        """Fix the span id of a flow about to be forwarded; propagate; arm capture."""
        if self.export is None or settled(flow):
            return
        span_id = secrets.randbits(64) or 1
        agent_tp = flow.request.headers.get("traceparent")
        flow.metadata[TRACE] = {"span_id": f"{span_id:016x}", "agent_traceparent": agent_tp}
        capture = self._capture(flow)
        if capture is not None and capture.completions and llm_request_of(flow) is not None:
            flow.metadata[CAPTURE] = capture.max_bytes
        if ctx.options.fleetgate_otel_propagate:
            theirs = parse_traceparent(agent_tp)
            if theirs is not None:
                trace_id = theirs[0]
            else:
                claims_session = _session(flow)
                trace_id = (session_trace_id(claims_session[1] or claims_session[0])
                            if claims_session[0] else int(secrets.token_hex(16), 16))
                flow.metadata[TRACE]["trace_id"] = f"{trace_id:032x}"
            flow.request.headers["traceparent"] = traceparent(trace_id, span_id)

    def _capture(self, flow: http.HTTPFlow) -> Capture | None:
        """The widest capture any profile that selected this flow's agent asks for."""
        policy = self.policies.policy
        decision = decision_of(flow)
        if policy is None or decision is None:
            return None
        found = [p.capture for p in policy.named(decision.get("profiles") or ())
                 if p.capture is not None]
        if not found:
            return None
        return Capture(prompts=any(c.prompts for c in found),
                       completions=any(c.completions for c in found),
                       max_bytes=max(c.max_bytes for c in found))

    def on_record(self, rec: dict[str, Any], flow: Any) -> None:
        """DecisionLog's listener: the flow's span, its OTLP metrics, its session's tally."""
        export = self.export
        if export is None or rec.get("phase"):
            return
        meta = flow.metadata.get(TRACE) if isinstance(flow, http.HTTPFlow) else None
        meta = meta if isinstance(meta, dict) else {}
        fixed = int(meta["trace_id"], 16) if meta.get("trace_id") else None
        span_id = int(meta["span_id"], 16) if meta.get("span_id") else secrets.randbits(64) or 1
        agent_tp = meta.get("agent_traceparent") if meta else (
            flow.request.headers.get("traceparent") if isinstance(flow, http.HTTPFlow) else None)
        captured = self._captured(rec, flow) if isinstance(flow, http.HTTPFlow) else None
        spec = flow_span(rec, agent_traceparent=agent_tp,
                         random_ids=(fixed or int(secrets.token_hex(16), 16), span_id),
                         captured=captured)
        export.emit(spec)
        export.record(rec)
        session = rec.get("session")
        if session:
            start, end = spec.start_ns / 1e9, spec.end_ns / 1e9
            tally = self.sessions.get(session)
            if tally is None:
                tally = self.sessions[session] = SessionTally.first(rec, start, end)
                if len(self.sessions) > MAX_SESSIONS:
                    _, oldest = self.sessions.popitem(last=False)
                    export.emit(session_span(oldest))
            else:
                self.sessions.move_to_end(session)
            tally.add(rec, start, end)

    def _captured(self, rec: dict[str, Any], flow: http.HTTPFlow) -> dict[str, str] | None:
        if not isinstance(rec.get("llm"), dict) and llm_request_of(flow) is None:
            return None
        capture = self._capture(flow)
        if capture is None:
            return None
        out: dict[str, str] = {}
        if capture.prompts:
            out.update(prompt_attributes(flow.request.get_content(strict=False),
                                         capture.max_bytes))
        if capture.completions:
            out.update(completion_attributes(flow.metadata.get(CAPTURED_OUTPUT),
                                             capture.max_bytes))
        return out or None

    # -- per session ----------------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self._emit_sessions(force=False)
            except Exception:  # a bug here must not end the sweeps
                log.exception("fleetgate: emitting session spans failed")

    def _emit_sessions(self, force: bool) -> None:
        """Sessions idle past the option (all of them when stopping), oldest first."""
        export = self.export
        if export is None:
            self.sessions.clear()
            return
        idle = time.time() - ctx.options.fleetgate_otel_session_idle
        while self.sessions:
            session, tally = next(iter(self.sessions.items()))
            if not force and tally.end > idle:
                break  # least recently active first: the rest are more recent
            del self.sessions[session]
            export.emit(session_span(tally))


def _session(flow: http.HTTPFlow) -> tuple[str | None, str | None]:
    """(session, root session) of the flow's verified identity."""
    ident = identity_of(flow)
    claims = verified_claims(flow) or {}
    root = claims.get("root_session")
    return (ident.session if ident else None, root if isinstance(root, str) else None)

