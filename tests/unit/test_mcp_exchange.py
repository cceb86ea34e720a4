"""One reading of every MCP identifier, and the methods an MCP endpoint takes.

The differential tests feed the same adversarial requests to :func:`read_identifiers` and to
the parsers the servers use (Starlette's ``Headers`` and ``QueryParams``, as the MCP SDK runs
them; ``urllib.parse``; mitmproxy's joined header value): a request is either refused, or every
parser reads the session the gateway judged.
"""

from __future__ import annotations

import itertools
from urllib.parse import parse_qs

import pytest
from mitmproxy.http import Headers as MitmHeaders
from starlette.datastructures import Headers, QueryParams

from fleetgate.mcp.exchange import (
    SessionRef,
    looks_like_mcp,
    method_problem,
    read_identifiers,
    session_candidates,
)
from fleetgate.mcp.messages import INVALID_REQUEST, McpError

A = "0f3c9a1e2b7d4c5f"  # agent A's session
B = "9e8d7c6b5a4f3e2d"  # agent B's session


def refused(headers: list[tuple[str, str]], target: str = "/mcp") -> str:
    with pytest.raises(McpError) as info:
        read_identifiers(headers, target)
    assert info.value.code == INVALID_REQUEST
    assert "ambiguous MCP request" in info.value.message
    return info.value.message


def test_one_session_header_is_read() -> None:
    assert read_identifiers([("Mcp-Session-Id", A)], "/mcp") == SessionRef(A, False)
    assert read_identifiers([("Content-Type", "application/json")], "/mcp") == SessionRef(None, False)


def test_two_session_headers_are_refused() -> None:
    """The battery's hijack: A's id then junk; the SDK reads A, mitmproxy's get() a new id."""
    assert "2 Mcp-Session-Id headers" in refused([("Mcp-Session-Id", A), ("mcp-session-id", "junk")])
    assert "2 Mcp-Session-Id headers" in refused([("Mcp-Session-Id", A), ("Mcp-Session-Id", A)])


@pytest.mark.parametrize("value", [f"{A}, junk", f"{A},junk", f"{A};x", f'"{A}"', "a b", "é",
                                   "a\\b", ""])
def test_a_session_id_that_splits_or_quotes_is_refused(value: str) -> None:
    refused([("Mcp-Session-Id", value)])


@pytest.mark.parametrize("name", ["Mcp-Method", "Mcp-Name", "Mcp-Protocol-Version"])
def test_other_judged_headers_appear_once(name: str) -> None:
    msg = refused([(name, "tools/call"), (name.upper(), "tools/list")])
    assert name in msg
    refused([(name, "")])


def test_method_and_version_are_single_tokens_name_is_compared_whole() -> None:
    refused([("Mcp-Method", "tools/call, tools/list")])
    refused([("Mcp-Protocol-Version", "2025-06-18,2025-03-26")])
    # Mcp-Name must equal the body's target (engine.check_headers): a URI may hold a comma
    read_identifiers([("Mcp-Name", "file:///a,b.txt")], "/mcp")
    refused([("Mcp-Name", "nmap\x01")])


@pytest.mark.parametrize("target", [
    f"/messages/?session_id={B}&session_id={A}",
    f"/messages/?session_id={B}&sessionId={A}",
    f"/messages/?session_%69d={B}&session_id={A}",  # an encoded key is the same key
    f"/messages/?session_id={B}#&session_id={A}",  # servers do not cut at '#'
    f"/messages/?x=1;session_id={A}&session_id={B}",  # ';' splitting servers see two
    f"/messages/?x=1;session_id={A}",  # hidden behind ';' for '&'-only parsers
    f"/messages/?session_id={A}%26session_id%3D{B}",
    f"/messages/?session_id={A}+",
    f"/messages/?session_id={A}%2C{B}",
    "/messages/?session_id=",
])
def test_ambiguous_session_query_is_refused(target: str) -> None:
    refused([], target)


def test_one_session_query_parameter_is_read() -> None:
    assert read_identifiers([], f"/messages/?session_id={A}") == SessionRef(A, True)
    assert read_identifiers([], f"/messages?sessionId={A}&x=1") == SessionRef(A, True)
    assert read_identifiers([("Mcp-Session-Id", A)], f"/m?session_id={A}") == SessionRef(A, False)


def test_header_and_query_naming_different_sessions_are_refused() -> None:
    assert "differ" in refused([("Mcp-Session-Id", A)], f"/m?session_id={B}")


