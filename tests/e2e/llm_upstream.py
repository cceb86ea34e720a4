"""Fake OpenAI and Anthropic APIs for the e2e upstream: the package's mock provider
(:mod:`fleetgate.mocks.llm_provider`, which the offline demo serves too) mounted on a
:class:`harness.Upstream`.

Install with :func:`install`; the upstream records what each handler saw so tests can assert
on the request the provider would have received (e.g. the injected ``stream_options``).
"""

from __future__ import annotations

from fleetgate.mocks.llm_provider import (
    ANTHROPIC_USAGE,
    OPENAI_USAGE,
    WORDS,
    Control,
    anthropic_messages,
    openai_chat,
)
from fleetgate.mocks.llm_provider import install as _install
from harness import Upstream, upstream_name

__all__ = ["ANTHROPIC_USAGE", "OPENAI_USAGE", "WORDS", "Control", "anthropic_messages", "install",
           "llm_rules_extra", "openai_chat"]


def install(upstream: Upstream) -> Control:
    return _install(upstream)


def llm_rules_extra(port: int) -> str:
    """Top-level rules text declaring the local upstream as OpenAI and Anthropic providers,
    by the name agents use (``Upstream.url``) and by address (``Upstream.ip_url``)."""
    hosts = f'["{upstream_name(port)}:{port}", "127.0.0.1:{port}"]'
    return f"""llm:
  providers:
  - name: openai
    api: openai
    hosts: {hosts}
  - name: anthropic
    api: anthropic
    hosts: {hosts}
"""
