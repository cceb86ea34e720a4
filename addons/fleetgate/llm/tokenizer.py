"""Token counting that works offline.

tiktoken downloads its encodings on first use, which fails in air-gapped clusters. The two
official encodings ship inside this package (``encodings/``, named as tiktoken's cache
expects), and ``TIKTOKEN_CACHE_DIR`` points there before the first ``get_encoding``.

tiktoken and its tables are imported and loaded on the first count, never at import: an
encoding costs ~80 MiB of RSS, spent only when the running policy needs a pre-flight estimate
(:attr:`~fleetgate.policy.model.Policy.needs_input_estimate`) or a provider streams an answer
without reporting its usage.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tiktoken

__all__ = ["count_tokens", "encoding_for_model", "loaded_encodings"]

ENCODINGS_DIR = Path(__file__).resolve().parent / "encodings"

# Model families tokenised with the older cl100k_base; everything else (gpt-4o, o1+, gpt-4.1,
# gpt-5 and non-OpenAI models we only estimate) uses o200k_base.
_CL100K_PREFIXES = ("gpt-4-", "gpt-4", "gpt-3.5", "text-embedding-3", "text-embedding-ada")
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o")


@functools.cache
def _encoding(name: str) -> tiktoken.Encoding:
    # Only set when unset, so an operator's own cache location still wins.
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ENCODINGS_DIR))
    if os.environ["TIKTOKEN_CACHE_DIR"] != str(ENCODINGS_DIR) and not (
        Path(os.environ["TIKTOKEN_CACHE_DIR"]).exists()
    ):
        os.environ["TIKTOKEN_CACHE_DIR"] = str(ENCODINGS_DIR)
    import tiktoken  # here, not at module level: see the module docstring

    return tiktoken.get_encoding(name)


def loaded_encodings() -> int:
    """How many encodings this process has loaded (0 until the first count)."""
    return _encoding.cache_info().currsize


def encoding_for_model(model: str | None) -> str:
    """``cl100k_base`` for GPT-4/3.5-era OpenAI models, ``o200k_base`` for the rest."""
    m = (model or "").lower()
    if m.startswith(_O200K_PREFIXES):
        return "o200k_base"
    if m.startswith(_CL100K_PREFIXES):
        return "cl100k_base"
    return "o200k_base"


def count_tokens(text: str, model: str | None = None) -> int:
    """Number of tokens in ``text`` for ``model``'s encoding (special tokens as text)."""
    if not text:
        return 0
    return len(_encoding(encoding_for_model(model)).encode(text, disallowed_special=()))