def test_session_candidates_name_every_reading() -> None:
    assert set(session_candidates(f"/m?session_id={B}&session_id={A}")) == {A, B}
    assert session_candidates(f"/m?x=1;session_id={A}") == [A]
    assert session_candidates("/m?x=1") == []


# -- differential: what the gateway judged is what the servers read ----------------------

HEADER_SETS = [list(p) for n in (1, 2, 3) for p in itertools.product(
    [("Mcp-Session-Id", A), ("mcp-session-id", B), ("Mcp-Session-Id", f"{A}, {B}"),
     ("Mcp-Session-Id", f"{A},junk"), ("Mcp-Session-Id", " "), ("X-Other", "1")], repeat=n)]


@pytest.mark.parametrize("headers", HEADER_SETS, ids=str)
def test_a_session_header_accepted_is_the_one_every_parser_reads(
        headers: list[tuple[str, str]]) -> None:
    try:
        ref = read_identifiers(headers, "/mcp")
    except McpError:
        return
    raw = [(k.lower().encode(), v.encode()) for k, v in headers]
    sdk = Headers(raw=raw).get("mcp-session-id")  # Starlette: the first
    joined = MitmHeaders(raw).get("mcp-session-id")  # mitmproxy: all, joined
    split = [v.strip() for v in (joined or "").split(",") if v.strip()]  # a list-splitting router
    assert ref.id == sdk == joined
    assert split == ([ref.id] if ref.id else [])


QUERY_PARTS = [f"session_id={A}", f"session_id={B}", f"sessionId={A}", "x=1", f"x=1;session_id={B}",
               f"session_id={A}#", f"session%5Fid={B}", "session_id=", f"session_id={A}%2C{B}"]
TARGETS = [f"/messages/?{'&'.join(p)}" for n in (1, 2, 3)
           for p in itertools.product(QUERY_PARTS, repeat=n)]


@pytest.mark.parametrize("target", TARGETS)
def test_a_session_query_accepted_is_the_one_every_parser_reads(target: str) -> None:
    try:
        ref = read_identifiers([], target)
    except McpError:
        return
    query = target.partition("?")[2]
    params = QueryParams(query)  # Starlette (the SDK's HTTP+SSE server): the last value
    readings = {params.get("session_id"), params.get("sessionId")} - {None}
    # urllib ('&', first or last value) and servers that split on ';' too
    for parsed in (parse_qs(query, keep_blank_values=True),
                   parse_qs(query.replace(";", "&"), keep_blank_values=True)):
        for key in ("session_id", "sessionId"):
            readings.update(parsed.get(key, []))
    assert readings == ({ref.id} if ref.id else set())


# -- methods ---------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "body", "ok"), [
    ("POST", True, True), ("POST", False, True),
    ("GET", False, True), ("DELETE", False, True),
    ("GET", True, False), ("DELETE", True, False),
    ("HEAD", False, False), ("HEAD", True, False), ("PUT", True, False), ("PATCH", True, False),
    ("OPTIONS", False, False), ("TRACE", False, False),
])
def test_an_mcp_endpoint_takes_post_and_bodiless_get_delete(method: str, body: bool,
                                                            ok: bool) -> None:
    problem = method_problem(method, body)
    assert (problem is None) is ok
    if problem:
        assert method in problem


@pytest.mark.parametrize(("method", "headers", "target", "mcp"), [
    ("POST", [("MCP-Protocol-Version", "2025-06-18")], "/x", True),  # any judged header
    ("POST", [("Accept", "application/json, text/event-stream")], "/x", True),
    ("POST", [("Accept", "text/event-stream")], "/x", False),  # a POST asks for both
    ("GET", [("Accept", "Text/Event-Stream")], "/x", True),  # the older transport: sniffed
    ("GET", [("Accept", "application/json")], "/x", False),
    ("POST", [], f"/messages?session_id={A}", True),  # a session the gateway knows
    ("POST", [], f"/messages?x=1;sessionId={A}", True),  # any reading of the query
    ("POST", [], f"/messages?session_id={B}", False),  # one it does not know
    ("POST", [], "/v1/chat/completions", False),
])
def test_an_undeclared_endpoint_is_mcp_by_its_headers_or_a_known_session(
        method: str, headers: list[tuple[str, str]], target: str, mcp: bool) -> None:
    fields = [(k.encode(), v.encode()) for k, v in headers]
    assert looks_like_mcp(method, MitmHeaders(fields), target, lambda sid: sid == A) is mcp
