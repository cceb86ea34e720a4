"""LlmMeter: count every token of every LLM answer, and end a stream that runs past a limit.

``responseheaders``: every allowed LLM response passes through a
:class:`fleetgate.addons.llm_stream.StreamCounter`, a streaming callable that hands each chunk
to the agent unchanged and tees a decoded copy into the usage parser, so a stream is never
buffered. While an answer streams, a flow with a budget or token-limit reservation has its
output counted and the :class:`fleetgate.runtime.reservations.ReservationBook` says when it
has run past what is allowed. At the end (or when the flow errors or is cut) the usage, as
the provider reported it or else estimated from what streamed, is priced, logged, exported as
GenAI metrics and added to the ledger; limits and budgets settle from it afterwards. A flow
the kill switch cuts is recorded when it is cut (:func:`settle_cut`), not at its error hook:
the kill log's row for the cut then carries the usage so far.
"""

from __future__ import annotations

import time
from typing import Any

from mitmproxy import ctx, http

from fleetgate.addons.flowtools import fail_closed
from fleetgate.addons.llm_stream import StreamCounter
from fleetgate.addons.state import (
    comment_text,
    decision_of,
    identity_of,
    llm_request_of,
    set_comment,
    set_llm_usage,
)
from fleetgate.llm.ledger import Ledger
from fleetgate.llm.usage import Usage
from fleetgate.metrics import GatewayMetrics, LabelBudget
from fleetgate.runtime.policy import PolicyService
from fleetgate.runtime.reservations import Overrun, ReservationBook


class LlmMeter:
    def __init__(self, store: PolicyService, metrics: GatewayMetrics, ledger: Ledger,
                 book: ReservationBook) -> None:
        self.store = store
        self.metrics = metrics
        self.ledger = ledger
        self.book = book
        self.agent_labels = LabelBudget(1000)
        self.model_labels = LabelBudget(200)
        self._meters: dict[str, StreamCounter] = {}

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        llm = llm_request_of(flow)
        decision = decision_of(flow)
        if (llm is None or flow.response is None or flow.error
                or not (decision is not None and decision.get("allow"))):
            return
        meter = StreamCounter(self, flow, llm)
        self._meters[flow.id] = meter
        flow.response.stream = meter.chunk

    def response(self, flow: http.HTTPFlow) -> None:
        meter = self._meters.pop(flow.id, None)
        if meter is not None:
            meter.finish(cut=False)

    def error(self, flow: http.HTTPFlow) -> None:
        self.settle_cut(flow)

    def settle_cut(self, flow: http.HTTPFlow) -> None:
        """Record the flow's usage so far now, as cut (once: its error hook then finds
        nothing left to record)."""
        meter = self._meters.pop(flow.id, None)
        if meter is not None:
            meter.finish(cut=True)

    # -- while it streams -------------------------------------------------------------

    def watching(self, flow: http.HTTPFlow) -> bool:
        """Whether a reservation depends on this flow's output (then it is counted as it
        streams; otherwise only at the end)."""
        return self.book.watched(flow.id)

    def overrun(self, flow: http.HTTPFlow, est_in: int, out: int, model: str) -> Overrun | None:
        """The budget or token limit the flow's output has run past (counted as a refusal),
        or ``None`` while it may go on."""
        policy = self.store.policy
        over = self.book.overrun(flow.id, est_in, out,
                                 policy.pricing if policy is not None else None, model)
        if over is not None and over.kind == "budget":
            self.metrics.budget_rejections.labels(budget=over.rule).inc()
        elif over is not None:
            self.metrics.ratelimit_rejections.labels(limit=over.rule).inc()
        return over

    # -- accounting -------------------------------------------------------------------

    def record(self, flow: http.HTTPFlow, llm: dict[str, Any], usage: Usage | None,
               outcome: str, response_model: str | None, ttft: float | None) -> None:
        policy = self.store.policy
        model = llm.get("model") or response_model or ""
        ident = identity_of(flow)
        agent = self.agent_labels(ident.agent if ident else None)
        role = (ident.role if ident else None) or ""
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
                                  "response_model": response_model, "outcome": outcome,
                                  "operation": llm.get("operation"),
                                  "ttft_ms": None if ttft is None else round(ttft * 1000, 2)}
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
            self.ledger.add(ident.agent if ident else None, ident.session if ident else None,
                            usage, cost)
            result.update(tokens=usage.as_dict(), cost_usd=None if cost is None else round(cost, 8),
                          priced=cost is not None, estimated=usage.estimated)
        set_llm_usage(flow, result)
        if usage is not None and not comment_text(flow):  # one glance in mitmweb's flow list
            price = "unpriced" if cost is None else f"${cost:.6f}"
            est = " (estimated)" if usage.estimated else ""
            set_comment(flow, f"{llm.get('provider')} {model}: {usage.input} in / "
                              f"{usage.output} out tokens{est}, {price}")


def settle_cut(flow: http.HTTPFlow) -> None:
    """Record the usage so far of a flow about to be cut, through the running meter.

    The kill switch writes a cut flow's kill-log row from :func:`fleetgate.addons.kill_flows.
    flow_report`, taken as the flow is cut; the meter would otherwise record the usage only
    at the flow's error hook, after the row is written, leaving the row's ``llm`` empty. The
    meter is found as mitmproxy names it (the lower-cased class name): the kill service is
    built before it, and the streamed response's callable is wrapped by others (KillWatch).
    """
    meter = ctx.master.addons.get("llmmeter") if ctx.master else None
    if isinstance(meter, LlmMeter):
        meter.settle_cut(flow)
