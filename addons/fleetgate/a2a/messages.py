"""A2A JSON-RPC requests, read strictly: both protocol versions, one normalised operation.

A2A 1.0 (the ``a2a-sdk`` 1.x) names its JSON-RPC methods ``SendMessage``,
``SendStreamingMessage``, ``GetTask``, ``CancelTask``, ``SubscribeToTask``...; A2A 0.3 named
them ``message/send``, ``message/stream``, ``tasks/get``, ``tasks/cancel``,
``tasks/resubscribe``... Both are recognised and normalised to the 0.3 spelling
(:data:`METHODS`), so one rule covers both. Message parts: 1.0 puts the content in one of
``text``/``raw``/``url``/``data``; 0.3 says which with ``kind`` (``text``/``file``/``data``).
Both become the kinds ``text``, ``file``, ``data``.

Strict, as every body the gateway judges: one JSON-RPC 2.0 request object (no batch, no
notification), a known method, and every field the gateway reads of the type the protocol
gives it. A part that two readers could take for two different things (``kind: text`` with
a ``data`` member, two contents) is refused: the gateway must judge what the agent will run.
A depth a sender writes (top-level ``depth``, ``params.metadata.depth``,
``params.message.metadata.depth``) must be a non-negative integer (``2.0`` too: the SDKs
keep metadata in a protobuf ``Struct``, whose numbers are doubles); the largest counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleetgate.errors import RequestError

__all__ = [
    "MESSAGE_METHODS",
    "METHODS",
    "STREAM_METHODS",
    "A2aError",
    "A2aRequest",
    "best_id",
    "parse_request",
]

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
# fleetgate refused the message (rules, depth, kill switch...): outside the codes A2A gives a
# meaning (-32001..-32009), so the SDK reports it as "JSON-RPC Error -32050: <our message>"
FORBIDDEN = -32050

# raw method (1.0 and 0.3 spellings) -> normalised operation (the 0.3 spelling)
METHODS: dict[str, str] = {
    "SendMessage": "message/send",
    "SendStreamingMessage": "message/stream",
    "GetTask": "tasks/get",
    "ListTasks": "tasks/list",
    "CancelTask": "tasks/cancel",
    "SubscribeToTask": "tasks/resubscribe",
    "CreateTaskPushNotificationConfig": "tasks/pushNotificationConfig/set",
    "GetTaskPushNotificationConfig": "tasks/pushNotificationConfig/get",
    "ListTaskPushNotificationConfigs": "tasks/pushNotificationConfig/list",
    "DeleteTaskPushNotificationConfig": "tasks/pushNotificationConfig/delete",
    "GetExtendedAgentCard": "agent/getAuthenticatedExtendedCard",
    **{m: m for m in ("message/send", "message/stream", "tasks/get", "tasks/cancel",
                      "tasks/resubscribe", "tasks/pushNotificationConfig/set",
                      "tasks/pushNotificationConfig/get", "tasks/pushNotificationConfig/list",
                      "tasks/pushNotificationConfig/delete",
                      "agent/getAuthenticatedExtendedCard")},
}
MESSAGE_METHODS = frozenset({"message/send", "message/stream"})  # they carry a message: hops
STREAM_METHODS = frozenset({"message/stream", "tasks/resubscribe"})  # answered as SSE

# part content member -> kind; 0.3's ``kind`` names the member it uses
_CONTENT = {"text": "text", "raw": "file", "url": "file", "file": "file", "data": "data"}
_KIND_MEMBERS = {"text": {"text"}, "file": {"file", "raw", "url"}, "data": {"data"}}
_ROLES = {"user": "user", "agent": "agent", "ROLE_USER": "user", "ROLE_AGENT": "agent"}


class A2aError(RequestError):
    """The A2A body cannot be judged; answered with JSON-RPC ``code`` (and HTTP 400)."""

    def __init__(self, code: int, message: str, rid: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.rid = rid


@dataclass(frozen=True)
class A2aRequest:
    """One A2A JSON-RPC request, as the gateway judges it."""

    rid: str | int
    rpc_method: str  # as sent
    method: str  # normalised (0.3 spelling)
    context_id: str = ""
    task_id: str = ""
    message_id: str = ""
    role: str = ""  # user | agent | ""
    parts: tuple[str, ...] = ()  # text | file | data, in order
    claimed_depth: int | None = None  # the largest depth the sender wrote, if any

    @property
    def streaming(self) -> bool:
        return self.method in STREAM_METHODS

    @property
    def is_message(self) -> bool:
        return self.method in MESSAGE_METHODS


def best_id(body: Any) -> str | int | None:
    """The request id of a body that was refused, for the error's ``id`` (``None`` if none)."""
    rid = body.get("id") if isinstance(body, dict) else None
    return rid if isinstance(rid, str | int) and not isinstance(rid, bool) else None


