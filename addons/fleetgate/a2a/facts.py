"""What rules see of an A2A message (``a2a.*`` in CEL) and what the decision log records.

Every field is always present: a request that is not A2A has ``is_a2a == false`` and every
other field empty, so a rule reading ``a2a.target`` never fails on other traffic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fleetgate.a2a.messages import A2aRequest

__all__ = ["CEL_FIELDS", "NOT_A2A", "card_facts", "cel_view", "log_view", "message_facts"]

NOT_A2A: Mapping[str, Any] = {
    "is_a2a": False, "method": "", "rpc_method": "", "target": "", "sender": "",
    "context_id": "", "task_id": "", "message_id": "", "role": "", "parts": [],
    "depth": 0, "counted_depth": 0, "claimed_depth": 0, "streaming": False,
}
CEL_FIELDS = tuple(NOT_A2A)


def message_facts(req: A2aRequest, *, target: str, sender: str, counted: int) -> dict[str, Any]:
    """The facts of one JSON-RPC request; ``counted``: the depth the gateway counted (0 for a
    request that is not a message: it makes no hop)."""
    claimed = req.claimed_depth
    return {
        "is_a2a": True, "method": req.method, "rpc_method": req.rpc_method, "target": target,
        "sender": sender, "context_id": req.context_id, "task_id": req.task_id,
        "message_id": req.message_id, "role": req.role, "parts": list(req.parts),
        "depth": max(counted, claimed or 0), "counted_depth": counted,
        "claimed_depth": claimed or 0, "streaming": req.streaming,
        # not for CEL: the refusal's JSON-RPC id, whether the sender wrote a depth
        "rpc_id": req.rid, "claimed": claimed is not None,
    }


def card_facts(*, target: str, sender: str) -> dict[str, Any]:
    """A GET of the agent's card: ``method == "agent-card"``."""
    return {**NOT_A2A, "is_a2a": True, "method": "agent-card", "target": target,
            "sender": sender, "parts": [], "rpc_id": None, "claimed": False}


def cel_view(facts: Mapping[str, Any] | None) -> dict[str, Any]:
    """``a2a`` for the CEL engine: exactly :data:`CEL_FIELDS`."""
    if facts is None:
        return {**NOT_A2A, "parts": []}
    return {k: facts.get(k, NOT_A2A[k]) for k in CEL_FIELDS}


def log_view(facts: Mapping[str, Any]) -> dict[str, Any]:
    """The decision log's ``a2a`` member."""
    return {"method": facts.get("method"), "rpc_method": facts.get("rpc_method"),
            "from": facts.get("sender"), "to": facts.get("target"),
            "context": facts.get("context_id"), "task": facts.get("task_id"),
            "message": facts.get("message_id"), "depth": facts.get("depth"),
            "counted_depth": facts.get("counted_depth"),
            "claimed_depth": facts.get("claimed_depth") if facts.get("claimed") else None,
            # a refusal's policy status (403, 503...): the wire says 200, as JSON-RPC errors do
            "status": facts.get("status")}
