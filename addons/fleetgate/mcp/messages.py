"""JSON-RPC 2.0 as MCP uses it: single messages and batches, judged element by element.

A body is parsed strictly (see :mod:`fleetgate.bodies`: no duplicate keys, bounded) and every
element is classified. An element that is not a well-formed JSON-RPC message is an error for
the whole body: a batch is never forwarded with a part we could not read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleetgate.errors import RequestError

__all__ = ["McpError", "Message", "parse_messages"]

# JSON-RPC / MCP error codes fleetgate answers with.
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
HEADER_MISMATCH = -32020  # MCP 2026-07-28: Mcp-Method / Mcp-Name disagree with the body
FORBIDDEN = -32003  # fleetgate: policy refused the call


class McpError(RequestError):
    """The MCP body cannot be judged; answered with JSON-RPC ``code`` (and HTTP 400)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Message:
    """One JSON-RPC element: a request (has ``id`` and ``method``), a notification
    (``method``, no ``id``) or a response (``id`` and ``result``/``error``)."""

    raw: dict[str, Any]

    @property
    def id(self) -> Any:
        return self.raw.get("id")

    @property
    def method(self) -> str | None:
        m = self.raw.get("method")
        return m if isinstance(m, str) else None

    @property
    def params(self) -> dict[str, Any]:
        p = self.raw.get("params")
        return p if isinstance(p, dict) else {}

    @property
    def is_request(self) -> bool:
        return self.method is not None and "id" in self.raw

    @property
    def is_notification(self) -> bool:
        return self.method is not None and "id" not in self.raw

    @property
    def is_response(self) -> bool:
        return self.method is None and ("result" in self.raw or "error" in self.raw)


def _message(obj: Any, where: str) -> Message:
    if not isinstance(obj, dict):
        raise McpError(INVALID_REQUEST, f"{where} is not a JSON-RPC object")
    if obj.get("jsonrpc") != "2.0":
        raise McpError(INVALID_REQUEST, f"{where} is not JSON-RPC 2.0")
    msg = Message(obj)
    if "method" in obj and not isinstance(obj["method"], str):
        raise McpError(INVALID_REQUEST, f"{where} has a non-string method")
    if ("id" in obj and not (obj["id"] is None or isinstance(obj["id"], str | int))) or (
            isinstance(obj.get("id"), bool)):
        raise McpError(INVALID_REQUEST, f"{where} has an invalid id")
    if "params" in obj and not isinstance(obj["params"], dict | list):
        raise McpError(INVALID_PARAMS, f"{where} has invalid params")
    if not (msg.is_request or msg.is_notification or msg.is_response):
        raise McpError(INVALID_REQUEST, f"{where} is neither a request, a notification nor "
                       "a response")
    return msg


def parse_messages(body: Any) -> tuple[list[Message], bool]:
    """Messages in a parsed JSON body, and whether it was a batch."""
    if isinstance(body, list):
        if not body:
            raise McpError(INVALID_REQUEST, "empty JSON-RPC batch")
        return [_message(o, f"batch element {i}") for i, o in enumerate(body)], True
    return [_message(body, "message")], False
