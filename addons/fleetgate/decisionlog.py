"""The canonical decision record: one JSON line per flow, secrets never included.

Pure: the addon gathers the fields, this module shapes and masks them. A token, API key or
prompt body never reaches the log; query strings are dropped (Gemini and others put API
keys there) and only the normalised path is kept.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

__all__ = ["mask_header_value", "mask_secret_text", "new_decision_id", "record", "render"]

_SECRET_HEADERS = frozenset({
    "authorization", "proxy-authorization", "x-api-key", "api-key", "cookie", "set-cookie",
    "x-goog-api-key",
})
_JWT_LIKE = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]*")
# strings that look like a credential wherever they appear (captured prompts, approval
# summaries): JWTs, provider/cloud API keys, bearer tokens
_SECRET_TEXT = re.compile(
    r"eyJ[\w-]+\.[\w-]+\.[\w-]*"  # JWT
    r"|\b(?:sk|rk|pk)-(?:[A-Za-z0-9_-]{2,}-)?[A-Za-z0-9_-]{16,}"  # OpenAI/Anthropic/Stripe
    r"|\bAKIA[0-9A-Z]{16}\b"  # AWS access key id
    r"|\bAIza[0-9A-Za-z_-]{35}\b"  # Google API key
    r"|\bgh[pousr]_[A-Za-z0-9]{36,}\b"  # GitHub tokens
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}"  # Slack tokens
    r"|(?i:bearer)\s+[A-Za-z0-9._~+/=-]{16,}")


def new_decision_id() -> str:
    """Time-ordered, unique id for one decision: 8 hex of seconds + 16 random hex."""
    return f"{int(time.time()):08x}{uuid.uuid4().hex[:16]}"


def mask_secret_text(text: str) -> str:
    """``text`` with every credential-shaped string replaced by ``***``."""
    return _SECRET_TEXT.sub("***", text)


def mask_header_value(name: str, value: str) -> str:
    if name.lower() in _SECRET_HEADERS:
        return "***"
    return _JWT_LIKE.sub("***", value)


def record(
    *,
    decision_id: str,
    allow: bool,
    rule: str,
    reason: str,
    identity: dict[str, Any] | None,
    method: str,
    host: str,
    port: int | None,
    path: str,
    status: int | None,
    latency_ms: float | None,
    revision: str | None,
    error: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the record. ``identity`` is the summary (agent, role, session, jti), never claims."""
    ident = identity or {}
    rec: dict[str, Any] = {
        "ts": round(time.time(), 3),
        "decision_id": decision_id,
        "result": "allow" if allow else "deny",
        "rule": rule,
        "reason": _JWT_LIKE.sub("***", reason),
        "agent": ident.get("agent"),
        "role": ident.get("role"),
        "session": ident.get("session"),
        "jti": ident.get("jti"),
        "user": ident.get("user"),
        "method": method,
        "host": host,
        "port": port,
        "path": _JWT_LIKE.sub("***", path.partition("?")[0]),
        "status": status,
        "latency_ms": None if latency_ms is None else round(latency_ms, 2),
        "policy_revision": revision,
    }
    if error:
        rec["error"] = _JWT_LIKE.sub("***", error)
    if extra:
        rec.update({k: _mask(v) for k, v in extra.items()})
    return rec


def _mask(value: Any) -> Any:
    """JWT-shaped strings masked at any depth of an extra field."""
    if isinstance(value, str):
        return _JWT_LIKE.sub("***", value)
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    return value


def render(rec: dict[str, Any]) -> str:
    return json.dumps(rec, separators=(",", ":"), sort_keys=False, default=str)
