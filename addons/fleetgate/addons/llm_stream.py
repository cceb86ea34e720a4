"""StreamCounter: one LLM response's tee, the streaming callable the meter sets.

Every chunk goes to the agent unchanged; a decoded copy is counted (an event stream by the
usage parser as it comes, any other body up to ``fleetgate_llm_max_body``). When the answer
is watched (a budget or token limit holds a reservation for it), its output tokens are
counted as they stream, and once the meter says a limit is passed the stream ends there with
an error event the provider's SDK raises. At the end the usage (reported, else estimated) is
handed to the meter to record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from mitmproxy import ctx, http

from fleetgate.addons.flowtools import close_flow, mark_cut
from fleetgate.addons.state import agent_of
from fleetgate.llm.decoding import StreamDecoder
from fleetgate.llm.request import estimate_input_tokens
from fleetgate.llm.tokenizer import count_tokens
from fleetgate.llm.usage import StreamAccountant, Usage, usage_from_json
from fleetgate.runtime.reservations import Overrun
from fleetgate.telemetry.capture import CAPTURE, CAPTURED_OUTPUT, answer_text
from fleetgate.wire import sse_error_event

if TYPE_CHECKING:
    from fleetgate.addons.llm_meter import LlmMeter

log = logging.getLogger(__name__)


class StreamCounter:
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
                        if self.owner.watching(self.flow):
                            stop = self._guard()
                            if stop is not None:
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

    def _guard(self) -> Overrun | None:
        pieces = self.accountant.text
        if len(pieces) == self._counted:
            return None
        self.out_tokens += count_tokens("".join(pieces[self._counted:]), self.llm.get("model"))
        self._counted = len(pieces)
        est_in = int(self.llm.get("estimated_input_tokens") or 0)
        return self.owner.overrun(self.flow, est_in, self.out_tokens,
                                  str(self.llm.get("model") or ""))

    def _input_estimate(self) -> int:
        """The prompt's token estimate, for usage the provider did not report: the
        inspector's when the policy had it counted, else counted now from the request body.
        Metering needs it only then, so only then does a policy that needs no pre-flight
        estimate load a tokenizer."""
        llm = self.llm
        if llm.get("input_estimated", True):
            return int(llm.get("estimated_input_tokens") or 0)
        try:
            body = json.loads(self.flow.request.get_content(strict=False) or b"null")
        except ValueError:  # the inspector parsed it before: only a rewrite could break it
            return 0
        return estimate_input_tokens(body, llm.get("model") or None)

    def _stop(self, over: Overrun) -> bytes:
        """End the stream here: a final error event the provider's SDK raises, then the
        connection is closed (shortly, so the event is flushed first)."""
        rule, why = over.rule, over.reason
        self.stopped = f"{rule}: {why}"
        event = sse_error_event(self.llm.get("api"), rule,
                                f"fleetgate ended this stream ({rule}): {why}")
        self.owner.metrics.flows_cut.labels(rule=rule).inc()
        log.warning("fleetgate: stream %s of agent %r cut mid-way: %s", self.flow.id,
                    agent_of(self.flow) or None, self.stopped)
        mark_cut(self.flow, rule, why)
        # closed a moment later, so the error event is flushed to the agent first
        asyncio.get_running_loop().call_later(0.2, close_flow, self.flow)
        return event

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
        if cut and self.sse and self.accountant.complete and not self.stopped:
            # the provider's final usage event had passed: SDKs close the connection once
            # they read it, before the stream's last chunk, and the agent had its whole answer
            cut = False
        req_end = flow.request.timestamp_end
        ttft = (self.first_at - req_end) if (self.first_at and req_end and self.sse) else None
        usage: Usage | None = None
        response_model: str | None = None
        if self.broken:
            log.warning("fleetgate: could not meter flow %s: %s", flow.id, self.broken)
        cap = flow.metadata.get(CAPTURE)  # a profile asked for the completion in its traces
        if self.sse:
            response_model = self.accountant.model
            if self.accountant.events or cut:
                usage = self.accountant.finish(self._input_estimate)
            if cap:
                flow.metadata[CAPTURED_OUTPUT] = "".join(self.accountant.text)[:int(cap)]
        elif not self.overflow and not self.broken and self.body:
            try:
                parsed = json.loads(bytes(self.body))
            except ValueError:
                parsed = None
            usage = usage_from_json(str(llm.get("api")), parsed)
            if isinstance(parsed, dict):
                response_model = parsed.get("model") or parsed.get("modelVersion")
            if cap:
                flow.metadata[CAPTURED_OUTPUT] = answer_text(parsed)[:int(cap)]
        if self.broken and usage is not None:
            usage = replace(usage, estimated=True)  # we may have missed part of the stream
        if usage is None and (cut or self.broken or self.overflow):
            usage = Usage(input=self._input_estimate(), estimated=True)
        if not llm.get("operation") or llm.get("operation") == "count_tokens":
            usage = None  # counting tokens is free: nothing was generated or billed
        outcome = "cut" if cut else ("ok" if 200 <= self.status < 300 else f"http_{self.status}")
        self.owner.record(flow, llm, usage, outcome, response_model, ttft)
