"""Request bodies the gateway must read before it decides: decoded, bounded, unambiguous.

Refuses rather than guesses: a body over the inspection limit, in an encoding we cannot
decode, truncated, not JSON, or with duplicate keys (which different parsers resolve
differently, so we might judge one request while the upstream runs another) raises
:class:`BodyError`, and the gateway answers 400/413 instead of forwarding an unread body.
Used for LLM and MCP traffic alike.

JSON nesting is bounded (``fleetgate_max_json_depth``): Python's parser recurses once per
level, so a body nested thousands deep would crash it (``RecursionError``, a 500) instead of
being refused. A pre-scan counts brackets outside strings before the parser runs.
"""

from __future__ import annotations

import io
import json
import zlib
from typing import Any

from fleetgate.errors import RequestError

__all__ = [
    "DEFAULT_MAX_JSON_DEPTH",
    "BodyError",
    "decode_body",
    "max_json_depth",
    "nesting_exceeds",
    "parse_json",
    "set_max_json_depth",
]

DEFAULT_MAX_JSON_DEPTH = 64
# Set once from the option by the addon that declares it (see set_max_json_depth): every
# reader of request bodies shares one bound without each call site threading it through.
_max_json_depth = DEFAULT_MAX_JSON_DEPTH


class BodyError(RequestError):
    """The request body cannot be inspected. ``status`` is the HTTP answer (400 or 413)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _zlib_all(body: bytes, wbits: int, limit: int, what: str) -> bytes:
    """Every member/frame of a (possibly multi-member) zlib-family stream, bounded."""
    out = bytearray()
    data = body
    while True:
        d = zlib.decompressobj(wbits)
        out += d.decompress(data, limit + 1 - len(out))
        if len(out) > limit:
            return bytes(out)
        if not d.eof:
            if d.unconsumed_tail:  # output cap reached with input left: too big
                return bytes(out) + b"\0"
            raise BodyError(400, f"body is truncated {what}")
        data = d.unused_data
        if not data.strip(b"\0"):
            return bytes(out)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return body
    try:
        if enc in ("gzip", "x-gzip"):
            out = _zlib_all(body, 16 + zlib.MAX_WBITS, limit, "gzip")
        elif enc == "deflate":
            zlib_header = len(body) >= 2 and (body[0] & 0x0F) == 8 and (
                (body[0] << 8) | body[1]) % 31 == 0
            out = _zlib_all(body, zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS, limit,
                            "deflate")
        elif enc == "br":
            import brotli

            dec = brotli.Decompressor()
            out = dec.process(body, output_buffer_limit=limit + 1)
            if len(out) <= limit and not dec.is_finished():
                raise BodyError(400, "body is truncated br")
        elif enc == "zstd":
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(
                io.BytesIO(body), read_across_frames=True)
            with reader:
                out = reader.read(limit + 1)
        else:
            raise BodyError(400, f"unsupported Content-Encoding {encoding!r}")
    except BodyError:
        raise
    except Exception as exc:  # zlib.error, brotli.error, zstd.ZstdError: no common base
        raise BodyError(400, f"body is not valid {enc}: {exc}") from None
    if len(out) > limit:
        raise BodyError(413, f"decoded body exceeds the inspection limit of {limit} bytes")
    return out


def decode_body(body: bytes, content_encoding: str, limit: int) -> bytes:
    """The body as the upstream will read it, within ``limit`` bytes (else 413)."""
    if len(body) > limit:
        raise BodyError(413, f"body of {len(body)} bytes exceeds the inspection limit of "
                              f"{limit} bytes")
    for enc in reversed([e for e in content_encoding.split(",") if e.strip()]):
        body = _decompress(body, enc, limit)
    return body


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise BodyError(400, f"duplicate JSON key {k!r}: refused, as parsers disagree "
                                  "on which value wins")
        out[k] = v
    return out


def max_json_depth() -> int:
    """The nesting bound :func:`parse_json` applies when not given one."""
    return _max_json_depth


def set_max_json_depth(depth: int) -> None:
    """The nesting bound :func:`parse_json` applies when not given one (``>= 1``)."""
    global _max_json_depth
    if depth < 1:
        raise ValueError("the JSON depth limit must be at least 1")
    _max_json_depth = depth


def nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests arrays/objects deeper than ``limit`` (``[[]]`` is 2).

    Walked with an explicit stack over containers only, after the C parser built the value:
    measured on a 358 kB MCP ``tools/list`` answer, 1-2 ms, where a regex pre-scan of the
    text took 7 ms (3x the parse). Input nested deeper than the interpreter's recursion limit
    never gets here: the C parser raises ``RecursionError`` first (see :func:`parse_json`).
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def parse_json(body: bytes, max_depth: int | None = None) -> Any:
    """Parse a request body strictly: duplicate keys and nesting deeper than ``max_depth``
    (default: the configured ``fleetgate_max_json_depth``) are refused with 400."""
    limit = _max_json_depth if max_depth is None else max_depth
    try:
        # decoded exactly as json.loads decodes bytes (UTF-8/16/32), so the pre-scan sees the
        # characters the parser will see, not bytes that merely look like brackets
        text = body.decode(json.detect_encoding(body), "surrogatepass")
        value = json.loads(text, object_pairs_hook=_no_duplicates)
        # not enough openers to be too deep (memchr speed): the common case skips the walk
        if (text.count("[") + text.count("{") > limit
                and isinstance(value, dict | list) and nesting_exceeds(value, limit)):
            raise BodyError(400, f"JSON nests deeper than {limit} levels")
        return value
    except BodyError:
        raise
    except RecursionError:  # deeper than the C parser recurses (~1,000): refused, never a 500
        raise BodyError(400, f"JSON nests deeper than {limit} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BodyError(400, f"body is not JSON: {exc}") from None
