"""A2aGuard and A2aForward: Agent2Agent messages judged, hop depth counted, denials in JSON-RPC.

The logic is pure (:mod:`fleetgate.a2a`): parsing, facts, :class:`~fleetgate.a2a.depth.DepthTracker`.

- :class:`A2aGuard` (``request``, before the rules): for a request to an endpoint declared in
  ``a2a.agents`` only. A GET of the agent card is ``a2a.method == "agent-card"``; anything but
  that or a JSON-RPC POST is refused (``405 a2a.method``). The body is decoded and parsed
  strictly (bounded by ``fleetgate_a2a_max_body``, read whole by RequestBodies): unreadable or
  ambiguous is refused (``a2a.body``), never forwarded. The message's depth is counted by the
  gateway (the sender's own ``depth`` only makes it stricter) and a message deeper than
  ``a2a.maxDepth`` is dropped (``a2a.depth``). The facts go to ``flow.metadata`` where the rules
  (``a2a.*``), the decision log and mitmweb read them.
- :class:`A2aForward` (after every gate, before the decision log): a message every gate let
  through is recorded in the tracker (its target is now busy with it at that depth); the
  entry ends with the answer, the end of its stream or an error. Any refusal of a JSON-RPC
  request to an A2A endpoint (rules, kill switch, limits, body size, upstream failure) is
  answered as a JSON-RPC error carrying the request id, with HTTP 200 as A2A servers answer
  their errors: the ``a2a-sdk`` client raises on any other status without reading the body,
  so the agent would see "HTTP Error 403" instead of the reason. The decision keeps its status.
  Answers are never buffered: event streams pass through StreamPassthrough chunk by chunk.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from mitmproxy import ctx, exceptions, http

from fleetgate.a2a.depth import DepthTracker
from fleetgate.a2a.facts import card_facts, message_facts
from fleetgate.a2a.messages import (
    FORBIDDEN,
    INVALID_REQUEST,
    MESSAGE_METHODS,
    PARSE_ERROR,
    A2aError,
    best_id,
    parse_request,
)
from fleetgate.addons.flowtools import allowed, deny, fail_closed, settled
from fleetgate.addons.state import a2a_of, agent_of, decision_of, set_a2a
from fleetgate.bodies import BodyError, decode_body, parse_json
from fleetgate.normalize import normalize_host, normalize_path
from fleetgate.policy.model import A2aAgent, Policy
from fleetgate.runtime.policy import PolicyService
from fleetgate.wire import jsonrpc_error_body

__all__ = ["A2aForward", "A2aGuard"]

log = logging.getLogger(__name__)


def _endpoint(policy: Policy | None, req: http.Request) -> tuple[A2aAgent, str, str] | None:
    """The declared agent ``req`` goes to, with the normalised host and path."""
    if policy is None or not policy.a2a.agents:
        return None
    host, path = normalize_host(req.host), normalize_path(req.path.partition("?")[0])
    agent = policy.a2a.agent_for(host, req.port, path)
    return None if agent is None else (agent, host, path)


class A2aGuard:
    def __init__(self, store: PolicyService, tracker: DepthTracker) -> None:
        self.store = store
        self.tracker = tracker

    def load(self, loader: Any) -> None:
        loader.add_option(
            "fleetgate_a2a_max_body", int, 16 * 1024 * 1024,
            "Largest A2A request body (after decompression) fleetgate inspects; larger ones "
            "are refused (413, as a JSON-RPC error) rather than passed on unread.")

    def configure(self, updated: set[str]) -> None:
        if "fleetgate_a2a_max_body" in updated and ctx.options.fleetgate_a2a_max_body <= 0:
            raise exceptions.OptionsError("fleetgate_a2a_max_body must be > 0")

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if settled(flow):
            return
        found = _endpoint(self.store.policy, flow.request)
        if found is None:
            return
        agent, host, path = found
        req, sender = flow.request, agent_of(flow)
        if req.method in ("GET", "HEAD") and agent.card(host, req.port, path):
            set_a2a(flow, card_facts(target=agent.name, sender=sender))
            return
        if req.method != "POST" or not agent.matches(host, req.port, path):
            set_a2a(flow, {**card_facts(target=agent.name, sender=sender), "method": ""})
            deny(flow, 405, "a2a.method",
                 f"{req.method} {path} is not A2A: agent {agent.name!r} takes JSON-RPC POSTs "
                 f"to {agent.path or '/'} and GETs of its agent card",
                 hint="use the A2A JSON-RPC binding (the gRPC and HTTP+JSON bindings are not "
                      "governed, so they are refused)", headers={"Allow": "GET, POST"})
            return
        body: Any = None
        try:
            raw = decode_body(req.raw_content or b"", req.headers.get("content-encoding", ""),
                              ctx.options.fleetgate_a2a_max_body)
            body = parse_json(raw)
            msg = parse_request(body)
            header = _header_depth(req, msg.rid)
        except BodyError as exc:
            self._unreadable(flow, agent, sender, exc.status,
                             PARSE_ERROR if exc.status == 400 else INVALID_REQUEST,
                             exc.message, best_id(body))
            return
        except A2aError as exc:
            self._unreadable(flow, agent, sender, 400, exc.code, exc.message, exc.rid)
            return
        if header is not None:
            msg = dataclasses.replace(msg, claimed_depth=max(header, msg.claimed_depth or 0))
        counted = self.tracker.count(sender, msg.context_id) if msg.is_message else 0
        facts = message_facts(msg, target=agent.name, sender=sender, counted=counted)
        set_a2a(flow, facts)
        limit = self.store.policy.a2a.max_depth if self.store.policy else 0
        if msg.is_message and limit and facts["depth"] > limit:
            claimed = (f", the sender claims {msg.claimed_depth}"
                       if msg.claimed_depth is not None else "")
            deny(flow, 403, "a2a.depth",
                 f"message {msg.method} from {sender or '?'} to {agent.name} is at hop depth "
                 f"{facts['depth']} (counted by the gateway: {counted}{claimed}), above "
                 f"a2a.maxDepth {limit}; dropped (an agent loop?)",
                 hint="answer this conversation yourself instead of forwarding it again; the "
                      "gateway counts every hop whatever depth a message claims")
            log.warning("fleetgate: dropped an A2A message from %s to %s at depth %d (counted %d)",
                        sender, agent.name, facts["depth"], counted)

    @staticmethod
    def _unreadable(flow: http.HTTPFlow, agent: A2aAgent, sender: str, status: int, code: int,
                    message: str, rid: Any) -> None:
        set_a2a(flow, {**card_facts(target=agent.name, sender=sender), "method": "",
                       "rpc_id": rid, "error_code": code})
        deny(flow, status, "a2a.body", message,
             hint="send one A2A JSON-RPC request (SendMessage, message/send, ...) per POST, "
                  "every field of its protocol type, no duplicate keys")


def _header_depth(req: http.Request, rid: Any) -> int | None:
    """The depth header (``fleetgate_message_depth_header``), which must be readable."""
    name = ctx.options.fleetgate_message_depth_header
    values = req.headers.get_all(name) if name else []
    depths = []
    for v in values:
        text = v.strip()
        if not (text.isascii() and text.isdigit()):
            raise A2aError(INVALID_REQUEST, f"{name} must be a non-negative integer "
                           f"(got {v!r})", rid)
        depths.append(int(text))
    return max(depths) if depths else None


class A2aForward:
    def __init__(self, store: PolicyService, tracker: DepthTracker) -> None:
        self.store = store
        self.tracker = tracker

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        """Every gate let the message through: its target is now handling it."""
        if allowed(flow) is None:
            return
        facts = a2a_of(flow)
        if facts is None or facts.get("method") not in MESSAGE_METHODS:
            return
        self.tracker.forwarded(flow.id, str(facts.get("target") or ""),
                               str(facts.get("context_id") or ""), int(facts.get("depth") or 0))

    def response(self, flow: http.HTTPFlow) -> None:
        self._done(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._done(flow)

    def _done(self, flow: http.HTTPFlow) -> None:
        self.tracker.ended(flow.id)
        found = _endpoint(self.store.policy, flow.request)
        if found is None:
            return
        agent, host, path = found
        facts = a2a_of(flow)
        if facts is None:  # refused before the guard read it (identity, kill switch, size)
            facts = {**card_facts(target=agent.name, sender=agent_of(flow)), "method": ""}
            set_a2a(flow, facts)
        decision = decision_of(flow)
        if decision is not None and not decision.get("allow"):
            facts["status"] = decision.get("status")
        if flow.request.method == "POST" and agent.matches(host, flow.request.port, path):
            _as_jsonrpc(flow, facts)


def _as_jsonrpc(flow: http.HTTPFlow, facts: dict[str, Any]) -> None:
    """A refusal fleetgate made (its JSON carries ``fleetgate.decision_id``) as the JSON-RPC
    error an A2A client surfaces, for the request's id."""
    resp = flow.response
    if resp is None or resp.stream or not resp.raw_content:
        return
    try:
        doc = json.loads(resp.get_content(strict=False) or b"")
    except (ValueError, UnicodeDecodeError):
        return
    ours = doc.get("fleetgate") if isinstance(doc, dict) else None
    if not isinstance(ours, dict) or not ours.get("decision_id"):
        return  # the agent's own answer (or already JSON-RPC)
    error = doc.get("error") if isinstance(doc.get("error"), dict) else {}
    rid = facts.get("rpc_id")
    if rid is None:
        rid = _readable_id(flow.request)
    status = resp.status_code
    code = facts.get("error_code") or (INVALID_REQUEST if status in (400, 405, 413)
                                       else -32603 if status >= 500 and status != 503
                                       else FORBIDDEN)
    data = {k: ours[k] for k in ("rule", "decision_id", "hint") if k in ours}
    resp.content = jsonrpc_error_body(rid, code, str(error.get("message") or ours.get("reason")),
                                      status=status, **data)
    resp.headers["Content-Type"] = "application/json"
    resp.status_code, resp.reason = 200, "OK"


def _readable_id(req: http.Request) -> Any:
    """The id of a body nobody judged (refused before the guard), if it can be read cheaply."""
    raw = req.raw_content
    if not raw or len(raw) > ctx.options.fleetgate_a2a_max_body:
        return None
    try:
        return best_id(parse_json(decode_body(raw, req.headers.get("content-encoding", ""),
                                              ctx.options.fleetgate_a2a_max_body)))
    except BodyError:
        return None
