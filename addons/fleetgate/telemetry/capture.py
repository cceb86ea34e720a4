"""Prompt and completion capture for LLM spans (Langfuse-style analysis), opt-in per profile.

Pure. Nothing is captured unless a profile that selected the agent says
``telemetry: {capture: [...]}``; what is captured is masked the way the decision log masks
(JWT-shaped strings) plus the credential shapes agents paste into prompts (provider API keys,
cloud keys, bearer tokens), and cut at the profile's ``maxBytes`` per side. The result goes
into the span as the GenAI conventions' ``gen_ai.input.messages`` /
``gen_ai.system_instructions`` / ``gen_ai.output.messages`` (JSON strings).
"""

from __future__ import annotations

import json
from typing import Any

from fleetgate.decisionlog import mask_secret_text

__all__ = ["CAPTURE", "CAPTURED_OUTPUT", "answer_text", "completion_attributes", "mask",
           "prompt_attributes"]

# flow.metadata keys: the cap set at request time (the stream counter keeps the output text
# only when asked), and the output text it kept
CAPTURE = "fleetgate.capture"
CAPTURED_OUTPUT = "fleetgate.captured_output"


def mask(text: str) -> str:
    return mask_secret_text(text)


def _cut(text: str, max_bytes: int) -> str:
    raw = text.encode()
    if len(raw) <= max_bytes:
        return text
    kept = raw[:max_bytes].decode(errors="ignore")
    return f"{kept}…[{len(raw) - len(kept.encode())} more bytes not captured]"


def prompt_attributes(body: bytes | None, max_bytes: int) -> dict[str, str]:
    """The request's messages and system instructions (OpenAI chat/responses, Anthropic,
    Gemini shapes); the whole body (masked, cut) when its shape is not one of those."""
    if not body:
        return {}
    try:
        doc: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {"gen_ai.input.messages": _cut(mask(body.decode(errors="replace")), max_bytes)}
    if not isinstance(doc, dict):
        return {}
    out: dict[str, str] = {}
    messages = next((doc[k] for k in ("messages", "contents", "input", "prompt") if k in doc),
                    None)
    system = doc.get("system", doc.get("systemInstruction", doc.get("instructions")))
    if messages is not None:
        out["gen_ai.input.messages"] = _cut(mask(json.dumps(messages, ensure_ascii=False)),
                                            max_bytes)
    if system is not None:
        out["gen_ai.system_instructions"] = _cut(mask(json.dumps(system, ensure_ascii=False)),
                                                 max_bytes)
    return out


def completion_attributes(text: str | None, max_bytes: int) -> dict[str, str]:
    """The answer's text as one assistant message."""
    if not text:
        return {}
    message = [{"role": "assistant", "parts": [{"type": "text", "content": mask(text)}]}]
    return {"gen_ai.output.messages": _cut(json.dumps(message, ensure_ascii=False), max_bytes)}


def answer_text(doc: Any) -> str:
    """The generated text of a whole (non-streamed) answer: OpenAI chat and responses,
    Anthropic messages, Gemini; ``""`` for any other shape."""
    if not isinstance(doc, dict):
        return ""
    parts: list[str] = []
    for choice in doc.get("choices") or []:
        if isinstance(choice, dict):
            msg = choice.get("message") or {}
            if isinstance(msg, dict) and isinstance(msg.get("content"), str):
                parts.append(msg["content"])
            elif isinstance(choice.get("text"), str):
                parts.append(choice["text"])
    blocks = [b for b in doc.get("content") or [] if isinstance(b, dict)] \
        if isinstance(doc.get("content"), list) else []
    for item in doc.get("output") or []:
        if isinstance(item, dict) and isinstance(item.get("content"), list):
            blocks += [b for b in item["content"] if isinstance(b, dict)]
    for cand in doc.get("candidates") or []:
        if isinstance(cand, dict) and isinstance(cand.get("content"), dict):
            blocks += [b for b in cand["content"].get("parts") or [] if isinstance(b, dict)]
    parts += [str(b["text"]) for b in blocks if isinstance(b.get("text"), str)]
    return "".join(parts)
