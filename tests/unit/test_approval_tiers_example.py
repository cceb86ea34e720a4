"""The example fleet's approval tiers (rules/approvals.yaml): seed 004's table, as decided.

Each case is an action an agent of the fleet takes, built with the gateway's own fact
builders (request, MCP, A2A), and the tier that must hold it (``None``: immediate because
no tier matches). The first matching tier wins, so these also pin the file's order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleetgate.a2a.facts import cel_view
from fleetgate.approvals.model import select_tier
from fleetgate.celexpr import Activation
from fleetgate.mcp.facts import base_facts, mcp_facts
from fleetgate.mcp.messages import parse_messages
from fleetgate.normalize import request_facts
from fleetgate.policy.decide import NOT_LLM
from fleetgate.policy.loader import load_policy

RULES = Path(__file__).resolve().parents[2] / "rules"
POLICY = load_policy(RULES)
JWT = {"sub": "cloud-1", "agent_role": "cloud"}


def activation(method: str, url: str, mcp: dict[str, Any] | None = None,
               a2a: dict[str, Any] | None = None) -> Activation:
    scheme, _, rest = url.partition("://")
    host, _, path = rest.partition("/")
    facts = request_facts(method, scheme, host, 443, "/" + path, [])
    return Activation({"jwt": JWT, "request": facts.to_cel(frozenset({"query", "headers"})),
                       "llm": dict(NOT_LLM), "mcp": mcp or base_facts("", "", "", None),
                       "a2a": cel_view(a2a)})


def tool(name: str, **arguments: Any) -> list[dict[str, Any]]:
    messages, _ = parse_messages({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                  "params": {"name": name, "arguments": arguments}})
    return [mcp_facts(m, "mcp-cloud.tools.example.com", "/mcp", "s-1", "cloud-tools")
            for m in messages]


def tier_of(method: str, url: str, mcp: list[dict[str, Any]] = (), **kw: Any) -> str | None:
    tier, _ = select_tier(POLICY.approvals, activation(method, url, **kw), list(mcp))
    return tier.id if tier is not None else None


MCP_URL = "https://mcp-cloud.tools.example.com/mcp"


@pytest.mark.parametrize(("what", "method", "url", "mcp", "expect"), [
    ("HTTP read", "GET", "https://api.github.com/repos/x/y", [], "read-only"),
    ("kubectl get", "POST", MCP_URL, tool("kubectl", command="get pods", namespace="web"),
     "read-only"),
    ("terraform plan", "POST", MCP_URL, tool("terraform_plan", dir="infra/"), "read-only"),
    ("nmap scan", "POST", MCP_URL, tool("nmap_scan", target="10.0.0.0/28"), "read-only"),
    ("message to another agent (tool)", "POST", MCP_URL,
     tool("send_message_to_agent", to="ceo"), "internal-comms"),
    ("an email", "POST", MCP_URL, tool("send_email", to="press@example.com"), "external-comms"),
    ("a social post", "POST", MCP_URL, tool("schedule_social_post", text="hi"), "external-comms"),
    ("a Stripe charge", "POST", "https://api.stripe.com/v1/charges", [], "financial"),
    ("a Stripe read", "GET", "https://api.stripe.com/v1/charges", [], "read-only"),
    ("a refund tool", "POST", MCP_URL, tool("refund_order", order="o-1"), "financial"),
    ("terraform apply", "POST", MCP_URL, tool("terraform_apply", dir="infra/"), "infrastructure"),
    ("kubectl delete", "POST", MCP_URL, tool("kubectl", command="delete pod web-1"),
     "infrastructure"),
    ("kubectl with no command argument", "POST", MCP_URL, tool("kubectl"), "infrastructure"),
    ("a write to the cluster API", "PATCH",
     "https://kubernetes.example.com/apis/apps/v1/namespaces/web/deployments/web", [],
     "infrastructure"),
    ("an LLM call", "POST", "https://api.anthropic.com/v1/messages", [], None),
])
def test_each_action_lands_in_the_seed_tier(what: str, method: str, url: str,
                                            mcp: list[dict[str, Any]], expect: str | None) -> None:
    assert tier_of(method, url, mcp) == expect, what


def test_agent_to_agent_messages_are_internal_communications() -> None:
    a2a = {"is_a2a": True, "method": "message/send", "rpc_method": "SendMessage",
           "target": "cto", "sender": "ceo", "parts": ["text"]}
    assert tier_of("POST", "https://cto.agents.example.com/a2a", a2a=a2a) == "internal-comms"


def test_a_batch_is_held_when_one_of_its_calls_needs_people() -> None:
    batch = tool("kubectl", command="get pods") + tool("terraform_apply", dir="infra/")
    assert tier_of("POST", MCP_URL, batch) == "infrastructure"
    assert tier_of("POST", MCP_URL, list(reversed(batch))) == "infrastructure"
    assert tier_of("POST", MCP_URL, tool("kubectl", command="get pods") * 2) == "read-only"


def test_the_two_person_tier_names_its_people() -> None:
    infra = next(t for t in POLICY.approvals if t.id == "infrastructure")
    assert (infra.approvers, infra.approved_by, infra.secondary, infra.escalate_to,
            infra.window) == (2, ("group:oncall",), ("group:security",), ("group:leads",),
                              48 * 3600.0)
