"""The pure parts of request hardening: one rule for ambiguity, paths that must settle, bounded
JSON nesting and bounded tokens."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest

from fleetgate.bodies import BodyError, nesting_exceeds, parse_json
from fleetgate.identity.tokens import (
    IdentityError,
    Verifier,
    VerifierConfig,
    parse_proxy_authorization,
)
from fleetgate.normalize import (
    MAX_DECODE_ROUNDS,
    PathError,
    ambiguity,
    normalize_path,
    path_ambiguity,
)

SECRET = b"unit-secret-0123456789abcdef0123456789"

# -- ambiguity ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Host", "Content-Type", "Content-Encoding", "Content-Length",
                                  "Transfer-Encoding", "Proxy-Authorization"])
def test_a_judged_header_sent_twice_is_ambiguous(name: str) -> None:
    reason = ambiguity([("Accept", "*/*"), (name, "a"), (name.lower(), "b")])
    assert reason is not None and name.lower() in reason and "2 times" in reason


def test_the_same_value_twice_is_still_ambiguous() -> None:
    # some readers join ("a, a"), some take one: refuse rather than reason about equality
    assert ambiguity([("Content-Type", "application/json")] * 2) is not None


def test_repeatable_headers_are_not_ambiguous() -> None:
    assert ambiguity([("Accept", "a"), ("Accept", "b"), ("Cookie", "x"), ("Cookie", "y"),
                      ("Host", "h"), ("Content-Type", "application/json")]) is None


def test_content_length_list_and_with_transfer_encoding() -> None:
    assert "list" in (ambiguity([("Content-Length", "5, 5")]) or "")
    both = ambiguity([("Transfer-Encoding", "chunked"), ("Content-Length", "5")])
    assert both is not None and "Transfer-Encoding" in both


@pytest.mark.parametrize(("host", "authority", "ambiguous"), [
    ("api.example.com", "api.example.com", False),
    ("API.example.com", "api.example.com", False),
    ("evil.example", "api.example.com", True),
    ("api.example.com:443", "api.example.com", True),
    ("api.example.com", "", False),  # HTTP/1: no :authority to disagree with
])
def test_host_must_equal_authority(host: str, authority: str, ambiguous: bool) -> None:
    assert (ambiguity([("Host", host)], authority) is not None) is ambiguous


# -- paths --------------------------------------------------------------------------------


def _encode(text: str, times: int) -> str:
    for _ in range(times):
        text = "".join(f"%{ord(c):02X}" if c == "d" else c.replace("%", "%25") for c in text)
    return text


@pytest.mark.parametrize("times", [1, 2, 4, 5, MAX_DECODE_ROUNDS])
def test_deeply_encoded_path_decodes_until_stable(times: int) -> None:
    raw = "/a/" + _encode("delete", times)
    assert "%" in raw
    assert normalize_path(raw) == "/a/delete"


def test_path_that_never_settles_is_refused() -> None:
    raw = "/a/" + _encode("delete", MAX_DECODE_ROUNDS + 1)
    with pytest.raises(PathError):
        normalize_path(raw)


# -- JSON depth ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "limit", "exceeds"), [
    ("[]", 1, False),
    ("[[]]", 1, True),
    ('{"a": {"b": [1, {"c": 2}]}}', 4, False),
    ('{"a": {"b": [1, {"c": 2}]}}', 3, True),
    ('["[[[[[[", "]]]]{{{{"]', 1, False),  # brackets inside strings do not count
    (r'["\"[[[[", "x"]', 1, False),  # an escaped quote does not end the string
    ("[" * 100 + "]" * 100, 99, True),
    ("[" * 100 + "]" * 100, 100, False),
    ('[{"a": [1]}, [[[2]]], 3]', 4, False),  # the deepest branch counts, not the sum
    ('[{"a": [1]}, [[[2]]], 3]', 3, True),
])
def test_json_nesting_limit(text: str, limit: int, exceeds: bool) -> None:
    assert nesting_exceeds(json.loads(text), limit) is exceeds
    if exceeds:
        with pytest.raises(BodyError, match="deeper"):
            parse_json(text.encode(), max_depth=limit)
    else:
        assert parse_json(text.encode(), max_depth=limit) == json.loads(text)


def test_deep_json_is_a_400_not_a_recursion_error() -> None:
    for depth in (65, 10_000, 200_000):
        with pytest.raises(BodyError) as err:
            parse_json(b"[" * depth + b"]" * depth)
        assert err.value.status == 400 and "deeper than 64" in err.value.message
    assert parse_json(b"[" * 64 + b"]" * 64, max_depth=64) is not None
    with pytest.raises(BodyError):
        parse_json(b'{"a": {"b": 1}}', max_depth=1)


def test_depth_is_judged_on_utf16_bodies_too() -> None:
    deep = ("[" * 80 + "]" * 80).encode("utf-16")
    with pytest.raises(BodyError, match="deeper"):
        parse_json(deep)
    assert parse_json('{"k": "\u225b"}'.encode("utf-16-le")) == {"k": "\u225b"}


# -- JWT size -----------------------------------------------------------------------------


def _token(pad: int) -> str:
    return jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256",
                      headers={"x": "p" * pad})


def test_a_validly_signed_oversized_token_is_refused() -> None:
    verifier = Verifier(VerifierConfig(hs_secret=SECRET, max_bytes=8192))
    assert verifier.verify(_token(100)).agent == "a"
    with pytest.raises(IdentityError) as err:
        verifier.verify(_token(200_000))
    assert err.value.code == "too_large"


def test_oversized_credentials_are_refused_before_decoding() -> None:
    big = _token(200_000)
    header = "Basic " + base64.b64encode(f"agent:{big}".encode()).decode()
    with pytest.raises(IdentityError) as err:
        parse_proxy_authorization(header, 8192)
    assert err.value.code == "too_large"
    small = _token(100)
    ok = "Basic " + base64.b64encode(f"agent:{small}".encode()).decode()
    assert parse_proxy_authorization(ok, 8192) == small
    assert parse_proxy_authorization(header) == big  # no bound given: not refused here


# -- paths and heads servers read differently (found by tests/e2e/test_differential.py) --------


@pytest.mark.parametrize("target", [
    "/delete/../ok", "/delete/%2e%2e/ok", "/delete/%252e%252e/ok", "/a/./b", "/a/%2E/b",
    "/delete\\..\\ok", "/a\\b", "/mcp#x", "/delete#/../ok", "/mcp#/../ok",
    "/messages/../ok?session_id=s", "/delete;x/../ok",
])
def test_paths_servers_route_differently_are_refused(target: str) -> None:
    assert path_ambiguity(target) is not None


@pytest.mark.parametrize("target", [
    "/", "/v1/chat/completions", "/a/b/", "/files/a%23b", "/a%5Cb", "/a/...", "/a/..b/c",
    "/v1/x?next=../y", "/v1/x?frag=%23", "/delete",
])
def test_paths_every_server_reads_alike_pass(target: str) -> None:
    assert path_ambiguity(target) is None


@pytest.mark.parametrize("headers", [
    [("Host", "a.example\r\n evil.example")],
    [("X-A", "a\rHost: evil.example")],
    [("X-A", "a\0b")],
    [("Host", "a.example evil.example")],
])
def test_line_breaks_nul_and_spaced_hosts_are_ambiguous(headers: list[tuple[str, str]]) -> None:
    assert ambiguity(headers) is not None