def _str(obj: dict[str, Any], key: str, where: str, rid: Any) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise A2aError(INVALID_PARAMS, f"{where}.{key} must be a string", rid)
    return value


def _obj(obj: dict[str, Any], key: str, where: str, rid: Any) -> dict[str, Any]:
    value = obj.get(key, {})
    if not isinstance(value, dict):
        raise A2aError(INVALID_PARAMS, f"{where}.{key} must be an object", rid)
    return value


def _depth(obj: dict[str, Any], where: str, rid: Any) -> int | None:
    if "depth" not in obj:
        return None
    d = obj["depth"]
    if isinstance(d, float) and d.is_integer():  # protobuf Struct (the SDK's metadata): 2.0
        d = int(d)
    if not isinstance(d, int) or isinstance(d, bool) or d < 0:
        raise A2aError(INVALID_PARAMS, f"{where}.depth must be a non-negative integer "
                       f"(got {d!r})", rid)
    return d


def _part_kind(part: Any, where: str, rid: Any) -> str:
    if not isinstance(part, dict):
        raise A2aError(INVALID_PARAMS, f"{where} must be an object", rid)
    members = [k for k in _CONTENT if k in part]
    if len(members) != 1:
        raise A2aError(INVALID_PARAMS, f"{where} must carry exactly one of text, raw, url, "
                       f"data, file (has {', '.join(members) or 'none'})", rid)
    kind = _CONTENT[members[0]]
    if "kind" in part:
        declared = part["kind"]
        if declared not in _KIND_MEMBERS or members[0] not in _KIND_MEMBERS[declared]:
            raise A2aError(INVALID_PARAMS, f"{where}.kind {declared!r} does not match its "
                           f"content {members[0]!r}: refused, as two readers would disagree", rid)
    elif members[0] == "file":
        raise A2aError(INVALID_PARAMS, f"{where}: a 'file' part needs kind 'file'", rid)
    return kind


def parse_request(body: Any) -> A2aRequest:
    """Read one A2A JSON-RPC request (``body`` already parsed strictly); raise :class:`A2aError`."""
    if isinstance(body, list):
        raise A2aError(INVALID_REQUEST, "JSON-RPC batches are not A2A: send one request")
    if not isinstance(body, dict):
        raise A2aError(INVALID_REQUEST, "the body is not a JSON-RPC request object")
    rid = best_id(body)
    if body.get("jsonrpc") != "2.0":
        raise A2aError(INVALID_REQUEST, "not JSON-RPC 2.0", rid)
    if rid is None:
        raise A2aError(INVALID_REQUEST, "an A2A request needs an id (string or number)")
    raw_method = body.get("method")
    if not isinstance(raw_method, str):
        raise A2aError(INVALID_REQUEST, "the request has no method", rid)
    method = METHODS.get(raw_method)
    if method is None:
        raise A2aError(METHOD_NOT_FOUND, f"unknown A2A method {raw_method!r}", rid)
    params = body.get("params", {})
    if not isinstance(params, dict):
        raise A2aError(INVALID_PARAMS, "params must be an object", rid)
    depths = [_depth(body, "request", rid)]
    meta = _obj(params, "metadata", "params", rid)
    depths.append(_depth(meta, "params.metadata", rid))
    context = task = message_id = role = ""
    parts: tuple[str, ...] = ()
    if method in MESSAGE_METHODS:
        if not isinstance(params.get("message"), dict):
            raise A2aError(INVALID_PARAMS, "params.message must be an object", rid)
        msg = params["message"]
        context = _str(msg, "contextId", "params.message", rid)
        task = _str(msg, "taskId", "params.message", rid)
        message_id = _str(msg, "messageId", "params.message", rid)
        raw_role = msg.get("role", "")
        if raw_role not in _ROLES and raw_role != "":
            raise A2aError(INVALID_PARAMS, f"params.message.role {raw_role!r} is not a role", rid)
        role = _ROLES.get(raw_role, "")
        raw_parts = msg.get("parts", [])
        if not isinstance(raw_parts, list):
            raise A2aError(INVALID_PARAMS, "params.message.parts must be a list", rid)
        parts = tuple(_part_kind(p, f"params.message.parts[{i}]", rid)
                      for i, p in enumerate(raw_parts))
        depths.append(_depth(_obj(msg, "metadata", "params.message", rid),
                             "params.message.metadata", rid))
    else:
        ids = {k: _str(params, k, "params", rid) for k in ("id", "taskId") if k in params}
        if len(set(ids.values())) > 1:
            raise A2aError(INVALID_PARAMS, "params.id and params.taskId name two tasks", rid)
        task = next(iter(ids.values()), "")
        context = _str(params, "contextId", "params", rid)
    claimed = [d for d in depths if d is not None]
    return A2aRequest(rid=rid, rpc_method=raw_method, method=method, context_id=context,
                      task_id=task, message_id=message_id, role=role, parts=parts,
                      claimed_depth=max(claimed) if claimed else None)
