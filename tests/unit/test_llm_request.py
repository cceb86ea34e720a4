"""Which requests are LLM calls, and what they ask for: provider routing, body decoding
(bounded, refusing what it cannot read), duplicate-key-safe JSON, and the request facts."""

from __future__ import annotations

import base64
import gzip
import io
import json
import zlib
from typing import Any

import brotli
import pytest
import zstandard

from fleetgate.llm.providers import LlmRoute, ProviderTable, provider_from_dict
from fleetgate.llm.request import LlmRequestError, decode_body, parse_json, parse_request
from fleetgate.llm.tokenizer import count_tokens

# -- routing ------------------------------------------------------------------------------

GEMINI = "generativelanguage.googleapis.com"
AZURE = "contoso-eastus.openai.azure.com"


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        ("api.openai.com", "/v1/chat/completions", LlmRoute("openai", "openai", "chat", None)),
        ("api.openai.com", "/v1/chat/completions/", LlmRoute("openai", "openai", "chat", None)),
        ("api.openai.com", "/v1/responses", LlmRoute("openai", "openai", "responses", None)),
        ("api.openai.com", "/v1/embeddings", LlmRoute("openai", "openai", "embeddings", None)),
        ("api.openai.com", "/v1/completions",
         LlmRoute("openai", "openai", "text_completion", None)),
        ("api.anthropic.com", "/v1/messages", LlmRoute("anthropic", "anthropic", "chat", None)),
        ("api.anthropic.com", "/v1/messages/count_tokens",
         LlmRoute("anthropic", "anthropic", "count_tokens", None)),
        ("api.x.ai", "/v1/chat/completions", LlmRoute("xai", "openai", "chat", None)),
        ("api.x.ai", "/v1/responses", LlmRoute("xai", "openai", "responses", None)),
        (GEMINI, "/v1beta/models/gemini-2.5-pro:generateContent",
         LlmRoute("gcp.gemini", "gemini", "generate_content", "gemini-2.5-pro")),
        (GEMINI, "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
         LlmRoute("gcp.gemini", "gemini", "generate_content", "gemini-2.5-flash")),
        (GEMINI, "/v1/models/gemini-2.5-flash-lite:generateContent",
         LlmRoute("gcp.gemini", "gemini", "generate_content", "gemini-2.5-flash-lite")),
        (GEMINI, "/v1beta/models/gemini-2.5-pro:countTokens",
         LlmRoute("gcp.gemini", "gemini", "count_tokens", "gemini-2.5-pro")),
        (AZURE, "/openai/deployments/prod-gpt4o/chat/completions",
         LlmRoute("azure.ai.openai", "openai", "chat", "prod-gpt4o")),
        (AZURE, "/openai/deployments/embed-small/embeddings",
         LlmRoute("azure.ai.openai", "openai", "embeddings", "embed-small")),
        ("contoso.cognitiveservices.azure.com", "/openai/deployments/o3-mini/completions",
         LlmRoute("azure.ai.openai", "openai", "text_completion", "o3-mini")),
        (AZURE, "/openai/v1/responses", LlmRoute("azure.ai.openai", "openai", "responses", None)),
        (AZURE, "/openai/v1/chat/completions", LlmRoute("azure.ai.openai", "openai", "chat", None)),
        # not LLM calls
        ("api.openai.com", "/v1/models", None),
        ("api.openai.com", "/v1/files", None),
        ("api.openai.com", "/v1/chat/completions/extra", None),
        ("api.anthropic.com", "/v1/chat/completions", None),
        (GEMINI, "/v1beta/models/gemini-2.5-pro", None),
        (GEMINI, "/v1beta/models/a/b:generateContent", None),
        ("example.com", "/v1/chat/completions", None),
        ("api.openai.com.evil.com", "/v1/chat/completions", None),
        ("evilapi.openai.com", "/v1/chat/completions", None),
        ("openai.azure.com", "/openai/deployments/x/chat/completions", None),
        ("contoso.openai.azure.com.evil.net", "/openai/deployments/x/chat/completions", None),
    ],
)
def test_builtin_routes(host: str, path: str, expected: LlmRoute | None) -> None:
    assert ProviderTable().route(host, 443, path) == expected


