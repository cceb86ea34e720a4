"""Normalise what a request says before any rule looks at it.

Rules are written against what the upstream will *understand*, not the bytes the agent
chose: ``%64elete``, ``/a/../delete``, ``//delete`` and ``\\delete`` all mean ``/delete`` to
common servers, and ``API.OpenAI.com.`` is ``api.openai.com``. A deny rule must not be
evadable by spelling, so the path is percent-decoded until stable (double encoding included),
backslashes become slashes, repeated slashes collapse and dot segments are resolved.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

__all__ = ["RequestFacts", "normalize_host", "normalize_path", "request_facts"]

_MAX_DECODE_ROUNDS = 4


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
        return h


def normalize_path(raw: str) -> str:
    """Decode and resolve a request path (without its query string)."""
    path = raw
    for _ in range(_MAX_DECODE_ROUNDS):
        decoded = unquote(path, errors="replace")
        if decoded == path:
            break
        path = decoded
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

    def to_cel(self) -> dict[str, Any]:
        """The ``request`` variable rules see."""
        return {
            "method": self.method,
            "scheme": self.scheme,
            "host": self.host,
            "port": self.port,
            "path": self.path,
            "raw_path": self.raw_path,
            "query": dict(self.query),
            "headers": dict(self.headers),
        }


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
