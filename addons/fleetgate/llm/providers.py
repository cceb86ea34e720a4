"""Which requests are LLM calls: providers recognised by host and path.

The built-in table covers OpenAI, Anthropic, xAI, Google Gemini and Azure OpenAI; operators
add their own (an OpenAI-compatible gateway, vLLM, Ollama...) in the rules' ``llm.providers``.
A route says which wire format (``api``) the traffic speaks, so parsing is per format, not
per vendor. A request that matches no route is not an LLM call and passes through the normal
HTTP rules untouched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fleetgate.netaddr import HostPattern

__all__ = ["BUILTIN_PROVIDERS", "LlmRoute", "Provider", "ProviderTable", "provider_from_dict"]

APIS = ("openai", "anthropic", "gemini")

# (path regex, operation). Regexes match the normalised path; a named group "model" takes
# the model from the path (Gemini, Azure deployments).
_OPENAI_PATHS = (
    (r"/v1/chat/completions", "chat"),
    (r"/v1/responses", "responses"),
    (r"/v1/embeddings", "embeddings"),
    (r"/v1/completions", "text_completion"),
)
_AZURE_PATHS = (
    (r"/openai/deployments/(?P<model>[^/]+)/chat/completions", "chat"),
    (r"/openai/deployments/(?P<model>[^/]+)/completions", "text_completion"),
    (r"/openai/deployments/(?P<model>[^/]+)/embeddings", "embeddings"),
    (r"/openai/(?:v1/)?responses", "responses"),
    (r"/openai/v1/chat/completions", "chat"),
)
_ANTHROPIC_PATHS = (
    (r"/v1/messages", "chat"),
    (r"/v1/messages/count_tokens", "count_tokens"),
)
_GEMINI_PATHS = (
    (r"/v1(?:beta|alpha)?/models/(?P<model>[^/:]+):generateContent", "generate_content"),
    (r"/v1(?:beta|alpha)?/models/(?P<model>[^/:]+):streamGenerateContent", "generate_content"),
    (r"/v1(?:beta|alpha)?/models/(?P<model>[^/:]+):countTokens", "count_tokens"),
)


@dataclass(frozen=True)
class Provider:
    """One LLM provider: its name (``gen_ai.provider.name``), hosts, wire format, paths."""

    name: str
    api: str
    hosts: tuple[HostPattern, ...]
    paths: tuple[tuple[re.Pattern[str], str], ...]


@dataclass(frozen=True)
class LlmRoute:
    """What a request is, when it is an LLM call."""

    provider: str
    api: str
    operation: str
    path_model: str | None

    @property
    def billable(self) -> bool:
        return self.operation != "count_tokens"


def _compile_paths(paths: Iterable[tuple[str, str]], prefix: str = "") -> tuple[
        tuple[re.Pattern[str], str], ...]:
    return tuple((re.compile(re.escape(prefix.rstrip("/")) + p + r"/?"), op) for p, op in paths)


def _provider(name: str, api: str, hosts: Iterable[str], paths: Iterable[tuple[str, str]],
              prefix: str = "") -> Provider:
    return Provider(name, api, tuple(HostPattern(h) for h in hosts),
                    _compile_paths(paths, prefix))


_DEFAULT_PATHS = {"openai": _OPENAI_PATHS, "anthropic": _ANTHROPIC_PATHS, "gemini": _GEMINI_PATHS}

BUILTIN_PROVIDERS: tuple[Provider, ...] = (
    _provider("openai", "openai", ["api.openai.com"], _OPENAI_PATHS),
    _provider("anthropic", "anthropic", ["api.anthropic.com"], _ANTHROPIC_PATHS),
    _provider("xai", "openai", ["api.x.ai"], _OPENAI_PATHS),
    _provider("gcp.gemini", "gemini", ["generativelanguage.googleapis.com"], _GEMINI_PATHS),
    _provider("azure.ai.openai", "openai", ["*.openai.azure.com", "*.cognitiveservices.azure.com"],
              _AZURE_PATHS),
)


def provider_from_dict(entry: Mapping[str, Any]) -> Provider:
    """Build an operator-defined provider; raises ``ValueError`` saying what is wrong.

    ``{name, api: openai|anthropic|gemini, hosts: [...], pathPrefix: "/proxy"}`` — paths are
    the ``api``'s standard ones under ``pathPrefix`` (e.g. ``/v1/chat/completions``).
    """
    name, api, hosts = entry.get("name"), entry.get("api"), entry.get("hosts")
    if not isinstance(name, str) or not name:
        raise ValueError("a provider needs a 'name'")
    if api not in APIS:
        raise ValueError(f"provider {name!r}: 'api' must be one of {', '.join(APIS)}")
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
        raise ValueError(f"provider {name!r}: 'hosts' must be a non-empty list of host patterns")
    prefix = entry.get("pathPrefix", "")
    if not isinstance(prefix, str) or (prefix and not prefix.startswith("/")):
        raise ValueError(f"provider {name!r}: 'pathPrefix' must start with '/'")
    return _provider(name, str(api), hosts, _DEFAULT_PATHS[str(api)], prefix)


class ProviderTable:
    """Operator providers first (so they can claim a host), then the built-ins."""

    def __init__(self, extra: Iterable[Provider] = ()) -> None:
        self.providers = (*tuple(extra), *BUILTIN_PROVIDERS)

    def route(self, host: str, port: int, path: str) -> LlmRoute | None:
        """``host`` and ``path`` must be normalised (see ``fleetgate.normalize``)."""
        for p in self.providers:
            if not any(h.matches(host, port) for h in p.hosts):
                continue
            for rx, op in p.paths:
                m = rx.fullmatch(path)
                if m:
                    model = m.groupdict().get("model")
                    return LlmRoute(p.name, p.api, op, model)
        return None
