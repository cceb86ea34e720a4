"""Decision records never carry secrets; denial bodies parse as SDK errors."""

from __future__ import annotations

import json
import re
from typing import Any

import jwt
import pytest

from fleetgate.decisionlog import mask_header_value, new_decision_id, record, render
from fleetgate.wire import ERROR_TYPES, denial_body

TOKEN = jwt.encode({"sub": "agent-1", "exp": 4102444800}, b"k" * 32, algorithm="HS256")
JWT_RE = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]*")


def make(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "decision_id": "0000000a1234567890abcdef",
        "allow": False,
        "rule": "fleet.authorization[0]",
        "reason": "denied",
        "identity": {"agent": "agent-1", "role": "security", "session": "s-1", "jti": "j-1"},
        "method": "GET",
        "host": "api.example.com",
        "port": 443,
        "path": "/v1/items",
        "status": 403,
        "latency_ms": 1.23456,
        "revision": "abc123def456",
    }
    args.update(overrides)
    return record(**args)


def test_token_looks_like_a_jwt() -> None:
    assert JWT_RE.fullmatch(TOKEN)


def test_record_shape() -> None:
    rec = make()
    assert rec["decision_id"] == "0000000a1234567890abcdef"
    assert rec["result"] == "deny"
    assert rec["rule"] == "fleet.authorization[0]"
    assert rec["agent"] == "agent-1"
    assert rec["role"] == "security"
    assert rec["session"] == "s-1"
    assert rec["jti"] == "j-1"
    assert rec["method"] == "GET"
    assert rec["host"] == "api.example.com"
    assert rec["port"] == 443
    assert rec["path"] == "/v1/items"
    assert rec["status"] == 403
    assert rec["latency_ms"] == 1.23
    assert rec["policy_revision"] == "abc123def456"
    assert isinstance(rec["ts"], float)
    assert "error" not in rec
    assert make(allow=True)["result"] == "allow"


def test_record_without_identity() -> None:
    rec = make(identity=None, latency_ms=None, port=None, status=None)
    assert rec["agent"] is None
    assert rec["jti"] is None
    assert rec["latency_ms"] is None


def test_record_never_contains_a_jwt() -> None:
    rec = make(
        reason=f"token {TOKEN} is revoked",
        path=f"/callback/{TOKEN}/x?access_token={TOKEN}",
        error=f"upstream said Bearer {TOKEN}",
    )
    line = render(rec)
    assert TOKEN not in line
    assert not JWT_RE.search(line)
    assert rec["reason"] == "token *** is revoked"
    assert rec["path"] == "/callback/***/x"
    assert rec["error"] == "upstream said Bearer ***"


def test_record_drops_the_query_string() -> None:
    rec = make(path="/v1beta/models/gemini:generateContent?key=AIzaSySECRET&alt=sse")
    assert rec["path"] == "/v1beta/models/gemini:generateContent"
    assert "AIzaSySECRET" not in render(rec)
    assert "?" not in rec["path"]


def test_extra_fields_are_merged() -> None:
    rec = make(extra={"llm_model": "gpt-4o", "tokens": 12})
    assert rec["llm_model"] == "gpt-4o"
    assert rec["tokens"] == 12


def test_render_is_one_json_line() -> None:
    rec = make(reason="multi\nline\nreason", path="/a\nb")
    line = render(rec)
    assert "\n" not in line
    assert line == line.strip()
    back = json.loads(line)
    assert back["reason"] == "multi\nline\nreason"
    assert list(back) == list(rec)  # field order kept for humans reading the log


def test_render_copes_with_non_json_values() -> None:
    class Odd:
        def __str__(self) -> str:
            return "odd"

    line = render({"x": Odd()})
    assert json.loads(line)["x"] == "odd"


@pytest.mark.parametrize(
    "name", ["Authorization", "proxy-authorization", "X-Api-Key", "api-key", "Cookie",
             "Set-Cookie", "x-goog-api-key"],
)
def test_secret_headers_are_masked(name: str) -> None:
    assert mask_header_value(name, "Bearer sk-secret") == "***"


def test_other_headers_keep_their_value_but_not_a_jwt() -> None:
    assert mask_header_value("Accept", "application/json") == "application/json"
    assert mask_header_value("X-Forwarded", f"t={TOKEN}") == "t=***"


def test_new_decision_id_is_unique_and_sortable() -> None:
    ids = [new_decision_id() for _ in range(100)]
    assert len(set(ids)) == 100
    assert all(re.fullmatch(r"[0-9a-f]{24}", i) for i in ids)


# -- denial body ---------------------------------------------------------------------------


def test_denial_body_shape() -> None:
    body = json.loads(denial_body(403, "es.no-admin-api", "admin APIs are off", "dec-1"))
    assert body["type"] == "error"
    err = body["error"]
    assert err["type"] == "permission_error"
    assert err["code"] == "es.no-admin-api"
    assert err["message"] == "fleetgate denied this request (es.no-admin-api): admin APIs are off"
    assert body["fleetgate"]["decision_id"] == "dec-1"
    assert body["fleetgate"]["rule"] == "es.no-admin-api"
    assert body["fleetgate"]["reason"] == "admin APIs are off"
    assert "hint" not in body["fleetgate"]


def test_denial_body_hint_and_extra() -> None:
    body = json.loads(denial_body(407, "identity", "no token", "dec-2",
                                  hint="set HTTPS_PROXY", revision="r1"))
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["message"].endswith(". set HTTPS_PROXY")
    assert body["fleetgate"]["hint"] == "set HTTPS_PROXY"
    assert body["fleetgate"]["revision"] == "r1"


@pytest.mark.parametrize(("status", "kind"), sorted(ERROR_TYPES.items()))
def test_denial_error_types(status: int, kind: str) -> None:
    assert json.loads(denial_body(status, "r", "x", "d"))["error"]["type"] == kind


def test_unknown_status_is_an_api_error() -> None:
    assert json.loads(denial_body(418, "r", "x", "d"))["error"]["type"] == "api_error"


def test_denial_body_is_bytes_of_one_line() -> None:
    raw = denial_body(403, "r", "line1\nline2", "d")
    assert isinstance(raw, bytes)
    assert b"\n" not in raw
