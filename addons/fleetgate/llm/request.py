"""What an LLM request asks for, parsed once from its body.

Refuses rather than guesses: a body over the inspection limit, in an encoding we cannot
decode, not JSON, or with duplicate keys (which different parsers resolve differently, so
we might judge one request while the provider runs another) raises :class:`LlmRequestError`,
and the gateway answers 400/413 instead of forwarding an unread body.
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fleetgate.llm.providers import LlmRoute
from fleetgate.llm.tokenizer import count_tokens

__all__ = ["LlmRequest", "LlmRequestError", "decode_body", "parse_request"]


class LlmRequestError(Exception):
    """The request body cannot be inspected. ``status`` is the HTTP answer (400 or 413)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class LlmRequest:
    """Request facts for rules (``llm.*``), metering and limits."""

    provider: str
    api: str
    operation: str
    model: str | None
    streaming: bool
    max_tokens: int | None
    tools: tuple[str, ...]
    estimated_input_tokens: int
    include_usage: bool  # OpenAI chat streams: did the client ask for the usage chunk

    def to_cel(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "api": self.api,
            "operation": self.operation,
            "model": self.model or "",
            "streaming": self.streaming,
            "max_tokens": self.max_tokens if self.max_tokens is not None else 0,
            "has_max_tokens": self.max_tokens is not None,
            "tools": list(self.tools),
            "estimated_input_tokens": self.estimated_input_tokens,
        }


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
            raise LlmRequestError(400, f"body is truncated {what}")
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
                raise LlmRequestError(400, "body is truncated br")
        elif enc == "zstd":
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(
                io.BytesIO(body), read_across_frames=True)
            with reader:
                out = reader.read(limit + 1)
        else:
            raise LlmRequestError(400, f"unsupported Content-Encoding {encoding!r}")
    except LlmRequestError:
        raise
    except Exception as exc:  # zlib.error, brotli.error, zstd.ZstdError: no common base
        raise LlmRequestError(400, f"body is not valid {enc}: {exc}") from None
    if len(out) > limit:
        raise LlmRequestError(413, f"decoded body exceeds the inspection limit of {limit} bytes")
    return out


def decode_body(body: bytes, content_encoding: str, limit: int) -> bytes:
    """The body as the upstream will read it, within ``limit`` bytes (else 413)."""
    if len(body) > limit:
        raise LlmRequestError(413, f"body of {len(body)} bytes exceeds the inspection limit of "
                              f"{limit} bytes")
    for enc in reversed([e for e in content_encoding.split(",") if e.strip()]):
        body = _decompress(body, enc, limit)
    return body


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise LlmRequestError(400, f"duplicate JSON key {k!r}: refused, as parsers disagree "
                                  "on which value wins")
        out[k] = v
    return out


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body, object_pairs_hook=_no_duplicates)
    except LlmRequestError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise LlmRequestError(400, f"body is not JSON: {exc}") from None


def _texts(obj: Any, out: list[str], depth: int = 0) -> None:
    """Every string in the prompt-bearing parts of a request, for the input estimate."""
    if depth > 32:
        return
    if isinstance(obj, str):
        out.append(obj)
    elif isinstance(obj, list):
        for item in obj:
            _texts(item, out, depth + 1)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("image_url", "source", "inline_data", "inlineData", "file_data",
                       "input_audio", "audio", "image", "file"):
                continue  # binary payloads are not text tokens
            _texts(value, out, depth + 1)


_PROMPT_KEYS = ("messages", "system", "input", "prompt", "instructions", "contents",
                "systemInstruction", "system_instruction", "tools")


def _tool_names(api: str, body: Mapping[str, Any]) -> tuple[str, ...]:
    names: list[str] = []
    for tool in body.get("tools") or []:
        if not isinstance(tool, dict):
            continue
        if api == "gemini":
            for fd in tool.get("functionDeclarations") or tool.get("function_declarations") or []:
                if isinstance(fd, dict) and isinstance(fd.get("name"), str):
                    names.append(fd["name"])
        elif isinstance(tool.get("function"), dict) and isinstance(tool["function"].get("name"), str):
            names.append(tool["function"]["name"])
        elif isinstance(tool.get("name"), str):
            names.append(tool["name"])
    return tuple(names)


def parse_request(route: LlmRoute, body: Any, path: str) -> LlmRequest:
    """Facts from a decoded JSON body (see :func:`parse_json`)."""
    if not isinstance(body, dict):
        raise LlmRequestError(400, "LLM request body must be a JSON object")
    model = body.get("model") if isinstance(body.get("model"), str) else route.path_model
    if route.api == "gemini":
        streaming = ":streamGenerateContent" in path
        cfg = body.get("generationConfig")
        max_tokens = cfg.get("maxOutputTokens") if isinstance(cfg, dict) else None
    else:
        streaming = body.get("stream") is True
        max_tokens = next((body[k] for k in ("max_tokens", "max_completion_tokens",
                                             "max_output_tokens") if k in body), None)
    if not (isinstance(max_tokens, int) and not isinstance(max_tokens, bool)):
        max_tokens = None
    texts: list[str] = []
    for key in _PROMPT_KEYS:
        if key in body:
            _texts(body[key], texts)
    opts = body.get("stream_options")
    include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
    return LlmRequest(
        provider=route.provider, api=route.api, operation=route.operation, model=model,
        streaming=streaming, max_tokens=max_tokens, tools=_tool_names(route.api, body),
        estimated_input_tokens=count_tokens("\n".join(texts), model),
        include_usage=include_usage,
    )