def test_count_tokens_is_not_billable() -> None:
    table = ProviderTable()
    anthropic_count = table.route("api.anthropic.com", 443, "/v1/messages/count_tokens")
    gemini_count = table.route(GEMINI, 443, "/v1beta/models/gemini-2.5-pro:countTokens")
    chat = table.route("api.anthropic.com", 443, "/v1/messages")
    assert anthropic_count is not None and gemini_count is not None and chat is not None
    assert (anthropic_count.billable, gemini_count.billable, chat.billable) == (False, False, True)


def test_operator_provider_with_path_prefix() -> None:
    vllm = provider_from_dict({"name": "vllm", "api": "openai", "hosts": ["vllm.internal:8000"],
                               "pathPrefix": "/proxy"})
    table = ProviderTable([vllm])
    assert table.route("vllm.internal", 8000, "/proxy/v1/chat/completions") == LlmRoute(
        "vllm", "openai", "chat", None)
    assert table.route("vllm.internal", 8000, "/proxy/v1/embeddings") == LlmRoute(
        "vllm", "openai", "embeddings", None)
    assert table.route("vllm.internal", 8000, "/v1/chat/completions") is None  # prefix needed
    assert table.route("vllm.internal", 9000, "/proxy/v1/chat/completions") is None  # port
    assert table.route("other.internal", 8000, "/proxy/v1/chat/completions") is None
    # built-ins still work alongside
    assert table.route("api.openai.com", 443, "/v1/responses") == LlmRoute(
        "openai", "openai", "responses", None)


def test_operator_prefix_trailing_slash_and_regex_characters() -> None:
    p = provider_from_dict({"name": "gw", "api": "anthropic", "hosts": ["gw.corp"],
                            "pathPrefix": "/llm.v2/anthropic/"})
    table = ProviderTable([p])
    assert table.route("gw.corp", 443, "/llm.v2/anthropic/v1/messages") == LlmRoute(
        "gw", "anthropic", "chat", None)
    assert table.route("gw.corp", 443, "/llm.v2/anthropic/v1/messages/count_tokens") == LlmRoute(
        "gw", "anthropic", "count_tokens", None)
    assert table.route("gw.corp", 443, "/llmXv2/anthropic/v1/messages") is None


def test_operator_gemini_provider_takes_model_from_path() -> None:
    p = provider_from_dict({"name": "gemini-proxy", "api": "gemini", "hosts": ["*.llm.corp"]})
    assert ProviderTable([p]).route("eu.llm.corp", 443,
                                    "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
                                    ) == LlmRoute("gemini-proxy", "gemini", "generate_content",
                                                  "gemini-2.5-flash")


