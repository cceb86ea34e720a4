"""The body an agent gets when fleetgate refuses it: JSON its SDK already parses.

One shape satisfies both SDK families: ``{"type": "error", "error": {"type", "message",
"code"}}`` is Anthropic's envelope and OpenAI's ``error`` object at once, so the SDKs
surface our message instead of a parse failure. The ``fleetgate`` member carries the rule,
the decision id and what to do next for humans and tooling.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["ERROR_TYPES", "denial_body"]

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
