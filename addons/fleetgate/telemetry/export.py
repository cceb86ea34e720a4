"""OTLP export of fleetgate's spans and metrics with the official OpenTelemetry SDK.

No mitmproxy here: :class:`OtlpExport` takes :class:`~fleetgate.telemetry.spans.SpanSpec`
values and decision records and hands them to the SDK, which batches and exports them on its
own worker threads — the event loop only appends to a queue.

Why a gate in front of the SDK's ``BatchSpanProcessor``: its queue is bounded, but when it
is full it logs a warning per span and counts drops only in its own (optional) self-metrics.
A dead collector must never slow or flood the gateway, and operators must see what was lost,
so :class:`_Gate` counts spans handed over but not yet exported (or failed) and drops (and
counts) a span before the SDK's queue could overflow. Export failures are counted too and
logged once per change of state, not per batch.

Configuration is the standard ``OTEL_*`` environment (endpoint, protocol, headers,
certificate, timeout, service name and resource attributes, sampler, metric interval),
which the SDK and exporters read themselves; the gateway's options, when set, win.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import Link as OtelLink
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from fleetgate.telemetry.spans import KIND_INTERNAL, SpanSpec

__all__ = ["PROTOCOLS", "ExportConfig", "OtlpExport", "resolve"]

log = logging.getLogger("fleetgate.telemetry")

PROTOCOLS = ("http/protobuf", "grpc")
_KINDS = {KIND_INTERNAL: SpanKind.INTERNAL}


@dataclass(frozen=True)
class ExportConfig:
    """Where and how to export (after options and ``OTEL_*`` were resolved)."""

    endpoint: str  # base URL (http/protobuf: /v1/traces and /v1/metrics are appended)
    protocol: str  # one of PROTOCOLS
    service_name: str
    queue: int  # spans waiting for export at most; beyond, dropped and counted
    metrics: bool  # gen_ai.* / mcp.* / fleetgate.* metrics over OTLP too
    metric_interval_ms: int


def resolve(*, endpoint: str, protocol: str, service_name: str, queue: int, metrics: bool,
            env: dict[str, str] | None = None) -> ExportConfig | None:
    """The export configuration, or ``None`` when nothing asks for export.

    An option wins over ``OTEL_EXPORTER_OTLP_TRACES_*`` which wins over
    ``OTEL_EXPORTER_OTLP_*``; ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``
    turn export off unless the endpoint option is set. Raises ``ValueError`` on a protocol
    that is not OTLP's.
    """
    env = dict(os.environ) if env is None else env
    if not endpoint:
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
            return None
        endpoint = (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                    or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "")
        if endpoint and env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            endpoint = endpoint.removesuffix("/v1/traces")
    if not endpoint:
        return None
    protocol = (protocol or env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip().lower()
    if protocol not in PROTOCOLS:
        raise ValueError(f"OTLP protocol {protocol!r} is not one of {', '.join(PROTOCOLS)} "
                         "(http/json is not supported by the Python exporters)")
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"OTLP endpoint {endpoint!r} must start with http:// or https://")
    interval = env.get("OTEL_METRIC_EXPORT_INTERVAL", "")
    return ExportConfig(
        endpoint=endpoint.rstrip("/"), protocol=protocol,
        service_name=service_name or env.get("OTEL_SERVICE_NAME") or "fleetgate",
        queue=queue, metrics=metrics and env.get("OTEL_METRICS_EXPORTER", "otlp") != "none",
        metric_interval_ms=int(interval) if interval.isdigit() else 60_000)


class _Ids(IdGenerator):
    """Random ids, except the span id the caller fixed for the next span (derived ids:
    the flow's span id is chosen when the request is forwarded, for ``traceparent``)."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()
        self.next_span_id: int | None = None
        self.next_trace_id: int | None = None

    def generate_span_id(self) -> int:
        fixed, self.next_span_id = self.next_span_id, None
        return fixed if fixed else self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        fixed, self.next_trace_id = self.next_trace_id, None
        return fixed if fixed else self._random.generate_trace_id()


class _Counting(SpanExporter):
    """The real exporter, counting what it exported and what failed."""

    def __init__(self, inner: SpanExporter, gate: _Gate) -> None:
        self.inner, self.gate = inner, gate

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # an exporter bug is a failed batch, never a dead worker
            self.gate.done(len(spans), ok=False, why=f"{type(exc).__name__}: {exc}")
            return SpanExportResult.FAILURE
        self.gate.done(len(spans), ok=result is SpanExportResult.SUCCESS,
                       why="the collector did not accept the batch")
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _Gate(SpanProcessor):
    """Bounded hand-over to the batch processor: drop (and count) instead of queueing past
    ``limit``; count exported and failed spans; log once per change of export state."""

    def __init__(self, limit: int, count: Callable[[str, int], None]) -> None:
        self.limit, self.count = limit, count
        self.pending = 0
        self.lock = threading.Lock()
        self.failing = False
        self.inner: SpanProcessor | None = None

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        with self.lock:
            if self.pending >= self.limit:
                full = True
            else:
                full = False
                self.pending += 1
        if full:
            self.count("dropped", 1)
            return
        assert self.inner is not None
        self.inner.on_end(span)

    def done(self, n: int, *, ok: bool, why: str) -> None:
        with self.lock:
            self.pending = max(0, self.pending - n)
        self.count("exported" if ok else "failed", n)
        if ok == self.failing:  # a change of state: say it once
            self.failing = not ok
            if ok:
                log.warning("fleetgate: OTLP export works again")
            else:
                log.error("fleetgate: OTLP export failing (%s); spans are dropped, not "
                          "queued without bound: agents are not slowed", why)

    def shutdown(self) -> None:
        if self.inner is not None:
            self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis) if self.inner is not None else True


