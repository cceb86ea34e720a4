"""What an action is, for approvals: its digest (to know a retry of it) and its summary
(what a human reads before approving).

The digest covers who asks (the agent id, not the session: an agent restarted after asking
retries with a new session), the tier, the HTTP method and the full target URL, and the body
in a canonical form: JSON is re-serialised with sorted keys, and the parts a client
regenerates on every send are dropped (JSON-RPC ``id``, MCP ``_meta``, A2A ``messageId``),
so the SDK's retry of the same call matches while any change of arguments, model or
recipient does not.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from fleetgate.decisionlog import mask_secret_text

__all__ = ["action_digest", "action_summary", "canonical_body", "mask_secrets"]

# a key that names a secret: "password", "client_secret", "api_key", "access_token", "token";
# not "max_tokens" or "bypass"
_SECRET_KEYS = re.compile(r"(?i)passw(or)?d|secret|api[_-]?key|authorization|credential|"
                          r"private[_-]?key|cookie|(^|[_-])token$")
_VOLATILE_MSG = frozenset({"messageId", "message_id"})
EXCERPT_BYTES = 2048


def mask_secrets(value: Any) -> Any:
    """``value`` with secrets masked: strings that look like keys or tokens, and the value
    of any key whose name says it is a secret."""
    if isinstance(value, str):
        return mask_secret_text(value)
    if isinstance(value, dict):
        return {k: (_mask_all(v) if isinstance(k, str) and _SECRET_KEYS.search(k)
                    else mask_secrets(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


def _mask_all(value: Any) -> Any:
    """Every value under a secret-named key, its shape kept (``{"password": ["x"]}``)."""
    if isinstance(value, dict):
        return {k: _mask_all(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_all(v) for v in value]
    return None if value is None else "***"


def _strip_message(msg: Any) -> Any:
    """A JSON-RPC message without what its sender regenerates on every send: the envelope's
    ``id``, ``params._meta`` (MCP) and ``params.message.messageId`` (A2A). Only there: an
    argument, a task or a record that happens to be called ``id`` is part of the action."""
    if not isinstance(msg, dict) or "jsonrpc" not in msg:
        return msg
    out = {k: v for k, v in msg.items() if k != "id"}
    params = out.get("params")
    if isinstance(params, dict):
        params = {k: v for k, v in params.items() if k != "_meta"}
        message = params.get("message")
        if isinstance(message, dict):
            params["message"] = {k: v for k, v in message.items() if k not in _VOLATILE_MSG}
        out["params"] = params
    return out


def _strip(doc: Any) -> Any:
    if isinstance(doc, list):  # a JSON-RPC batch
        return [_strip_message(m) for m in doc]
    return _strip_message(doc)


def canonical_body(body: bytes) -> bytes:
    """The body as the digest sees it: canonical JSON without per-send ids; other bytes as
    they are."""
    if not body:
        return b""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body
    return json.dumps(_strip(doc), sort_keys=True, separators=(",", ":")).encode()


def action_digest(agent: str, tier: str, method: str, url: str, body: bytes) -> str:
    h = hashlib.sha256()
    for part in (agent.encode(), tier.encode(), method.upper().encode(), url.encode()):
        h.update(len(part).to_bytes(4, "big") + part)
    h.update(canonical_body(body))
    return h.hexdigest()


def _excerpt(body: bytes) -> str:
    try:  # JSON: masked like the arguments (a "password" key), not only by pattern
        text = json.dumps(mask_secrets(json.loads(body)), ensure_ascii=False)[:EXCERPT_BYTES * 2]
    except (ValueError, UnicodeDecodeError, RecursionError):
        text = body[:EXCERPT_BYTES * 2].decode("utf-8", "replace")
    text = mask_secret_text(text)
    if len(text) > EXCERPT_BYTES:
        text = text[:EXCERPT_BYTES] + "…"
    return text


def action_summary(method: str, url: str, host: str, body: bytes, *,
                   llm: dict[str, Any] | None = None, mcp: dict[str, Any] | None = None,
                   a2a: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the approver sees: the request line, the tool and its arguments, the model, the
    A2A recipient, and an excerpt of the body, secrets masked."""
    out: dict[str, Any] = {"kind": "http", "method": method, "url": mask_secret_text(url),
                           "host": host, "excerpt": _excerpt(body)}
    if llm and llm.get("is_llm"):
        out["kind"] = "llm"
        out["model"] = llm.get("model") or ""
        out["provider"] = llm.get("provider") or ""
    if mcp and mcp.get("method"):
        out["kind"] = "mcp"
        out["mcp_method"] = mcp.get("method")
        out["server"] = (mcp.get("server") or {}).get("name", "")
        tool = mcp.get("tool") or {}
        if tool.get("name"):
            out["tool"] = tool["name"]
            out["arguments"] = mask_secrets(tool.get("arguments") or {})
    if a2a and a2a.get("is_a2a"):
        out["kind"] = "a2a"
        out["a2a_method"] = a2a.get("method") or ""
        out["to"] = a2a.get("target") or ""
        out["context"] = a2a.get("context_id") or ""
    return out
