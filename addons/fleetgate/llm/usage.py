"""Token usage as the provider billed it, from JSON bodies and from SSE streams.

Normalised to the OpenTelemetry GenAI meaning, so one metric means one thing across
providers:

* ``input``  — every input token, cached ones included (OpenAI ``prompt_tokens``; Anthropic
  ``input_tokens + cache_read_input_tokens + cache_creation_input_tokens``; Gemini
  ``promptTokenCount``);
* ``cache_read`` / ``cache_write`` — the parts of ``input`` read from / written to the cache;
* ``output`` — every output token, reasoning included (Gemini: candidates + thoughts);
* ``reasoning`` — the part of ``output`` spent thinking.

:class:`StreamAccountant` is fed response chunks as they pass (never buffering the stream)
and yields the same :class:`Usage` a JSON body would; when the stream ends without usage it
counts the text that actually streamed and marks the figure ``estimated``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fleetgate.llm.tokenizer import count_tokens

__all__ = ["SseParser", "StreamAccountant", "Usage", "usage_from_json"]


@dataclass(frozen=True)
class Usage:
    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0
    reasoning: int = 0
    estimated: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"input": self.input, "output": self.output, "cache_read": self.cache_read,
                "cache_write": self.cache_write, "reasoning": self.reasoning,
                "estimated": self.estimated}


def _int(obj: Any, *path: str) -> int:
    for key in path:
        if not isinstance(obj, dict):
            return 0
        obj = obj.get(key)
    return obj if isinstance(obj, int) and not isinstance(obj, bool) else 0


def _openai(u: dict[str, Any]) -> Usage:
    if "prompt_tokens" in u or "completion_tokens" in u:  # chat / completions / embeddings
        return Usage(
            input=_int(u, "prompt_tokens"),
            output=_int(u, "completion_tokens"),
            cache_read=_int(u, "prompt_tokens_details", "cached_tokens"),
            reasoning=_int(u, "completion_tokens_details", "reasoning_tokens"),
        )
    return Usage(  # Responses API
        input=_int(u, "input_tokens"),
        output=_int(u, "output_tokens"),
        cache_read=_int(u, "input_tokens_details", "cached_tokens"),
        reasoning=_int(u, "output_tokens_details", "reasoning_tokens"),
    )


def _anthropic(u: dict[str, Any]) -> Usage:
    read = _int(u, "cache_read_input_tokens")
    write = _int(u, "cache_creation_input_tokens")
    return Usage(input=_int(u, "input_tokens") + read + write, output=_int(u, "output_tokens"),
                 cache_read=read, cache_write=write,
                 reasoning=_int(u, "output_tokens_details", "thinking_tokens"))


def _gemini(u: dict[str, Any]) -> Usage:
    thoughts = _int(u, "thoughtsTokenCount")
    return Usage(input=_int(u, "promptTokenCount"),
                 output=_int(u, "candidatesTokenCount") + thoughts,
                 cache_read=_int(u, "cachedContentTokenCount"), reasoning=thoughts)


def usage_from_json(api: str, body: Any) -> Usage | None:
    """Usage in a complete (non-streamed) response body, or ``None`` if it carries none."""
    if api == "gemini" and isinstance(body, list):  # streamGenerateContent without alt=sse
        found = [b for b in body if isinstance(b, dict) and isinstance(b.get("usageMetadata"), dict)]
        return _gemini(found[-1]["usageMetadata"]) if found else None
    if not isinstance(body, dict):
        return None
    if api == "gemini":
        meta = body.get("usageMetadata")
        return _gemini(meta) if isinstance(meta, dict) else None
    usage = body.get("usage")
    if api == "openai" and not isinstance(usage, dict) and isinstance(body.get("response"), dict):
        usage = body["response"].get("usage")
    if not isinstance(usage, dict):
        return None
    return _anthropic(usage) if api == "anthropic" else _openai(usage)


class SseParser:
    """Incremental ``text/event-stream`` parser: feed bytes, get complete (event, data)."""

    def __init__(self) -> None:
        self._buf = b""
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[tuple[str, str]]:
        self._buf += chunk
        out: list[tuple[str, str]] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            line = self._buf[:nl].rstrip(b"\r").decode("utf-8", "replace")
            self._buf = self._buf[nl + 1 :]
            if not line:
                if self._data or self._event:
                    out.append((self._event or "message", "\n".join(self._data)))
                self._event, self._data = "", []
            elif line.startswith(":"):
                continue
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    self._event = value
                elif name == "data":
                    self._data.append(value)
        return out


@dataclass
class StreamAccountant:
    """Counts a streamed LLM response as it passes. ``api``: openai | anthropic | gemini."""

    api: str
    model: str | None = None
    usage: Usage | None = None
    text: list[str] = field(default_factory=list)
    events: int = 0
    malformed: int = 0
    complete: bool = False  # the provider's final usage was seen
    _sse: SseParser = field(default_factory=SseParser)

    def feed(self, chunk: bytes) -> None:
        for event, data in self._sse.feed(chunk):
            self.events += 1
            if data.strip() == "[DONE]" or not data.strip():
                continue
            try:
                obj = json.loads(data)
            except ValueError:
                self.malformed += 1
                continue
            if isinstance(obj, dict):
                self._event(event, obj)

    def _event(self, event: str, obj: dict[str, Any]) -> None:
        if self.api == "anthropic":
            kind = obj.get("type", event)
            if kind == "message_start" and isinstance(obj.get("message"), dict):
                msg = obj["message"]
                self.model = msg.get("model") or self.model
                if isinstance(msg.get("usage"), dict):
                    self.usage = _anthropic(msg["usage"])
            elif kind == "message_delta" and isinstance(obj.get("usage"), dict):
                u = obj["usage"]
                base = self.usage or Usage()
                merged = _anthropic({
                    "input_tokens": u.get("input_tokens", base.input - base.cache_read
                                          - base.cache_write),
                    "cache_read_input_tokens": u.get("cache_read_input_tokens", base.cache_read),
                    "cache_creation_input_tokens": u.get("cache_creation_input_tokens",
                                                         base.cache_write),
                    "output_tokens": u.get("output_tokens", base.output),
                    "output_tokens_details": u.get("output_tokens_details",
                                                   {"thinking_tokens": base.reasoning}),
                })
                self.usage = merged
                self.complete = True
            elif kind == "content_block_delta" and isinstance(obj.get("delta"), dict):
                d = obj["delta"]
                for key in ("text", "thinking", "partial_json"):
                    if isinstance(d.get(key), str):
                        self.text.append(d[key])
            return
        if self.api == "gemini":
            if isinstance(obj.get("usageMetadata"), dict):
                self.usage = _gemini(obj["usageMetadata"])
            self.model = obj.get("modelVersion") or self.model
            for cand in obj.get("candidates") or []:
                if isinstance(cand, dict) and cand.get("finishReason") and self.usage is not None:
                    self.complete = True
                parts = ((cand or {}).get("content") or {}).get("parts") or []
                self.text.extend(p["text"] for p in parts
                                 if isinstance(p, dict) and isinstance(p.get("text"), str))
            return
        # openai: chat completions chunks, legacy completions, Responses API events
        kind = obj.get("type") if isinstance(obj.get("type"), str) else event
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            resp = obj.get("response")
            if isinstance(resp, dict):
                self.model = resp.get("model") or self.model
                if isinstance(resp.get("usage"), dict):
                    self.usage = _openai(resp["usage"])
                    self.complete = True
            return
        if kind == "response.output_text.delta" and isinstance(obj.get("delta"), str):
            self.text.append(obj["delta"])
            return
        self.model = obj.get("model") or self.model
        if isinstance(obj.get("usage"), dict):
            self.usage = _openai(obj["usage"])
            self.complete = True
        for choice in obj.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                for key in ("content", "reasoning_content", "refusal"):
                    if isinstance(delta.get(key), str):
                        self.text.append(delta[key])
            elif isinstance(choice.get("text"), str):
                self.text.append(choice["text"])

    def finish(self, estimated_input: int | Callable[[], int] = 0) -> Usage:
        """The usage the provider reported, or an estimate from what streamed (the tokenizer
        loads only here, when the provider reported none). ``estimated_input`` may be a
        callable, called only when the input must be estimated too."""
        if self.complete and self.usage is not None:
            return self.usage
        streamed = count_tokens("".join(self.text), self.model)
        if self.usage is not None:  # e.g. Anthropic message_start seen, stream then cut
            return replace(self.usage, output=max(self.usage.output, streamed), estimated=True)
        est_in = estimated_input() if callable(estimated_input) else estimated_input
        return Usage(input=est_in, output=streamed, estimated=True)
