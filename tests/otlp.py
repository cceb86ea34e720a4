"""A real OTLP receiver for the tests: HTTP (``/v1/traces``, ``/v1/metrics``, protobuf) and
gRPC (``TraceService``, ``MetricsService``), decoding the official protobufs.

Spans are kept as plain dicts (hex ids, decoded attribute values) so tests assert on what a
collector would store. Listens on 127.0.0.1 only; ``stop()`` closes it.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

__all__ = ["OtlpGrpcReceiver", "OtlpHttpReceiver", "Received"]


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


class Received:
    """What the receiver has been sent, thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[dict[str, Any]] = []
        self.metrics: dict[str, list[dict[str, Any]]] = {}
        self.requests = 0

    def add_traces(self, req: trace_service_pb2.ExportTraceServiceRequest) -> None:
        out = []
        for rs in req.resource_spans:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append({
                        "name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                        "parent_id": s.parent_span_id.hex() or None, "kind": s.kind,
                        "start": s.start_time_unix_nano / 1e9, "end": s.end_time_unix_nano / 1e9,
                        "attributes": _attrs(s.attributes),
                        "events": [{"name": e.name, "time": e.time_unix_nano / 1e9,
                                    "attributes": _attrs(e.attributes)} for e in s.events],
                        "links": [{"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex(),
                                   "attributes": _attrs(link.attributes)} for link in s.links],
                        "status": {"code": s.status.code, "message": s.status.message},
                        "resource": resource, "scope": ss.scope.name})
        with self.lock:
            self.spans += out
            self.requests += 1

    def add_metrics(self, req: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        with self.lock:
            self.requests += 1
            for rm in req.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        kind = m.WhichOneof("data")
                        points = getattr(m, kind).data_points if kind else []
                        self.metrics.setdefault(m.name, []).extend(
                            {"attributes": _attrs(p.attributes), "unit": m.unit,
                             "value": (p.count if kind in ("histogram",) else
                                       (p.as_double or p.as_int)),
                             "sum": getattr(p, "sum", None)} for p in points)

    def wait_spans(self, predicate: Callable[[list[dict[str, Any]]], bool],
                   timeout: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"spans never matched; got {[s['name'] for s in spans]}")
            time.sleep(0.05)


class OtlpHttpReceiver:
    """OTLP/HTTP with protobuf bodies (gzip or deflate, as the exporters may send)."""

    def __init__(self) -> None:
        self.received = Received()
        self.delay = 0.0  # seconds each export is held before it is answered (a slow collector)
        received = self.received
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if outer.delay:
                    time.sleep(outer.delay)
                if self.path == "/v1/traces":
                    traces = trace_service_pb2.ExportTraceServiceRequest()
                    traces.ParseFromString(body)
                    received.add_traces(traces)
                    answer = trace_service_pb2.ExportTraceServiceResponse()
                elif self.path == "/v1/metrics":
                    metrics = metrics_service_pb2.ExportMetricsServiceRequest()
                    metrics.ParseFromString(body)
                    received.add_metrics(metrics)
                    answer = metrics_service_pb2.ExportMetricsServiceResponse()
                else:
                    self.send_error(404)
                    return
                data = answer.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class OtlpGrpcReceiver:
    """OTLP/gRPC: the collector's TraceService and MetricsService."""

    def __init__(self) -> None:
        self.received = Received()
        received = self.received

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                received.add_traces(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                received.add_metrics(request)
                return metrics_service_pb2.ExportMetricsServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(grace=None)