def test_operator_provider_claims_a_builtin_host() -> None:
    p = provider_from_dict({"name": "corp-openai", "api": "openai", "hosts": ["api.openai.com"]})
    route = ProviderTable([p]).route("api.openai.com", 443, "/v1/chat/completions")
    assert route is not None and route.provider == "corp-openai"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({}, "needs a 'name'"),
        ({"name": "", "api": "openai", "hosts": ["h"]}, "needs a 'name'"),
        ({"name": 3, "api": "openai", "hosts": ["h"]}, "needs a 'name'"),
        ({"name": "x", "api": "cohere", "hosts": ["h"]}, "'api' must be one of"),
        ({"name": "x", "hosts": ["h"]}, "'api' must be one of"),
        ({"name": "x", "api": "openai"}, "'hosts' must be a non-empty list"),
        ({"name": "x", "api": "openai", "hosts": []}, "'hosts' must be a non-empty list"),
        ({"name": "x", "api": "openai", "hosts": "h.corp"}, "'hosts' must be a non-empty list"),
        ({"name": "x", "api": "openai", "hosts": [8000]}, "'hosts' must be a non-empty list"),
        ({"name": "x", "api": "openai", "hosts": ["h"], "pathPrefix": "proxy"},
         "'pathPrefix' must start with '/'"),
        ({"name": "x", "api": "openai", "hosts": ["h"], "pathPrefix": 5},
         "'pathPrefix' must start with '/'"),
        ({"name": "x", "api": "openai", "hosts": ["api.*.com"]}, "'*' is only allowed"),
        ({"name": "x", "api": "openai", "hosts": ["h:99999"]}, "port must be 1-65535"),
    ],
)
def test_provider_from_dict_rejects(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        provider_from_dict(entry)


# -- body decoding ---------------------------------------------------------------------------

BODY = json.dumps({
    "model": "gpt-4o",
    "messages": [{"role": "system", "content": "You are terse."},
                 {"role": "user", "content": "Résumé of the incident, please — ✂️ short."}],
    "max_completion_tokens": 256,
}, ensure_ascii=False).encode()
LIMIT = 64 * 1024


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def _zstd_streamed(data: bytes) -> bytes:  # frame without a content size, as servers stream it
    c = zstandard.ZstdCompressor().compressobj()
    return c.compress(data) + c.flush()


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("", lambda b: b),
        ("identity", lambda b: b),
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("GZIP", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", _raw_deflate),
        ("br", brotli.compress),
        ("zstd", zstandard.ZstdCompressor().compress),
        ("zstd", _zstd_streamed),
        # stacked: listed in the order applied, so deflate first, then gzip
        ("deflate, gzip", lambda b: gzip.compress(zlib.compress(b))),
        ("br,zstd", lambda b: zstandard.ZstdCompressor().compress(brotli.compress(b))),
    ],
)
def test_decode_body(encoding: str, encode: Any) -> None:
    assert decode_body(encode(BODY), encoding, LIMIT) == BODY


ZEROS = b"\0" * (4 * 1024 * 1024)


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [("gzip", gzip.compress), ("deflate", zlib.compress), ("deflate", _raw_deflate),
     ("br", brotli.compress), ("zstd", zstandard.ZstdCompressor().compress),
     ("zstd", _zstd_streamed)],
)
def test_decompression_bomb_is_413(encoding: str, encode: Any) -> None:
    bomb = encode(ZEROS)
    assert len(bomb) < LIMIT  # small on the wire, 4 MiB decoded
    with pytest.raises(LlmRequestError) as exc:
        decode_body(bomb, encoding, LIMIT)
    assert exc.value.status == 413


def test_decoded_size_boundary() -> None:
    exact = b" " * 1000
    assert decode_body(gzip.compress(exact), "gzip", 1000) == exact
    with pytest.raises(LlmRequestError) as exc:
        decode_body(gzip.compress(exact + b" "), "gzip", 1000)
    assert exc.value.status == 413


def test_body_over_limit_is_413() -> None:
    assert decode_body(b"x" * 100, "", 100) == b"x" * 100
    with pytest.raises(LlmRequestError) as exc:
        decode_body(b"x" * 101, "", 100)
    assert exc.value.status == 413
    # the wire size counts too, before any decoding
    with pytest.raises(LlmRequestError) as exc:
        decode_body(gzip.compress(b"x" * 10) + b"\0" * 200, "gzip", 100)
    assert exc.value.status == 413


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", BODY),
        ("gzip", b"\x1f\x8b\x08\x00garbage-after-a-gzip-magic"),
        ("deflate", b"definitely not deflate"),
        ("br", b"\xff\xff\xff not brotli"),
        ("zstd", b"not a zstd frame at all"),
        ("compress", BODY),
        ("snappy", BODY),
        ("gzip, rot13", gzip.compress(BODY)),
    ],
)
def test_undecodable_body_is_400(encoding: str, body: bytes) -> None:
    with pytest.raises(LlmRequestError) as exc:
        decode_body(body, encoding, LIMIT)
    assert exc.value.status == 400


