"""LlmInspector: recognise LLM calls and give the rules ``llm.*``.

``request`` (before the rules): routes by host and path through the policy's provider table,
decodes and parses the body once (refusing what cannot be read: 400/413; the input estimate
only when the running policy needs one), asks OpenAI chat
streams for their usage chunk, and stores the facts in ``flow.metadata["fleetgate.llm"]``
where the rules, limits, budgets, the meter (:mod:`fleetgate.addons.llm_meter`) and mitmweb
see them.
"""

from __future__ import annotations

import json
from typing import Any

from mitmproxy import ctx, exceptions, http

from fleetgate.addons.flowtools import deny, fail_closed, settled
from fleetgate.addons.state import set_llm_request
from fleetgate.llm.request import LlmRequestError, decode_body, parse_json, parse_request
from fleetgate.metrics import GatewayMetrics
from fleetgate.normalize import normalize_host, normalize_path
from fleetgate.policy.model import Policy
from fleetgate.runtime.canary import CanaryService
from fleetgate.runtime.policy import PolicyService


class LlmInspector:
    def __init__(self, store: PolicyService, metrics: GatewayMetrics,
                 canary: CanaryService | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.canary = canary  # a canary judged beside the rules may read the estimate too

    def _needs_estimate(self, policy: Policy) -> bool:
        """Whether to count the prompt before the call (decided per policy load, not per
        request): otherwise ``llm.estimated_input_tokens`` stays 0 and no tokenizer loads."""
        canary = self.canary.policy if self.canary is not None else None
        return policy.needs_input_estimate or (canary is not None and canary.needs_input_estimate)

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
        policy = self.store.policy
        if settled(flow) or policy is None:
            return
        req = flow.request
        path = normalize_path(req.path.partition("?")[0])
        route = policy.providers.route(normalize_host(req.host), req.port, path)
        if route is None or req.method != "POST":
            return
        try:
            raw = decode_body(req.raw_content or b"", req.headers.get("content-encoding", ""),
                              ctx.options.fleetgate_llm_max_body)
            body = parse_json(raw)
            facts = parse_request(route, body, path, estimate=self._needs_estimate(policy))
        except LlmRequestError as exc:
            self.metrics.llm_refused.labels(reason=str(exc.status)).inc()
            deny(flow, exc.status, "llm.body", exc.message,
                 hint="send a JSON body the provider accepts, within the gateway's inspection "
                      "limit")
            return
        meta = {"is_llm": True, **facts.to_cel(), "injected_usage": False,
                "input_estimated": facts.input_estimated}
        if (facts.api == "openai" and facts.streaming and not facts.include_usage
                and facts.operation in ("chat", "text_completion")):
            # Without it an OpenAI stream carries no usage and could only be estimated.
            opts = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
            body["stream_options"] = {**opts, "include_usage": True}
            req.content = json.dumps(body).encode()  # re-encoded per Content-Encoding
            meta["injected_usage"] = True
        set_llm_request(flow, meta)
