"""DecisionLog: one JSON line per flow, the decision id on every response, metrics.

Runs last in the chain so it sees every flow, denied ones included. Allowed flows are
logged when they end (after a stream's last byte), denied ones when they are answered.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, TextIO

from mitmproxy import ctx, exceptions, http

from fleetgate import decisionlog
from fleetgate.addons.budgets import BUDGETS
from fleetgate.addons.limits import LIMITS
from fleetgate.addons.state import (
    HEADER,
    cut_of,
    decision_id,
    decision_of,
    identity_of,
    llm_usage_of,
    mcp_of,
)
from fleetgate.metrics import GatewayMetrics
from fleetgate.runtime.policy import PolicyService

log = logging.getLogger("fleetgate.decisions")

LOGGED = "fleetgate.logged"


class DecisionLog:
    def __init__(self, store: PolicyService, metrics: GatewayMetrics) -> None:
        self.store = store
        self.metrics = metrics
        self._outs: list[TextIO] = []
        self._lock = threading.Lock()

    def load(self, loader: Any) -> None:
        loader.add_option("fleetgate_decision_log", str, "-",
                          "Where decision lines go: '-' for stdout, a file path to append "
                          "to, both comma-separated ('-,/var/log/fleetgate.jsonl'), or '' "
                          "to disable.")

    def configure(self, updated: set[str]) -> None:
        if "fleetgate_decision_log" in updated:
            self.done()
            for target in filter(None, (t.strip() for t in
                                        ctx.options.fleetgate_decision_log.split(","))):
                if target == "-":
                    self._outs.append(sys.stdout)
                    continue
                try:
                    self._outs.append(open(target, "a", buffering=1, encoding="utf-8"))  # noqa: SIM115
                except OSError as exc:
                    self.done()
                    raise exceptions.OptionsError(
                        f"fleetgate_decision_log: cannot open {target}: {exc}") from None

    def done(self) -> None:
        for out in self._outs:
            if out is not sys.stdout:
                out.close()
        self._outs = []

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:  # a refused CONNECT is a decision; an accepted one is not
            self._emit(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            flow.response.headers[HEADER] = decision_id(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._emit(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._emit(flow)

    def tcp_start(self, flow: Any) -> None:
        self._emit_raw(flow, "TCP")

    def udp_start(self, flow: Any) -> None:
        self._emit_raw(flow, "UDP")

    def _emit_raw(self, flow: Any, proto: str) -> None:
        """Non-HTTP flows are refused by ConnectionGuard; the refusal is still a decision."""
        addr = flow.server_conn.address or ("", None)
        rec = decisionlog.record(
            decision_id=decisionlog.new_decision_id(), allow=False, rule=f"raw-{proto.lower()}",
            reason=f"{proto} that is not HTTP cannot be inspected, so it is not allowed",
            identity=None, method=proto, host=str(addr[0]), port=addr[1], path="",
            status=None, latency_ms=None,
            revision=self.store.policy.revision if self.store.policy else None)
        self.metrics.requests.labels(agent="anonymous", role="", decision="deny",
                                     rule=rec["rule"]).inc()
        self._write(rec)

    def _emit(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(LOGGED):
            return
        flow.metadata[LOGGED] = True
        decision = decision_of(flow) or {}
        ident = identity_of(flow)
        cut = cut_of(flow)
        allow = bool(decision.get("allow")) and not cut
        rule = str(decision.get("rule") or ("error" if flow.error else "undecided"))
        reason = str(decision.get("reason") or (flow.error.msg if flow.error else ""))
        end = (flow.response.timestamp_end if flow.response and flow.response.timestamp_end
               else time.time())
        req = flow.request
        rec = decisionlog.record(
            decision_id=decision_id(flow), allow=allow, rule=rule, reason=reason,
            identity=ident.as_dict() if ident else None,
            method=req.method, host=req.pretty_host, port=req.port, path=req.path,
            status=flow.response.status_code if flow.response else None,
            latency_ms=(end - req.timestamp_start) * 1000 if req.timestamp_start else None,
            revision=self.store.policy.revision if self.store.policy else None,
            error=flow.error.msg if flow.error else None,
            extra=self._extra_fields(flow),
        )
        agent = rec["agent"] or "anonymous"
        self.metrics.requests.labels(agent=agent, role=rec["role"] or "",
                                     decision=rec["result"], rule=rule).inc()
        self._write(rec)

    @staticmethod
    def _extra_fields(flow: http.HTTPFlow) -> dict[str, Any] | None:
        extra: dict[str, Any] = {}
        usage = llm_usage_of(flow)
        if usage is not None:
            extra["llm"] = {k: usage.get(k) for k in ("provider", "model", "tokens", "cost_usd",
                                                      "estimated", "priced", "outcome")}
        mcp = mcp_of(flow)
        if mcp is not None:
            extra["mcp"] = {"server": mcp.get("server"), "transport": mcp.get("transport"),
                            "session": mcp.get("session"), "calls": mcp.get("calls"),
                            "hidden": mcp.get("hidden"), "hidden_count": mcp.get("hidden_count", 0)}
        for name, key in (("limits", LIMITS), ("budgets", BUDGETS)):
            value = flow.metadata.get(key)
            if isinstance(value, list):
                extra[name] = value
        credential = flow.metadata.get("fleetgate.credential")
        if isinstance(credential, str):
            extra["credential"] = credential  # the route id, never the secret
        decision = decision_of(flow)
        if decision is not None and decision.get("action"):
            extra["killswitch_action"] = decision["action"]
        if decision is not None and isinstance(decision.get("upstream"), dict):
            extra["upstream"] = decision["upstream"]  # the rules allowed it; the upstream failed
        return extra or None

    def _write(self, rec: dict[str, Any]) -> None:
        line = decisionlog.render(rec)
        with self._lock:
            for out in self._outs:
                try:
                    out.write(line + "\n")
                    out.flush()
                except (OSError, ValueError):
                    log.error("fleetgate: cannot write decision log line: %s", line)
