"""Every wire format the gateway answers with: an agent's SDK must parse what it gets.

- :func:`denial_body`: a refusal or failure as LLM-API JSON. One shape satisfies both SDK
  families: ``{"type": "error", "error": {"type", "message",
"code"}}`` is Anthropic's envelope and OpenAI's ``error`` object at once, so the SDKs
surface our message instead of a parse failure. The ``fleetgate`` member carries the rule,
the decision id and what to do next for humans and tooling.
- :func:`jsonrpc_error` / :func:`jsonrpc_error_body`: the JSON-RPC 2.0 error an MCP client
  surfaces (one per request id; ``data`` carries the decision id and rule).
- :func:`sse_error_event`: the last event of an LLM stream the gateway ends mid-way, in the
  provider's own error event shape, so the SDK raises it.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["ERROR_TYPES", "denial_body", "jsonrpc_error", "jsonrpc_error_body", "sse_error_event"]

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    407: "authentication_error",
    413: "request_too_large",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
}


def denial_body(status: int, rule: str, reason: str, decision_id: str,
                hint: str | None = None, *, lead: str = "fleetgate denied this request",
                **extra: Any) -> bytes:
    """``lead`` starts the message: a refusal by default, or e.g. an upstream failure."""
    message = f"{lead} ({rule}): {reason}"
    if hint:
        message += f". {hint}"
    body: dict[str, Any] = {
        "type": "error",
        "error": {
            "type": ERROR_TYPES.get(status, "api_error"),
            "code": rule,
            "message": message,
            "param": None,
        },
        "fleetgate": {"rule": rule, "reason": reason, "decision_id": decision_id, **extra},
    }
    if hint:
        body["fleetgate"]["hint"] = hint
    return json.dumps(body).encode()


def jsonrpc_error(rid: Any, code: int, message: str, **data: Any) -> dict[str, Any]:
    """A JSON-RPC 2.0 error response for request id ``rid`` (``None`` when it is unknown)."""
    return {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message, "data": data}}


def jsonrpc_error_body(rid: Any, code: int, message: str, **data: Any) -> bytes:
    return json.dumps(jsonrpc_error(rid, code, message, **data)).encode()


def sse_error_event(api: str | None, rule: str, message: str) -> bytes:
    """The final event of a stream the gateway ends: Anthropic's ``event: error`` for the
    Anthropic API, an OpenAI-style ``error`` object otherwise."""
    if api == "anthropic":
        event = ("event: error\ndata: " + json.dumps(
            {"type": "error", "error": {"type": "rate_limit_error", "message": message}}) + "\n\n")
    else:
        event = "data: " + json.dumps({"error": {"message": message, "type": "budget_exceeded",
                                                 "code": rule, "param": None}}) + "\n\n"
    return event.encode()
