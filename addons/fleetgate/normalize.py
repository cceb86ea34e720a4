r"""Normalise what a request says before any rule looks at it.

Rules are written against what the upstream will *understand*, not the bytes the agent
chose: ``%64elete``, ``/a/../delete``, ``//delete`` and ``\\delete`` all mean ``/delete`` to
common servers, and ``API.OpenAI.com.`` is ``api.openai.com``. A deny rule must not be
evadable by spelling, so the path is percent-decoded until stable (double encoding included;
a path still changing after :data:`MAX_DECODE_ROUNDS` rounds is refused, never judged half
decoded), backslashes become slashes, repeated slashes collapse and dot segments are resolved. Encoded
``/`` and ``\`` (``%2F``, ``%5C``) are data inside a segment for the servers behind us, so they
stay encoded (as ``%2F``/``%5C``): they never create or remove a path level.

:func:`ambiguity` is the one rule for requests that could be read two ways: a value the
gateway judges that appears twice, or two values that should agree and do not.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

from fleetgate.errors import RequestError

__all__ = [
    "MAX_DECODE_ROUNDS",
    "PathError",
    "RequestFacts",
    "ambiguity",
    "normalize_host",
    "normalize_path",
    "path_ambiguity",
    "request_facts",
]

# Real clients encode at most twice; a path that still decodes after this many rounds is an
# attempt to outlast the decoder, and judging it half decoded would let it through a deny rule.
MAX_DECODE_ROUNDS = 8
_IPV4_ISH = re.compile(r"[0-9a-fx.]+")


@functools.lru_cache(maxsize=8192)
def normalize_host(host: str) -> str:
    """Lower-case, strip one trailing dot and IPv6 brackets; IP literals in canonical form."""
    h = host.strip().lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    while h.endswith("."):
        h = h[:-1]
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        pass
    if _IPV4_ISH.fullmatch(h):
        # 127.1, 0x7f.0.0.1, 2130706433: what inet_aton (and so the resolver) accepts
        try:
            return socket.inet_ntoa(socket.inet_aton(h))
        except OSError:
            pass
    return h


_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_SEPARATOR_ESCAPES = {"2F": "%2F", "5C": "%5C"}


def _decode_once(path: str) -> str:
    r"""Percent-decode, except encoded ``/`` and ``\``, which stay encoded (canonical case).

    Servers decode those *inside* a segment (an Elasticsearch document id ``a%2F..%2F_search``
    is one id, not a path), so turning them into separators would let a crafted path look
    like another one to an allow rule.
    """
    def repl(m: re.Match[str]) -> str:
        hexv = m.group(1).upper()
        return _SEPARATOR_ESCAPES.get(hexv) or m.group(0)

    kept = _ESCAPE.sub(repl, path)
    parts = re.split(r"(%2F|%5C)", kept)
    return "".join(p if p in ("%2F", "%5C") else unquote(p, errors="replace") for p in parts)


class PathError(RequestError, ValueError):
    """The path did not settle: it still decodes after :data:`MAX_DECODE_ROUNDS` rounds."""


def _decode_until_stable(path: str) -> str:
    """Percent-decode until nothing changes (encoded separators stay encoded); raises
    :class:`PathError` when that takes more than :data:`MAX_DECODE_ROUNDS` rounds."""
    for _ in range(MAX_DECODE_ROUNDS + 1):
        decoded = _decode_once(path)
        if decoded == path:
            return path
        path = decoded
    raise PathError(f"path is still percent-encoded after {MAX_DECODE_ROUNDS} rounds of "
                    "decoding")


def normalize_path(raw: str) -> str:
    """Decode and resolve a request path (without its query string).

    Raises :class:`PathError` when percent-decoding does not reach a fixed point within
    :data:`MAX_DECODE_ROUNDS` rounds: such a path is refused, never judged half decoded.
    """
    path = _decode_until_stable(raw)
    path = path.replace("\\", "/")
    segments: list[str] = []
    for seg in path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if segments:
                segments.pop()
            continue
        segments.append(seg)
    out = "/" + "/".join(segments)
    if path.endswith("/") and segments:
        out += "/"
    return out


def path_ambiguity(target: str) -> str | None:
    """Why a request target's path could be routed differently by the gateway and a server.

    The gateway judges the normalised path (:func:`normalize_path`), but servers do not all
    normalise alike: Starlette and h11 keep dot segments (``/delete/../ok`` reaches a
    ``/delete`` mount), uvicorn's httptools cuts the path at ``#`` (``/mcp#/../ok`` is
    ``/mcp``), IIS-style servers read ``\\`` as ``/``. Real clients resolve dot segments and
    never send a fragment, so a target that needs any of this is refused, never guessed at.
    ``None`` when every server reads the path the gateway judges. Raises :class:`PathError`
    when the path's percent-decoding does not settle (see :func:`normalize_path`).
    """
    path = target.partition("?")[0]
    if "#" in target:
        return "a '#' in the request target: some servers end the path there, others do not"
    if "\\" in path:
        return "a backslash in the path: some servers read it as '/', others as a character"
    if any(seg in (".", "..") for seg in _decode_until_stable(path).split("/")):
        return ("a dot segment ('.' or '..', encoded or not) in the path: the gateway would "
                "judge the resolved path while servers route on the raw one")
    return None


@dataclass(frozen=True)
class RequestFacts:
    """Everything rules may see about an HTTP request, already normalised."""

    method: str
    scheme: str
    host: str
    port: int
    path: str
    raw_path: str
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def to_cel(self, optional: frozenset[str] = frozenset({"query", "headers"})) -> dict[str, Any]:
        """The ``request`` variable rules see.

        ``query`` and ``headers`` are included only when named in ``optional``: handing a map
        to the CEL engine costs ~3 µs per entry, so the policy leaves out what no rule reads.
        """
        out: dict[str, Any] = {
            "method": self.method,
            "scheme": self.scheme,
            "host": self.host,
            "port": self.port,
            "path": self.path,
            "raw_path": self.raw_path,
        }
        if "query" in optional:
            out["query"] = dict(self.query)
        if "headers" in optional:
            out["headers"] = dict(self.headers)
        return out


def request_facts(
    method: str,
    scheme: str,
    host: str,
    port: int,
    target: str,
    headers: list[tuple[str, str]],
) -> RequestFacts:
    """Build :class:`RequestFacts` from raw request parts.

    ``target`` is the request path with its query string; ``headers`` are (name, value)
    pairs. Header names are lower-cased and repeated headers joined with ``", "``. Query
    parameters are decoded; a repeated parameter keeps its values joined with ``","`` so a
    rule sees all of them.
    """
    raw_path, _, query_string = target.partition("?")
    query: dict[str, str] = {}
    for k, v in parse_qsl(query_string, keep_blank_values=True):
        query[k] = f"{query[k]},{v}" if k in query else v
    hdrs: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        hdrs[key] = f"{hdrs[key]}, {value}" if key in hdrs else value
    return RequestFacts(
        method=method.upper(),
        scheme=scheme.lower(),
        host=normalize_host(host),
        port=int(port),
        path=normalize_path(raw_path or "/"),
        raw_path=raw_path or "/",
        query=query,
        headers=hdrs,
    )


# Headers whose value the gateway (or the server behind it) acts on as one value. Sent twice,
# one reader takes the first, another the last, a third the joined list: the gateway could
# judge one request while the server runs another. (Content-Length twice and
# Transfer-Encoding with Content-Length are framing errors mitmproxy refuses itself, with
# validate_inbound_headers, before any addon sees the request; they are listed here too so
# this function states the whole rule.)
SINGLE_VALUED = ("host", "content-type", "content-encoding", "content-length",
                 "transfer-encoding", "proxy-authorization")


def ambiguity(headers: list[tuple[str, str]], authority: str = "") -> str | None:
    """Why this request could be read two ways, or ``None`` when it cannot.

    ``headers`` are the request's (name, value) pairs as received; ``authority`` is the
    HTTP/2 ``:authority`` pseudo-header ("" for HTTP/1). Refused: a header of
    :data:`SINGLE_VALUED` sent more than once, ``Content-Length`` holding a list, both
    ``Transfer-Encoding`` and ``Content-Length``, and a ``Host`` that is not ``:authority``.
    """
    seen: dict[str, list[str]] = {}
    for name, value in headers:
        if any(c in value for c in "\r\n\0"):
            # a folded (obs-fold) line or a bare CR: one server reads a continuation, another
            # a new header line (a second Host), a third refuses it
            return f"header {name!r} carries a line break or NUL: servers split it differently"
        key = name.lower()
        if key in SINGLE_VALUED:
            seen.setdefault(key, []).append(value)
    for key in SINGLE_VALUED:
        values = seen.get(key, [])
        if len(values) > 1:
            return f"header {key!r} appears {len(values)} times: servers disagree on which wins"
    cl = seen.get("content-length")
    if cl and "," in cl[0]:
        return f"Content-Length {cl[0]!r} is a list: servers disagree on the body's length"
    if cl and seen.get("transfer-encoding"):
        return "both Transfer-Encoding and Content-Length: servers disagree on the body's length"
    host = seen.get("host")
    if host and any(c.isspace() for c in host[0].strip()):
        return f"Host {host[0]!r} contains whitespace: servers disagree on the destination"
    # compared as sent (case aside): even an explicit default port is a second reading
    if authority and host and authority.strip().lower() != host[0].strip().lower():
        return (f"Host {host[0]!r} differs from :authority {authority!r}: servers disagree "
                "on the destination")
    return None