def test_truncated_gzip_is_400() -> None:
    """A gzip body cut before its CRC/length trailer is not a valid gzip body: the upstream
    will reject it, so the gateway must not judge a body the upstream never reads."""
    with pytest.raises(LlmRequestError) as exc:
        decode_body(gzip.compress(BODY)[:-8], "gzip", LIMIT)
    assert exc.value.status == 400


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [("gzip", gzip.compress), ("zstd", zstandard.ZstdCompressor().compress)],
)
def test_multi_member_body_decodes_in_full(encoding: str, encode: Any) -> None:
    """RFC 1952 allows several gzip members back to back, and RFC 8878 several zstd frames;
    decoders (Python's gzip, Go's gzip.Reader, zstd CLI) read them all. The gateway must
    inspect the body the upstream will read, not just its first member."""
    body = encode(BODY[:20]) + encode(BODY[20:])
    if encoding == "gzip":
        reference = gzip.decompress(body)
    else:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body), read_across_frames=True)
        reference = reader.read()
    assert reference == BODY  # what a standard decoder makes of it
    assert decode_body(body, encoding, LIMIT) == BODY


# -- JSON ------------------------------------------------------------------------------------

def test_parse_json_ok() -> None:
    assert parse_json(BODY)["max_completion_tokens"] == 256


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"gpt-4o-mini","messages":[],"model":"o3"}',
        b'{"model":"gpt-4o","messages":[{"role":"user","content":"a","content":"b"}]}',
        b'{"model":"gpt-4o","stream_options":{"include_usage":true,"include_usage":false}}',
        # the same key spelled with a JSON escape is still the same key
        b'{"model":"gpt-4o-mini","mod\\u0065l":"o3"}',
    ],
)
def test_parse_json_rejects_duplicate_keys(body: bytes) -> None:
    with pytest.raises(LlmRequestError) as exc:
        parse_json(body)
    assert exc.value.status == 400
    assert "duplicate JSON key" in exc.value.message


@pytest.mark.parametrize(
    "body",
    [b"", b"model=gpt-4o&stream=true", b'{"model": "gpt-4o",}', b"\xff\xfe{}",
     b'{"model":"gpt-4o"} trailing'],
)
def test_parse_json_rejects_non_json(body: bytes) -> None:
    with pytest.raises(LlmRequestError) as exc:
        parse_json(body)
    assert exc.value.status == 400


# -- request facts ---------------------------------------------------------------------------

OPENAI_CHAT = LlmRoute("openai", "openai", "chat", None)
OPENAI_RESPONSES = LlmRoute("openai", "openai", "responses", None)
ANTHROPIC = LlmRoute("anthropic", "anthropic", "chat", None)
GEMINI_ROUTE = LlmRoute("gcp.gemini", "gemini", "generate_content", "gemini-2.5-pro")
AZURE_ROUTE = LlmRoute("azure.ai.openai", "openai", "chat", "prod-gpt4o")


def test_openai_chat_facts() -> None:
    body = {
        "model": "gpt-4o",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 1024,
        "messages": [{"role": "user", "content": "What's the weather in Oslo?"}],
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object", "properties": {"city": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "get_time", "parameters": {}}},
        ],
    }
    req = parse_request(OPENAI_CHAT, body, "/v1/chat/completions")
    assert (req.provider, req.api, req.operation) == ("openai", "openai", "chat")
    assert req.model == "gpt-4o"
    assert req.streaming is True
    assert req.include_usage is True
    assert req.max_tokens == 1024
    assert req.tools == ("get_weather", "get_time")


def test_openai_responses_facts() -> None:
    body = {
        "model": "gpt-5",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Find CVE-2024-3094"}]}],
        "max_output_tokens": 2048,
        "tools": [{"type": "function", "name": "search_cves", "parameters": {}},
                  {"type": "web_search_preview"}],
    }
    req = parse_request(OPENAI_RESPONSES, body, "/v1/responses")
    assert (req.model, req.streaming, req.max_tokens, req.tools) == (
        "gpt-5", False, 2048, ("search_cves",))
    assert req.include_usage is False


