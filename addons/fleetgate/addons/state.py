"""Typed access to what fleetgate records on a flow (``flow.metadata``).

Every addon reads and writes the per-flow state through these accessors, never through raw
``flow.metadata`` keys: the values stay JSON-able (mitmweb shows them, ``mitmdump -w`` saves
them), and what they mean is written down once. The identity is parsed from the token's
claims only by :meth:`fleetgate.identity.tokens.Identity.from_claims` (in the identity addon);
everyone else asks :func:`identity_of`. A decision is recorded by the addon that decides
(:func:`record_decision`); another addon adds to it only through :func:`annotate_decision`.

The flow's comment (mitmweb's flow list, ``mitmdump -w`` files, ``~comment`` filters) is
written only through :func:`set_comment` and :func:`add_comment`: it always starts with who
sent the flow (``agent / role / session``), exactly once, whichever addons add to it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from mitmproxy import http
from mitmproxy.flow import Flow

from fleetgate.decisionlog import new_decision_id
from fleetgate.identity.tokens import Identity

__all__ = [
    "A2A",
    "CLAIMS",
    "COMMENT_SEP",
    "CUT",
    "DECISION",
    "DECISION_ID",
    "HEADER",
    "IDENTITY",
    "LLM_REQUEST",
    "LLM_USAGE",
    "MCP",
    "NEEDS_BODY",
    "FlowIdentity",
    "a2a_of",
    "add_comment",
    "agent_of",
    "annotate_decision",
    "body_needed",
    "claims_of",
    "clear_mcp",
    "comment_text",
    "cut_of",
    "decision_id",
    "decision_of",
    "identity_label",
    "identity_of",
    "llm_request_of",
    "llm_usage_of",
    "mcp_of",
    "need_body",
    "record_decision",
    "set_a2a",
    "set_comment",
    "set_identity",
    "set_llm_request",
    "set_llm_usage",
    "set_mcp",
    "verified_claims",
]

DECISION_ID = "fleetgate.decision_id"
DECISION = "fleetgate.decision"
IDENTITY = "fleetgate.identity"
CLAIMS = "fleetgate.claims"
CUT = "fleetgate.cut"
LLM_REQUEST = "fleetgate.llm"
LLM_USAGE = "fleetgate.llm_usage"
MCP = "fleetgate.mcp"
A2A = "fleetgate.a2a"
# Set by an addon that must read a response whole (bounded by its own limit): the
# streaming addon then leaves the response buffered.
NEEDS_BODY = "fleetgate.needs_body"
HEADER = "X-Fleetgate-Decision-Id"
COMMENT_SEP = " \u00b7 "  # between the identity prefix and what the addons wrote


class FlowIdentity(NamedTuple):
    """Who sent the flow, as the identity addon verified it (a tuple: built on every read,
    several times per request, so it must be cheap)."""

    agent: str
    role: str | None = None
    session: str | None = None
    jti: str | None = None
    user: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"agent": self.agent, "role": self.role, "session": self.session,
                "jti": self.jti, "user": self.user}


def set_identity(flow: http.HTTPFlow, ident: Identity) -> None:
    """Record a verified identity on the flow (the identity addon's job, once per flow), and
    start its comment with it at once: a live flow in mitmweb already says who sent it."""
    text = comment_text(flow)  # whatever was written before, under no (or another) identity
    user = ident.claims.get("user")
    flow.metadata[IDENTITY] = FlowIdentity(
        ident.agent, ident.role, ident.session, ident.jti,
        str(user) if user is not None else None).as_dict()
    flow.metadata[CLAIMS] = dict(ident.claims)
    set_comment(flow, text)


def identity_of(flow: Flow) -> FlowIdentity | None:
    """The flow's verified identity; ``None`` before (or without) one. Cheap: it runs in
    several addons on every request, so it reads what :func:`set_identity` wrote as is."""
    raw = flow.metadata.get(IDENTITY)
    if raw.__class__ is not dict or not raw.get("agent"):
        return None
    return FlowIdentity(raw["agent"], raw.get("role"), raw.get("session"), raw.get("jti"),
                        raw.get("user"))


def identity_label(flow: Flow) -> str:
    """``agent / role / session`` of the verified identity (``-`` for a missing part), the
    prefix of the flow's comment; ``""`` without an identity (refused before one, or a
    connection that never carried one)."""
    ident = identity_of(flow)
    if ident is None:
        return ""
    return " / ".join(str(part) if part else "-"
                      for part in (ident.agent, ident.role, ident.session))


def comment_text(flow: Flow) -> str:
    """What the addons wrote in the flow's comment, after the identity prefix (``""`` when
    nothing yet): the test "has an addon already said something?" must not see the prefix."""
    label, comment = identity_label(flow), flow.comment
    if label and comment.startswith(label):
        rest = comment[len(label):]
        if not rest:
            return ""
        if rest.startswith(COMMENT_SEP):
            return rest[len(COMMENT_SEP):]
    return comment


def set_comment(flow: Flow, text: str) -> None:
    """Replace what the addons wrote in the comment with ``text`` (``""`` clears it), behind
    the identity prefix. The one writer of ``flow.comment``: the prefix is there exactly
    once, so ``~comment "^agent /"`` selects one agent's flows in mitmweb. Plain string work
    on what :func:`set_identity` stored: it cannot fail inside a flow's hook."""
    label = identity_label(flow)
    flow.comment = f"{label}{COMMENT_SEP}{text}" if label and text else (label or text)


