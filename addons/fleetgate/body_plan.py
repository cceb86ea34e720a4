"""What the gateway does with a request body, decided from the headers alone.

mitmproxy buffers every request body whole unless told to stream it in ``requestheaders``,
before a byte of it arrived. A 100 MB upload to a plain HTTPS host cost 100 MiB of RSS, and a
100 MB LLM request was read whole only to be refused. So each flow gets a plan before its body
is read:

- ``read``: something must judge the body (an LLM route, an MCP endpoint, the kill switch's
  message depth on a JSON body): it is buffered up to that reader's limit, and refused (413)
  from ``Content-Length`` at once, or, for a body of unknown length, as soon as the running
  count passes the limit. Never forwarded unread: the reader could not have judged it.
- ``stream``: nothing reads it and it is large or of unknown length: it flows chunk by chunk,
  bounded by ``max_body`` (refused from ``Content-Length``, cut past it otherwise).
- ``buffer``: nothing reads it but it is small: buffered as before (cheap, and it keeps the
  request hooks after the body for the many small calls).

Pure: no mitmproxy import; the addon gathers the facts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["DEPTH_READ_LIMIT", "BodyFacts", "BodyPlan", "parse_content_length", "plan_body"]

# The kill switch reads a JSON body's top-level ``depth`` only within this many bytes; a larger
# JSON body it would have to judge is refused instead of passed unchecked.
DEPTH_READ_LIMIT = 16 << 20  # as fleetgate_llm_max_body: a 16 MiB JSON upload still passes


@dataclass(frozen=True, slots=True)
class BodyFacts:
    """What is known of a request before its body: who would read it, and how big it says it is.

    ``content_length`` is ``None`` for a body of unknown length (chunked). ``llm_limit`` /
    ``mcp_limit`` are set when the flow goes to an LLM route / an MCP endpoint; ``depth_check``
    when the kill switch would look for ``depth`` in this body (JSON, no depth header).
    """

    has_body: bool
    content_length: int | None
    llm_limit: int | None = None
    mcp_limit: int | None = None
    depth_check: bool = False
    max_body: int = 1 << 30
    a2a_limit: int | None = None  # an A2A agent's endpoint: the body is its message
    stream_min_bytes: int = 1 << 20


@dataclass(frozen=True, slots=True)
class BodyPlan:
    action: Literal["none", "buffer", "read", "stream", "refuse"]
    limit: int | None = None  # the bound the body must stay within (bytes on the wire)
    reader: str = ""  # who needs the body (llm, mcp, message-depth) or "gateway" for max_body
    reason: str = ""


def parse_content_length(values: list[str]) -> int | Literal["invalid"] | None:
    """The one length the request declares, ``None`` if none, ``"invalid"`` if unreadable.

    mitmproxy's ``validate_inbound_headers`` already refuses conflicting lengths; this only
    guards against reading a value two ways here."""
    if not values:
        return None
    parts = {p.strip() for v in values for p in v.split(",")}
    if len(parts) != 1:
        return "invalid"
    (only,) = parts
    if not only.isdigit() or not only.isascii():
        return "invalid"
    return int(only)


def plan_body(facts: BodyFacts) -> BodyPlan:
    """Decide from the headers alone; a body too large for the reader that needs it is refused
    here, before it is read."""
    if not facts.has_body:
        return BodyPlan("none")
    size = facts.content_length
    readers = [(name, limit) for name, limit in (("llm", facts.llm_limit),
                                                 ("mcp", facts.mcp_limit),
                                                 ("a2a", facts.a2a_limit))
               if limit is not None]
    if facts.depth_check:
        readers.append(("message-depth", DEPTH_READ_LIMIT))
    if readers:
        name, limit = min(readers, key=lambda r: r[1])  # every reader must be able to read it
        if size is not None and size > limit:
            return BodyPlan("refuse", limit, name,
                            f"request body of {size} bytes is over the {limit}-byte limit of "
                            f"what must inspect it ({name}); refused unread")
        return BodyPlan("read", limit, name)
    if size is not None and size > facts.max_body:
        return BodyPlan("refuse", facts.max_body, "gateway",
                        f"request body of {size} bytes is over the gateway's limit of "
                        f"{facts.max_body} bytes")
    if size is not None and size < facts.stream_min_bytes:
        return BodyPlan("buffer", facts.max_body, "gateway")
    return BodyPlan("stream", facts.max_body, "gateway")