def test_anthropic_facts() -> None:
    body = {
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 4096,
        "stream": True,
        "system": [{"type": "text", "text": "You review contracts.",
                    "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "Summarise clause 9."}],
        "tools": [
            {"name": "lookup_clause", "description": "Fetch a clause",
             "input_schema": {"type": "object", "properties": {"n": {"type": "integer"}}}},
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
        ],
    }
    req = parse_request(ANTHROPIC, body, "/v1/messages")
    assert (req.model, req.streaming, req.max_tokens, req.tools) == (
        "claude-sonnet-4-5-20250929", True, 4096, ("lookup_clause", "web_search"))


@pytest.mark.parametrize(
    ("path", "streaming"),
    [
        ("/v1beta/models/gemini-2.5-pro:generateContent", False),
        ("/v1beta/models/gemini-2.5-pro:streamGenerateContent", True),
        ("/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse", True),
    ],
)
def test_gemini_facts(path: str, streaming: bool) -> None:
    body = {
        "contents": [{"role": "user", "parts": [{"text": "Plan a 3-day trip to Kyoto."}]}],
        "generationConfig": {"maxOutputTokens": 800, "temperature": 0.4},
        "tools": [
            {"functionDeclarations": [{"name": "book_hotel", "parameters": {}},
                                      {"name": "find_trains"}]},
            {"function_declarations": [{"name": "weather"}]},
            {"googleSearch": {}},
        ],
        "stream": False,  # not a Gemini field: streaming comes from the method in the path
    }
    req = parse_request(GEMINI_ROUTE, body, path)
    assert req.model == "gemini-2.5-pro"  # from the path
    assert req.streaming is streaming
    assert req.max_tokens == 800
    assert req.tools == ("book_hotel", "find_trains", "weather")


def test_azure_deployment_is_the_model_unless_the_body_names_one() -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    assert parse_request(AZURE_ROUTE, body, "/x").model == "prod-gpt4o"
    assert parse_request(AZURE_ROUTE, {**body, "model": "gpt-4o"}, "/x").model == "gpt-4o"
    assert parse_request(OPENAI_CHAT, {**body, "model": 42}, "/x").model is None


@pytest.mark.parametrize(
    ("extra", "max_tokens", "streaming", "include_usage"),
    [
        ({}, None, False, False),
        ({"max_tokens": 100}, 100, False, False),
        ({"max_tokens": 0}, 0, False, False),
        ({"max_tokens": True}, None, False, False),
        ({"max_tokens": "100"}, None, False, False),
        ({"max_tokens": 1.5}, None, False, False),
        ({"stream": "true"}, None, False, False),
        ({"stream": 1}, None, False, False),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, None, True, False),
        ({"stream": True, "stream_options": None}, None, True, False),
        ({"stream": True, "stream_options": {"include_usage": True}}, None, True, True),
    ],
)
def test_request_field_types_are_strict(extra: dict[str, Any], max_tokens: int | None,
                                        streaming: bool, include_usage: bool) -> None:
    body = {"model": "gpt-4o-mini", "messages": [], **extra}
    req = parse_request(OPENAI_CHAT, body, "/v1/chat/completions")
    assert (req.max_tokens, req.streaming, req.include_usage) == (max_tokens, streaming,
                                                                  include_usage)


@pytest.mark.parametrize("body", [[], "text", 3, None])
def test_non_object_body_is_400(body: Any) -> None:
    with pytest.raises(LlmRequestError) as exc:
        parse_request(OPENAI_CHAT, body, "/v1/chat/completions")
    assert exc.value.status == 400


def test_estimated_input_tokens_simple_message() -> None:
    text = "Summarise the attached incident report in three bullet points."
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}
    req = parse_request(OPENAI_CHAT, body, "/v1/chat/completions")
    # every string of the message (its role too), joined with newlines
    assert req.estimated_input_tokens == count_tokens("user\n" + text, "gpt-4o")
    assert req.estimated_input_tokens > count_tokens(text, "gpt-4o") > 0


