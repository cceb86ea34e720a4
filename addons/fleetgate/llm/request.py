"""What an LLM request asks for, parsed once from its body (see :mod:`fleetgate.bodies`
for the refusals: oversized, undecodable, not JSON, duplicate keys)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fleetgate.bodies import BodyError, decode_body, parse_json
from fleetgate.llm.providers import LlmRoute
from fleetgate.llm.tokenizer import count_tokens

__all__ = ["LlmRequest", "LlmRequestError", "decode_body", "estimate_input_tokens",
           "parse_json", "parse_request", "prompt_text"]

LlmRequestError = BodyError  # the body-level refusal (400/413), shared with MCP


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
    estimated_input_tokens: int  # 0 when not estimated (see parse_request's ``estimate``)
    include_usage: bool  # OpenAI chat streams: did the client ask for the usage chunk
    input_estimated: bool = True  # False: estimated_input_tokens was not computed

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


def prompt_text(body: Mapping[str, Any]) -> str:
    """The text of a request's prompt-bearing parts, as the input estimate counts it."""
    texts: list[str] = []
    for key in _PROMPT_KEYS:
        if key in body:
            _texts(body[key], texts)
    return "\n".join(texts)


def estimate_input_tokens(body: Any, model: str | None) -> int:
    """The pre-flight input estimate of a decoded JSON body (0 for a non-object)."""
    return count_tokens(prompt_text(body), model) if isinstance(body, dict) else 0


def parse_request(route: LlmRoute, body: Any, path: str, *, estimate: bool = True) -> LlmRequest:
    """Facts from a decoded JSON body (see :func:`parse_json`).

    ``estimate=False`` skips the input estimate (``estimated_input_tokens`` is 0,
    ``input_estimated`` False) so that a policy none of whose rules, limits or budgets needs
    it never loads a tokenizer (:attr:`Policy.needs_input_estimate`)."""
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
    opts = body.get("stream_options")
    include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
    return LlmRequest(
        provider=route.provider, api=route.api, operation=route.operation, model=model,
        streaming=streaming, max_tokens=max_tokens, tools=_tool_names(route.api, body),
        estimated_input_tokens=estimate_input_tokens(body, model) if estimate else 0,
        include_usage=include_usage, input_estimated=estimate,
    )