def add_comment(flow: Flow, text: str) -> None:
    """Append ``text`` to what the addons wrote (``; `` between), unless it is there already
    (a hook that runs twice, e.g. response then error, says it once)."""
    current = comment_text(flow)
    if text and text not in current:
        set_comment(flow, f"{current}; {text}" if current else text)


def agent_of(flow: http.HTTPFlow) -> str:
    """The agent id, ``""`` when the flow has no identity (e.g. refused before it)."""
    raw = flow.metadata.get(IDENTITY)
    return (raw.get("agent") or "") if raw.__class__ is dict else ""


def verified_claims(flow: http.HTTPFlow) -> dict[str, Any] | None:
    """The verified token's claims, ``None`` when the flow has no verified identity."""
    claims = flow.metadata.get(CLAIMS)
    return claims if isinstance(claims, dict) else None


def claims_of(flow: http.HTTPFlow) -> dict[str, Any]:
    """The verified token's claims (a copy's worth of trust: never edit them)."""
    claims = flow.metadata.get(CLAIMS)
    return claims if isinstance(claims, dict) else {}


def decision_id(flow: http.HTTPFlow) -> str:
    """The flow's decision id, created on first use."""
    did = flow.metadata.get(DECISION_ID)
    if not isinstance(did, str):
        did = new_decision_id()
        flow.metadata[DECISION_ID] = did
    return did


def record_decision(flow: http.HTTPFlow, allow: bool, rule: str, reason: str,
                    status: int | None = None, **extra: Any) -> None:
    flow.metadata[DECISION] = {"allow": allow, "rule": rule, "reason": reason,
                               "status": status, **extra}


def decision_of(flow: http.HTTPFlow) -> dict[str, Any] | None:
    """The recorded decision (read it; add to it with :func:`annotate_decision`)."""
    decision = flow.metadata.get(DECISION)
    return decision if isinstance(decision, dict) else None


def annotate_decision(flow: http.HTTPFlow, **fields: Any) -> bool:
    """Add facts to the decision another addon recorded (the kill action that applied, what
    happened upstream); False when there is none to add to."""
    decision = decision_of(flow)
    if decision is None:
        return False
    decision.update(fields)
    return True


def cut_of(flow: http.HTTPFlow) -> dict[str, Any] | None:
    cut = flow.metadata.get(CUT)
    return cut if isinstance(cut, dict) else None


def llm_request_of(flow: http.HTTPFlow) -> dict[str, Any] | None:
    """What the LLM inspector read from the request (provider, api, model...)."""
    llm = flow.metadata.get(LLM_REQUEST)
    return llm if isinstance(llm, dict) else None


def set_llm_request(flow: http.HTTPFlow, facts: dict[str, Any]) -> None:
    flow.metadata[LLM_REQUEST] = facts


def set_llm_usage(flow: http.HTTPFlow, usage: dict[str, Any]) -> None:
    flow.metadata[LLM_USAGE] = usage


def llm_usage_of(flow: http.HTTPFlow) -> dict[str, Any] | None:
    """What the meter recorded from the answer (tokens, cost)."""
    usage = flow.metadata.get(LLM_USAGE)
    return usage if isinstance(usage, dict) else None


def set_mcp(flow: http.HTTPFlow, facts: dict[str, Any]) -> None:
    flow.metadata[MCP] = facts


def clear_mcp(flow: http.HTTPFlow) -> None:
    """The flow turned out not to be MCP after all (e.g. a GET of something else)."""
    flow.metadata.pop(MCP, None)


def need_body(flow: http.HTTPFlow) -> None:
    """An addon must read this response whole (bounded by its own limit): don't stream it."""
    flow.metadata[NEEDS_BODY] = True


def body_needed(flow: http.HTTPFlow) -> bool:
    return bool(flow.metadata.get(NEEDS_BODY))


def mcp_of(flow: http.HTTPFlow) -> dict[str, Any] | None:
    """What the MCP guard recorded (server, methods, session)."""
    mcp = flow.metadata.get(MCP)
    return mcp if isinstance(mcp, dict) else None


def set_a2a(flow: http.HTTPFlow, facts: dict[str, Any]) -> None:
    """What the A2A guard read of a message (:mod:`fleetgate.a2a.facts`), JSON-able."""
    flow.metadata[A2A] = facts


def a2a_of(flow: http.HTTPFlow) -> dict[str, Any] | None:
    """The A2A facts of the flow (method, sender, target, depth...); ``None``: not A2A."""
    facts = flow.metadata.get(A2A)
    return facts if isinstance(facts, dict) else None
