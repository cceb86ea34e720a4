"""The shape of an MCP HTTP exchange, checked before its body: one reading of every identifier.

The gateway judges an MCP request by values the server reads again on its own: the session
(``Mcp-Session-Id``, or the older transport's ``session_id`` query parameter), the stateless
``Mcp-Method`` / ``Mcp-Name`` headers, ``Mcp-Protocol-Version``. If such a value appears twice,
or could be read two ways, the gateway and the server can disagree on it: the MCP SDK server
takes the first ``Mcp-Session-Id`` where mitmproxy joins both (``"<A>, junk"``), Starlette
takes the last ``session_id`` where ``parse_qs`` users take the first. One agent could then
run its calls inside another agent's session. So :func:`read_identifiers` accepts a request
only when every such value has exactly one reading, and raises :class:`McpError` naming the
problem otherwise.

:func:`method_problem` says which HTTP methods an MCP endpoint may receive: POST (a judged
JSON-RPC body), GET without a body (the event stream), DELETE without a body (end of session).
A body on any other method would reach the server unjudged.

No mitmproxy, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote_plus

from fleetgate.mcp.messages import INVALID_REQUEST, McpError

__all__ = ["JUDGED_HEADERS", "SESSION_KEYS", "SessionRef", "looks_like_mcp", "method_problem",
           "read_identifiers", "session_candidates"]

JUDGED_HEADERS = ("mcp-session-id", "mcp-method", "mcp-name", "mcp-protocol-version")
SESSION_KEYS = ("session_id", "sessionId")  # the older transport's query parameter (TS: sessionId)

# Visible ASCII (what MCP allows in a session id) without the characters that split or quote
# a header value (list separator, parameters, quoted strings).
_HEADER_VALUE = re.compile(r'[\x21-\x7e]+')
_HEADER_SPLIT = frozenset(',;"\\')
# in a query value also nothing that delimits, decodes or encodes differently between parsers
_QUERY_SPLIT = _HEADER_SPLIT | frozenset("&#?=%+")


@dataclass(frozen=True)
class SessionRef:
    """The one session a request names (``None``: none) and whether it came from the query."""

    id: str | None
    in_query: bool


def _ambiguous(what: str) -> McpError:
    return McpError(INVALID_REQUEST, f"ambiguous MCP request: {what}; the gateway and the "
                    "server could read it differently")


def _one_value(name: str, values: list[str], split: bool) -> str | None:
    if not values:
        return None
    if len(values) > 1:
        raise _ambiguous(f"{len(values)} {name} headers")
    value = values[0]
    if not value:
        raise _ambiguous(f"an empty {name} header")
    if split and (not _HEADER_VALUE.fullmatch(value) or _HEADER_SPLIT & set(value)):
        raise _ambiguous(f"{name} {value[:80]!r} is not a single token (visible ASCII without "
                         "',', ';', quotes or backslashes)")
    if not split and (value != value.strip() or any(ord(c) < 0x20 or ord(c) == 0x7f
                                                    for c in value)):
        raise _ambiguous(f"{name} {value[:80]!r} has surrounding spaces or control characters")
    return value


def _query(target: str) -> str:
    # Everything after the first '?', fragment marker included: servers (uvicorn, h11) do not
    # cut at '#' in a request target, where ``urlsplit`` would.
    return target.partition("?")[2]


def _session_params(query: str, separators: str) -> list[str]:
    out = []
    for part in re.split(f"[{separators}]", query):
        key, eq, value = part.partition("=")
        if unquote_plus(key) in SESSION_KEYS:
            out.append(unquote_plus(value) if eq else "")
    return out


def session_candidates(target: str) -> list[str]:
    """Every value any parser could read as the session of ``target`` (for detection only)."""
    q = _query(target)
    return list(dict.fromkeys(_session_params(q, "&") + _session_params(q, "&;")))


def _query_session(target: str) -> str | None:
    q = _query(target)
    if not q:
        return None
    # '&' is the separator for Starlette and ``urllib``; some frameworks also split on ';'.
    # Both readings must find the same single value.
    amp, both = _session_params(q, "&"), _session_params(q, "&;")
    if len(both) > 1 or len(amp) > 1:
        raise _ambiguous(f"{max(len(both), len(amp))} session_id/sessionId query parameters")
    if amp != both:
        raise _ambiguous("a session_id query parameter hidden behind ';'")
    if not both:
        return None
    value = both[0]
    if not value or not _HEADER_VALUE.fullmatch(value) or _QUERY_SPLIT & set(value):
        raise _ambiguous(f"session query parameter {value[:80]!r} is not a single token")
    return value


def read_identifiers(headers: Iterable[tuple[str, str]], target: str) -> SessionRef:
    """Check every identifier the gateway judges has one reading; the session it names.

    ``headers`` as sent (repeated names repeated), ``target`` the request target (path and
    query). Raises :class:`McpError` (-32600) naming the first problem."""
    seen: dict[str, list[str]] = {h: [] for h in JUDGED_HEADERS}
    for name, value in headers:
        low = name.lower()
        if low in seen:
            seen[low].append(value)
    header_sid = _one_value("Mcp-Session-Id", seen["mcp-session-id"], split=True)
    _one_value("Mcp-Method", seen["mcp-method"], split=True)
    _one_value("Mcp-Protocol-Version", seen["mcp-protocol-version"], split=True)
    _one_value("Mcp-Name", seen["mcp-name"], split=False)  # compared whole with the body's target
    query_sid = _query_session(target)
    if header_sid is not None and query_sid is not None and header_sid != query_sid:
        raise _ambiguous("the Mcp-Session-Id header and the session query parameter differ")
    if header_sid is not None:
        return SessionRef(header_sid, False)
    return SessionRef(query_sid, query_sid is not None)


def looks_like_mcp(method: str, headers: Mapping[str, str], target: str,
                   known_session: Callable[[str], bool]) -> bool:
    """Whether a request to a server the policy does not declare is MCP: it carries an MCP
    header, asks for JSON or an event stream the way MCP clients do (a GET stream is sniffed
    further by its first event), or any reading of its query names a session the gateway
    knows (judged, and refused if the readings differ). ``headers`` looks up names case
    blind."""
    accept = headers.get("accept", "").lower()
    return (any(k in headers for k in JUDGED_HEADERS)
            or (method == "POST" and "text/event-stream" in accept
                and "application/json" in accept)
            or (method == "GET" and "text/event-stream" in accept)
            or any(known_session(s) for s in session_candidates(target)))


def method_problem(method: str, has_body: bool) -> str | None:
    """Why an MCP endpoint must not receive this request (``None``: it may, to be judged)."""
    if method == "POST":
        return None
    if method in ("GET", "DELETE"):
        if has_body:
            return (f"a {method} with a body (GET opens the event stream and DELETE ends the "
                    "session; neither carries JSON-RPC)")
        return None
    return f"HTTP method {method} (an MCP endpoint takes POST, GET and DELETE only)"
