"""What rate limits and budgets see of a flow: the facts both addons hand to the book.

A limit's or budget's ``key`` and ``when`` are CEL over ``jwt``, ``request``, ``llm`` and
``mcp`` (the first MCP message's facts; empty facts for other traffic). Converting the
request for the CEL engine is most of a limit's cost (~70 µs), so it is built only when an
expression will read it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from mitmproxy import ctx, http

from fleetgate.addons.state import claims_of, llm_request_of, mcp_of
from fleetgate.celexpr import Activation, Expr
from fleetgate.mcp.facts import base_facts
from fleetgate.normalize import request_facts
from fleetgate.policy.decide import NOT_LLM

__all__ = ["flow_activation", "limit_activation", "llm_facts", "reserved_tokens"]


class _Keyed(Protocol):
    @property
    def key(self) -> Expr | None: ...

    @property
    def when(self) -> Expr | None: ...


def limit_activation(flow: http.HTTPFlow, rules: Iterable[_Keyed]) -> Activation | None:
    """The CEL variables of the flow, or ``None`` when no rule has a ``key`` or ``when``."""
    if not any(r.key is not None or r.when is not None for r in rules):
        return None
    return flow_activation(flow)


def flow_activation(flow: http.HTTPFlow) -> Activation:
    """``jwt``, ``request`` (with query and headers), ``llm`` and ``mcp`` of the flow: what
    limits, budgets and approval tiers read."""
    req = flow.request
    facts = request_facts(req.method, req.scheme, req.host, req.port, req.path,
                          list(req.headers.items(multi=True)))
    llm = llm_request_of(flow)
    mcp = (mcp_of(flow) or {}).get("facts")
    return Activation({
        "jwt": dict(claims_of(flow)),
        "request": facts.to_cel(frozenset({"query", "headers"})),
        "llm": dict(llm) if llm is not None else dict(NOT_LLM),
        "mcp": mcp if isinstance(mcp, dict) else base_facts("", "", "", None),
    })


def llm_facts(flow: http.HTTPFlow) -> dict[str, Any] | None:
    """The LLM inspector's facts of an LLM call; ``None`` for other traffic."""
    llm = llm_request_of(flow)
    return llm if llm is not None and llm.get("is_llm") else None


def reserved_tokens(llm: dict[str, Any]) -> tuple[int, int]:
    """(estimated input, output reserved): ``max_tokens``, or
    ``fleetgate_limits_default_max_tokens`` when the request sets none."""
    max_out = int(llm.get("max_tokens") or 0) or ctx.options.fleetgate_limits_default_max_tokens
    return int(llm.get("estimated_input_tokens") or 0), max_out
