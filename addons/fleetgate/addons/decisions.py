"""DecisionLog: one JSON line per flow, the decision id on every response, metrics.

Runs last in the chain so it sees every flow, denied ones included. Allowed flows are
logged when they end (after a stream's last byte), denied ones when they are answered.
Lines go through :class:`~fleetgate.runtime.audit.AuditSink` (a writer thread: a slow disk
never stalls the event loop; files rotate by size and reopen on ``SIGHUP`` or when moved).

With ``fleetgate_audit_required`` no call reaches the upstream unaudited: a flow about to be
forwarded first has a ``"phase": "request"`` line written (handed to the kernel) and is
refused (503 ``audit.unavailable``, in the client's format) when that line cannot be written
within ``fleetgate_audit_wait_ms``. Its final line follows as usual. Recovery is automatic:
the next flow's line is tried again, on a reopened file.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, exceptions, http

from fleetgate import decisionlog
from fleetgate.a2a.facts import log_view
from fleetgate.addons.budgets import BUDGETS
from fleetgate.addons.flowtools import deny, fail_closed, settled
from fleetgate.addons.limits import LIMITS
from fleetgate.addons.report_mode import canary_of, would_deny_of
from fleetgate.addons.state import (
    HEADER,
    a2a_of,
    cut_of,
    decision_id,
    decision_of,
    identity_of,
    llm_usage_of,
    mcp_of,
    record_decision,
    verified_claims,
)
from fleetgate.metrics import GatewayMetrics
from fleetgate.runtime.audit import AuditSink, AuditUnavailable, FileTarget, StreamTarget, Target
from fleetgate.runtime.policy import PolicyService
from fleetgate.wire import jsonrpc_error_body

log = logging.getLogger("fleetgate.decisions")

LOGGED = "fleetgate.logged"
_SINK_OPTIONS = {"fleetgate_decision_log", "fleetgate_decision_log_max_bytes",
                 "fleetgate_decision_log_backups"}


class DecisionLog:
    def __init__(self, store: PolicyService, metrics: GatewayMetrics) -> None:
        self.store = store
        self.metrics = metrics
        self.sink: AuditSink | None = None
        self.required = False
        # called with every final record and its flow (traces, the recent-sessions store);
        # a listener that raises is logged and counted, the record is still written
        self.listeners: list[Callable[[dict[str, Any], Any], None]] = []
        store.add_status("decision_log", self._status)

    def load(self, loader: Any) -> None:
        loader.add_option("fleetgate_decision_log", str, "-",
                          "Where decision lines go: '-' for stdout, a file path to append "
                          "to, both comma-separated ('-,/var/log/fleetgate.jsonl'), or '' "
                          "to disable.")
        loader.add_option("fleetgate_decision_log_max_bytes", int, 100 << 20,
                          "Rotate a decision log file before it passes this size (0: never; "
                          "rotate externally and send SIGHUP, or let the gateway notice the "
                          "move).")
        loader.add_option("fleetgate_decision_log_backups", int, 5,
                          "Rotated decision log files kept (path.1 newest); older ones are "
                          "deleted.")
        loader.add_option("fleetgate_audit_required", bool, False,
                          "Refuse (503 audit.unavailable) a call whose decision line cannot be "
                          "written: a 'request' line is written before it is forwarded.")
        loader.add_option("fleetgate_audit_wait_ms", int, 1000,
                          "With fleetgate_audit_required: how long a call waits for its "
                          "request line to be written before it is refused.")

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if opts.fleetgate_decision_log_max_bytes < 0 or opts.fleetgate_decision_log_backups < 0:
            raise exceptions.OptionsError(
                "fleetgate_decision_log_max_bytes and fleetgate_decision_log_backups must be >= 0")
        if opts.fleetgate_audit_wait_ms <= 0:
            raise exceptions.OptionsError("fleetgate_audit_wait_ms must be > 0")
        targets = [t for t in (t.strip() for t in opts.fleetgate_decision_log.split(",")) if t]
        if opts.fleetgate_audit_required and not targets:
            raise exceptions.OptionsError(
                "fleetgate_audit_required needs a decision log (fleetgate_decision_log is '')")
        self.required = opts.fleetgate_audit_required
        if self.sink is None or updated & _SINK_OPTIONS:
            opened: list[Target] = []
            for target in targets:
                if target == "-":
                    opened.append(StreamTarget())
                    continue
                f = FileTarget(target, opts.fleetgate_decision_log_max_bytes,
                               opts.fleetgate_decision_log_backups)
                try:
                    f.open()
                except OSError as exc:
                    for t in opened:
                        t.close()
                    raise exceptions.OptionsError(
                        f"fleetgate_decision_log: cannot open {target}: {exc}") from None
                opened.append(f)
            self.done()
            self.sink = AuditSink(opened, on_write_error=self.metrics.audit_write_errors.inc,
                                  on_state=self._on_state)
            self.metrics.audit_log_ok.set(1)

    def running(self) -> None:
        try:  # logrotate's postrotate: kill -HUP
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._reopen)
        except (RuntimeError, NotImplementedError, ValueError):
            log.warning("fleetgate: no SIGHUP handler; moved decision log files are still "
                        "reopened on their next line")

    def done(self) -> None:
        if self.sink is not None:
            sink, self.sink = self.sink, None
            sink.close()

    def _reopen(self) -> None:
        if self.sink is not None:
            log.info("fleetgate: SIGHUP: decision log files reopen on their next line")
            self.sink.reopen()

    def _status(self) -> dict[str, Any]:
        if self.sink is None:
            return {"ok": True, "targets": [], "required": self.required}
        return {**self.sink.status(), "required": self.required}

    def _on_state(self, ok: bool, cause: str | None) -> None:
        """Writer thread: one log line per change of state, not one per line."""
        self.metrics.audit_log_ok.set(1 if ok else 0)
        if ok:
            log.warning("fleetgate: the decision log is written again")
        else:
            log.error("fleetgate: the decision log cannot be written (%s); %s", cause,
                      "calls are refused (fleetgate_audit_required)" if self.required
                      else "calls are still forwarded, their lines lost")

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        """Last hook before the upstream: write the request line first when audit is
        required (denied and answered flows are not forwarded: their one line suffices)."""
        if not self.required or settled(flow) or self.sink is None:
            return
        rec = self._record(flow, phase="request")
        try:
            await self.sink.write(decisionlog.render(rec),
                                  ctx.options.fleetgate_audit_wait_ms / 1000)
        except AuditUnavailable as exc:
            if not settled(flow):
                _refuse(flow, str(exc))

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
        self._tell(rec, flow)

    def _emit(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(LOGGED):
            return
        flow.metadata[LOGGED] = True
        rec = self._record(flow)
        agent = rec["agent"] or "anonymous"
        self.metrics.requests.labels(agent=agent, role=rec["role"] or "",
                                     decision=rec["result"], rule=rec["rule"]).inc()
        self._write(rec)
        self._tell(rec, flow)

    def _tell(self, rec: dict[str, Any], flow: Any) -> None:
        for listener in self.listeners:
            try:
                listener(rec, flow)
            except Exception:  # an observer's bug must not lose the audit line or the answer
                self.metrics.observer_errors.labels(
                    observer=getattr(listener, "__qualname__", "?")).inc()
                log.exception("fleetgate: a decision-record listener failed")

    def _record(self, flow: http.HTTPFlow, phase: str | None = None) -> dict[str, Any]:
        decision = decision_of(flow) or {}
        ident = identity_of(flow)
        cut = cut_of(flow)
        allow = bool(decision.get("allow")) and not cut
        rule = str(decision.get("rule") or ("error" if flow.error else "undecided"))
        reason = str(decision.get("reason") or (flow.error.msg if flow.error else ""))
        end = (flow.response.timestamp_end if flow.response and flow.response.timestamp_end
               else time.time())
        req = flow.request
        extra = self._extra_fields(flow) or {}
        if phase:
            extra["phase"] = phase
        if req.timestamp_start:
            extra["start_ts"] = round(req.timestamp_start, 6)
        claims = verified_claims(flow)
        if claims is not None:  # the family: `fleetgate trace` and the traces nest children
            for key in ("parent_session", "root_session"):
                if isinstance(claims.get(key), str):
                    extra[key] = claims[key]
        return decisionlog.record(
            decision_id=decision_id(flow), allow=allow, rule=rule, reason=reason,
            identity=ident.as_dict() if ident else None,
            method=req.method, host=req.pretty_host, port=req.port, path=req.path,
            status=flow.response.status_code if flow.response else None,
            latency_ms=(end - req.timestamp_start) * 1000
            if req.timestamp_start and not phase else None,
            revision=self.store.policy.revision if self.store.policy else None,
            error=flow.error.msg if flow.error else None,
            extra=extra or None,
        )

    @staticmethod
    def _extra_fields(flow: http.HTTPFlow) -> dict[str, Any] | None:
        extra: dict[str, Any] = {}
        usage = llm_usage_of(flow)
        if usage is not None:
            extra["llm"] = {k: usage.get(k) for k in ("provider", "operation", "model",
                                                      "response_model", "tokens", "cost_usd",
                                                      "estimated", "priced", "outcome",
                                                      "ttft_ms")}
        mcp = mcp_of(flow)
        if mcp is not None:
            extra["mcp"] = {"server": mcp.get("server"), "transport": mcp.get("transport"),
                            "session": mcp.get("session"), "calls": mcp.get("calls"),
                            "hidden": mcp.get("hidden"), "hidden_count": mcp.get("hidden_count", 0)}
        a2a = a2a_of(flow)
        if a2a is not None:  # every A2A flow: who messaged whom, at which counted depth
            extra["a2a"] = log_view(a2a)
        for name, key in (("limits", LIMITS), ("budgets", BUDGETS)):
            value = flow.metadata.get(key)
            if isinstance(value, list):
                extra[name] = value
        approval = flow.metadata.get("fleetgate.approval")
        if isinstance(approval, dict):  # linked to the approval's own audit lines by id
            extra["approval"] = {k: v for k, v in approval.items() if k != "done"}
        credential = flow.metadata.get("fleetgate.credential")
        if isinstance(credential, str):
            extra["credential"] = credential  # the route id, never the secret
        would = would_deny_of(flow)
        if would is not None:  # report mode: what was not enforced (rule, reason, status)
            extra["would_deny"] = would
        canary = canary_of(flow)
        if canary is not None:  # the canary policy's verdict, where it differs
            extra["canary"] = canary
        decision = decision_of(flow)
        if decision is not None and decision.get("action"):
            extra["killswitch_action"] = decision["action"]
        if decision is not None and isinstance(decision.get("upstream"), dict):
            extra["upstream"] = decision["upstream"]  # the rules allowed it; the upstream failed
        return extra or None

    def write_event(self, line: dict[str, Any]) -> None:
        """An audit line that is not a flow's decision (approval requested, decided,
        escalated...): the same append-only sink, in order with the decision records."""
        self._write(line)

    def _write(self, rec: dict[str, Any]) -> None:
        if self.sink is not None:
            self.sink.submit(decisionlog.render(rec))  # a failure is counted and logged there


def _refuse(flow: http.HTTPFlow, cause: str) -> None:
    """503 in the client's format: JSON-RPC on an MCP endpoint, else the LLM-API JSON."""
    rule = "audit.unavailable"
    reason = (f"the decision log cannot be written ({cause}) and this gateway forwards no "
              "call it cannot audit")
    hint = "retry later; a gateway operator must make the decision log writable"
    if mcp_of(flow) is not None:
        did = decision_id(flow)
        body = jsonrpc_error_body(None, -32603, f"fleetgate refused this MCP request: {reason}. "
                                  f"{hint}", decision_id=did, rule=rule)
        flow.response = http.Response.make(503, body, {"Content-Type": "application/json",
                                                       HEADER: did})
        record_decision(flow, False, rule, reason, 503)
        flow.marked = ":no_entry:"
    else:
        deny(flow, 503, rule, reason, hint=hint)