def _span_exporter(cfg: ExportConfig) -> SpanExporter:
    if cfg.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpans,
        )
        return GrpcSpans(endpoint=cfg.endpoint, insecure=cfg.endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter(endpoint=cfg.endpoint + "/v1/traces")


def _metric_exporter(cfg: ExportConfig) -> MetricExporter:
    if cfg.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetrics,
        )
        return GrpcMetrics(endpoint=cfg.endpoint, insecure=cfg.endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    return OTLPMetricExporter(endpoint=cfg.endpoint + "/v1/metrics")


class OtlpExport:
    """One gateway process's tracer and meter, exporting over OTLP."""

    def __init__(self, cfg: ExportConfig, *, version: str,
                 count: Callable[[str, int], None]) -> None:
        self.cfg = cfg
        resource = Resource.create({
            "service.name": cfg.service_name, "service.version": version,
            "service.instance.id": f"{socket.gethostname()}-{os.getpid()}"})
        self._ids = _Ids()
        self.gate = _Gate(cfg.queue, count)
        batch = BatchSpanProcessor(_Counting(_span_exporter(cfg), self.gate),
                                   max_queue_size=cfg.queue + 1,
                                   max_export_batch_size=min(512, cfg.queue))
        self.gate.inner = batch
        # shutdown_on_exit off: our shutdown is bounded; the SDK's atexit one waits out the
        # exporters' retry timeouts on a dead collector
        self.provider = TracerProvider(resource=resource, id_generator=self._ids,
                                       shutdown_on_exit=False)
        self.provider.add_span_processor(self.gate)
        self.tracer = self.provider.get_tracer("fleetgate", version)
        self.meters: MeterProvider | None = None
        self.instruments: dict[str, Any] = {}
        if cfg.metrics:
            reader = PeriodicExportingMetricReader(
                _metric_exporter(cfg), export_interval_millis=cfg.metric_interval_ms)
            self.meters = MeterProvider(resource=resource, metric_readers=[reader],
                                        shutdown_on_exit=False)
            self._instruments(self.meters.get_meter("fleetgate", version))
        # the exporters log every failed batch and retry; the gate says it once
        for name in ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                     "opentelemetry.exporter.otlp.proto.grpc.exporter",
                     "opentelemetry.exporter.otlp.proto.http.metric_exporter",
                     "opentelemetry.sdk._shared_internal"):
            logging.getLogger(name).setLevel(logging.CRITICAL)

    # -- traces -----------------------------------------------------------------------------

    def emit(self, spec: SpanSpec) -> None:
        """Hand one finished span to the SDK (a queue append; the export is a thread's)."""
        if spec.parent_id is not None:
            parent = trace_api.set_span_in_context(NonRecordingSpan(SpanContext(
                spec.trace_id, spec.parent_id, is_remote=True,
                trace_flags=TraceFlags(TraceFlags.SAMPLED))))
        else:  # a root span: its trace id is the spec's (derived for sessions)
            parent = Context()
            self._ids.next_trace_id = spec.trace_id
        links = [OtelLink(SpanContext(link.trace_id, link.span_id, is_remote=True,
                                      trace_flags=TraceFlags(TraceFlags.SAMPLED)),
                          link.attributes or None) for link in spec.links]
        self._ids.next_span_id = spec.span_id
        span = self.tracer.start_span(spec.name, context=parent,
                                      kind=_KINDS.get(spec.kind, SpanKind.CLIENT),
                                      attributes=spec.attributes, links=links,
                                      start_time=spec.start_ns)
        self._ids.next_span_id = self._ids.next_trace_id = None
        for event in spec.events:
            span.add_event(event.name, event.attributes or None, timestamp=event.time_ns)
        if spec.error is not None:
            span.set_status(Status(StatusCode.ERROR, spec.error))
        span.end(end_time=spec.end_ns)

    # -- metrics ----------------------------------------------------------------------------

    def _instruments(self, meter: Any) -> None:
        i = self.instruments
        i["tokens"] = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Tokens per LLM call, by gen_ai.token.type (input, output, ...)",
            explicit_bucket_boundaries_advisory=[1, 4, 16, 64, 256, 1024, 4096, 16384, 65536,
                                                 262144, 1048576, 4194304])
        i["duration"] = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s",
            description="LLM call duration as the gateway saw it",
            explicit_bucket_boundaries_advisory=[0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64,
                                                 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92])
        i["ttfc"] = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk", unit="s",
            description="Time from the request to the first streamed chunk")
        i["mcp"] = meter.create_histogram(
            "mcp.client.operation.duration", unit="s",
            description="MCP request duration as the gateway saw it")
        i["cost"] = meter.create_counter(
            "fleetgate.gen_ai.cost", unit="USD", description="LLM spend (priced calls)")
        i["requests"] = meter.create_counter(
            "fleetgate.requests", unit="{request}",
            description="Flows the gateway judged, by result and rule")

    def record(self, rec: dict[str, Any]) -> None:
        """The OTLP metrics of one decision record (semantic-convention names)."""
        if not self.instruments:
            return
        i = self.instruments
        base = {"fleetgate.agent": rec.get("agent") or "anonymous",
                "fleetgate.role": rec.get("role") or ""}
        i["requests"].add(1, {**base, "fleetgate.result": str(rec.get("result")),
                              "fleetgate.rule": str(rec.get("rule"))})
        seconds = (rec.get("latency_ms") or 0) / 1000
        llm = rec.get("llm")
        if isinstance(llm, dict) and llm.get("operation"):
            attrs = {"gen_ai.operation.name": llm.get("operation") or "",
                     "gen_ai.provider.name": llm.get("provider") or "",
                     "gen_ai.request.model": llm.get("model") or ""}
            if llm.get("response_model"):
                attrs["gen_ai.response.model"] = llm["response_model"]
            if rec.get("result") == "deny" or (rec.get("status") or 0) >= 400:
                attrs["error.type"] = str(rec.get("rule") if rec.get("result") == "deny"
                                          else rec.get("status"))
            i["duration"].record(seconds, attrs)
            tokens = llm.get("tokens") or {}
            for kind, key in (("input", "input"), ("output", "output")):
                if tokens.get(key):
                    i["tokens"].record(tokens[key], {**attrs, "gen_ai.token.type": kind})
            if llm.get("ttft_ms") is not None:
                i["ttfc"].record(llm["ttft_ms"] / 1000, attrs)
            if llm.get("cost_usd"):
                i["cost"].add(float(llm["cost_usd"]), {**attrs, **base})
        mcp = rec.get("mcp")
        if isinstance(mcp, dict):
            for call in mcp.get("calls") or []:
                if isinstance(call, dict) and call.get("method"):
                    attrs = {"mcp.method.name": str(call["method"])}
                    if call["method"] == "tools/call" and call.get("target"):
                        attrs["gen_ai.tool.name"] = str(call["target"])
                    if not call.get("allow", True):
                        attrs["error.type"] = str(call.get("rule") or "denied")
                    i["mcp"].record(seconds, attrs)

    # -- life -------------------------------------------------------------------------------

    def flush(self, timeout_ms: int = 5000) -> bool:
        ok = self.provider.force_flush(timeout_ms)
        if self.meters is not None:
            ok = self.meters.force_flush(timeout_ms) and ok
        return ok

    def shutdown(self, wait: float = 3.0) -> None:
        """Export what is queued, giving up after ``wait`` seconds: a gateway that is
        stopping (a rollout, a drain) must not hang on a dead collector for the exporters'
        own retry timeouts. What is not exported by then is lost, and counted."""
        def close() -> None:
            try:
                self.provider.shutdown()
            finally:
                if self.meters is not None:
                    self.meters.shutdown(timeout_millis=int(wait * 1000))

        worker = threading.Thread(target=close, name="fleetgate-otel-shutdown", daemon=True)
        worker.start()
        worker.join(wait)
        if worker.is_alive():
            with self.gate.lock:
                lost = self.gate.pending
            if lost:
                self.gate.count("dropped", lost)
            log.error("fleetgate: OTLP export did not finish within %.0f s at shutdown; "
                      "%d spans not exported", wait, lost)
