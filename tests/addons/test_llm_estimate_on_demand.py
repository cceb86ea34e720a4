"""Memory on demand: the tokenizer loads only when the running policy needs a pre-flight
estimate, or when a provider streams an answer without reporting its usage.

The encoding cache of :mod:`fleetgate.llm.tokenizer` is cleared before each test, so
``loaded_encodings()`` says whether this test's calls loaded a table (~80 MiB of RSS each).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chain import basic, request_flow, respond, run_request, running_chain, tok

from fleetgate.addons.state import decision_of, llm_request_of, llm_usage_of
from fleetgate.llm import tokenizer

HEAD = """apiVersion: fleetgate/v1
llm:
  providers:
  - name: openai
    api: openai
    hosts: ["api.openai.com:443"]
  pricing:
    models:
      gpt-4o: {input: 2.50, output: 10.00}
agents:
- name: tester
  match: 'has(jwt.agent_role) && jwt.agent_role == "tester"'
  egress:
    hosts: [api.openai.com]
  authorization:
    rules:
    - allow: 'true'
"""
NO_ESTIMATE = HEAD + """    - deny: 'llm.model == "gpt-3.5-turbo"'
  policies:
    localRateLimit:
    - {maxTokens: 100, tokensPerFill: 100, fillInterval: 1m, type: requests}
"""
BUDGET = HEAD + """  budgets:
  - {id: tester.tokens, per: agent, period: day, tokens: {hard: 100000}}
"""

PROMPT = "Summarise the incident report in three bullet points, please."
USAGE_JSON = json.dumps({
    "id": "c1", "object": "chat.completion", "model": "gpt-4o",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 14, "completion_tokens": 2, "total_tokens": 16}}).encode()
# a stream whose provider reports no usage (not OpenAI's, whose usage chunk the gateway asks
# for; an OpenAI-compatible server that ignores stream_options)
NO_USAGE_SSE = b"".join(
    b"data: " + json.dumps({"id": "c2", "object": "chat.completion.chunk", "model": "gpt-4o",
                            "choices": [{"index": 0, "delta": {"content": piece}}]}).encode()
    + b"\n\n" for piece in ("Three ", "short ", "bullets.")) + b"data: [DONE]\n\n"


@pytest.fixture(autouse=True)
def no_tables_loaded() -> Iterator[None]:
    tokenizer._encoding.cache_clear()
    yield
    tokenizer._encoding.cache_clear()


def chat(stream: bool = False) -> Any:
    f = request_flow(path="/v1/chat/completions", host="api.openai.com", method="POST",
                     auth=basic(tok()))
    f.request.headers["Content-Type"] = "application/json"
    f.request.content = json.dumps({"model": "gpt-4o", "max_tokens": 50, "stream": stream,
                                    "messages": [{"role": "user", "content": PROMPT}]}).encode()
    return f


def test_rules_needing_no_estimate_answer_llm_calls_without_a_tokenizer(tmp_path: Path) -> None:
    with running_chain(tmp_path, NO_ESTIMATE) as (_, addons):
        f = chat()
        run_request(addons, f)
        assert f.response is None  # allowed, forwarded
        decision = decision_of(f)
        assert decision is not None and decision["allow"] is True, decision
        llm = llm_request_of(f)
        assert llm is not None
        assert llm["estimated_input_tokens"] == 0 and llm["input_estimated"] is False
        respond(addons, f, USAGE_JSON, {"content-type": "application/json",
                                        "content-length": str(len(USAGE_JSON))})
        usage = llm_usage_of(f)
        assert usage is not None and usage["tokens"]["input"] == 14  # metered as reported
    assert tokenizer.loaded_encodings() == 0


def test_a_budget_still_reserves_the_estimate(tmp_path: Path) -> None:
    with running_chain(tmp_path, BUDGET) as (_, addons):
        f = chat()
        run_request(addons, f)
        assert f.response is None
        llm = llm_request_of(f)
        assert llm is not None and llm["input_estimated"] is True
        assert llm["estimated_input_tokens"] == tokenizer.count_tokens("user\n" + PROMPT,
                                                                       "gpt-4o") > 0
    assert tokenizer.loaded_encodings() == 1


def test_a_stream_without_usage_is_metered_from_a_tokenizer_loaded_then(tmp_path: Path) -> None:
    with running_chain(tmp_path, NO_ESTIMATE) as (_, addons):
        f = chat(stream=True)
        run_request(addons, f)
        assert f.response is None
        assert tokenizer.loaded_encodings() == 0  # nothing counted before the call
        got = respond(addons, f, NO_USAGE_SSE, {"content-type": "text/event-stream",
                                                 "transfer-encoding": "chunked"})
        assert got == NO_USAGE_SSE
        usage = llm_usage_of(f)
        assert usage is not None and usage["estimated"] is True
        assert usage["tokens"]["output"] == tokenizer.count_tokens("Three short bullets.",
                                                                    "gpt-4o")
        # the input the provider did not report, counted from the request at that moment
        assert usage["tokens"]["input"] == tokenizer.count_tokens("user\n" + PROMPT, "gpt-4o")
    assert tokenizer.loaded_encodings() == 1


STARTED = f"""
import pathlib, sys, tempfile
from chain import running_chain, started
with running_chain(pathlib.Path(tempfile.mkdtemp()), {NO_ESTIMATE!r}) as (_, addons):
    with started(addons):
        pass
print(sorted({{"tiktoken", "httpx"}} & set(sys.modules)))
"""


def test_a_started_gateway_has_imported_no_tokenizer_nor_http_client() -> None:
    # a fresh process: this one's other tests may have imported both. httpx (~4 MiB) serves
    # only the approval webhook and fleetgate_jwks_url: loaded on their first use
    done = subprocess.run([sys.executable, "-c", STARTED], capture_output=True, timeout=60,
                          text=True, cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", "imported at startup: " + done.stdout