def test_estimated_input_uses_the_models_encoding() -> None:
    text = "Ünïcödé and emoji 🚀🚀🚀 in a prompt " * 5
    body = {"messages": [{"role": "user", "content": text}]}
    old = parse_request(OPENAI_CHAT, {**body, "model": "gpt-4"}, "/x").estimated_input_tokens
    new = parse_request(OPENAI_CHAT, {**body, "model": "gpt-4o"}, "/x").estimated_input_tokens
    assert old == count_tokens("user\n" + text, "gpt-4")
    assert new == count_tokens("user\n" + text, "gpt-4o")
    assert old != new


def test_estimated_input_counts_system_prompt_and_tools_not_metadata() -> None:
    base = {"model": "claude-sonnet-4-5", "max_tokens": 100,
            "messages": [{"role": "user", "content": "Hello"}]}
    plain = parse_request(ANTHROPIC, base, "/v1/messages").estimated_input_tokens
    with_meta = parse_request(ANTHROPIC, {**base, "metadata": {"user_id": "x" * 500}},
                              "/v1/messages").estimated_input_tokens
    with_system = parse_request(ANTHROPIC, {**base, "system": "Be brief. " * 50},
                                "/v1/messages").estimated_input_tokens
    with_tools = parse_request(ANTHROPIC, {**base, "tools": [{"name": "t", "description": "d " * 50,
                                                              "input_schema": {}}]},
                               "/v1/messages").estimated_input_tokens
    assert with_meta == plain
    assert with_system > plain + 50
    assert with_tools > plain + 25


B64 = base64.b64encode(bytes(range(256)) * 120).decode()  # ~40 KB of base64


@pytest.mark.parametrize(
    ("route", "part"),
    [
        (OPENAI_CHAT, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{B64}"}}),
        (OPENAI_CHAT, {"type": "file", "file": {"filename": "a.pdf",
                                                "file_data": f"data:application/pdf;base64,{B64}"}}),
        (OPENAI_CHAT, {"type": "input_audio", "input_audio": {"data": B64, "format": "wav"}}),
        (ANTHROPIC, {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                 "data": B64}}),
        (ANTHROPIC, {"type": "document", "source": {"type": "base64",
                                                    "media_type": "application/pdf", "data": B64}}),
    ],
    ids=["openai-image", "openai-file", "openai-audio", "anthropic-image", "anthropic-pdf"],
)
def test_binary_payloads_are_not_counted_as_text(route: LlmRoute, part: dict[str, Any]) -> None:
    body = {"model": "gpt-4o", "max_tokens": 10,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Describe this."},
                                                      part]}]}
    assert parse_request(route, body, "/").estimated_input_tokens < 40


def test_gemini_inline_data_is_not_counted_as_text() -> None:
    body = {"contents": [{"role": "user", "parts": [
        {"text": "What is in this picture?"},
        {"inlineData": {"mimeType": "image/jpeg", "data": B64}},
        {"inline_data": {"mime_type": "image/jpeg", "data": B64}},
    ]}]}
    assert 0 < parse_request(GEMINI_ROUTE, body, "/").estimated_input_tokens < 40


def test_to_cel() -> None:
    body = {"model": "gpt-4o", "stream": True, "max_tokens": 64,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}]}
    req = parse_request(OPENAI_CHAT, body, "/v1/chat/completions")
    assert req.to_cel() == {
        "provider": "openai", "api": "openai", "operation": "chat", "model": "gpt-4o",
        "streaming": True, "max_tokens": 64, "has_max_tokens": True, "tools": ["f"],
        "estimated_input_tokens": req.estimated_input_tokens,
    }
    bare = parse_request(LlmRoute("x", "openai", "chat", None), {"messages": []}, "/").to_cel()
    assert bare == {"provider": "x", "api": "openai", "operation": "chat", "model": "",
                    "streaming": False, "max_tokens": 0, "has_max_tokens": False, "tools": [],
                    "estimated_input_tokens": 0}
