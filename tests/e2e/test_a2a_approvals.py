"""Approvals apply to A2A messages as to any call, end to end through a real mitmdump.

The three ``a2a-sdk`` agents of :mod:`test_a2a` (its fixtures and helpers, reused); a tier
holds every ``message/send`` to the CEO for one second. The sender is answered (not
forwarded) with a JSON-RPC error its SDK raises, carrying the approval id; an operator
approves through the admin API; the sender's retry (the SDK gives it a new ``messageId``)
joins the same approval and is delivered once. The agents count what they received.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_a2a
from a2a_agents import A2aAgent, answer_text
from test_a2a import rules as a2a_rules
from test_a2a import user_ask

from harness import Gateway, wait_until

pytestmark = pytest.mark.e2e

TIER = """
approvals:
- id: ceo-inbox
  when: 'a2a.is_a2a && a2a.method == "message/send" && a2a.target == "ceo"'
  approvers: 1
  approvedBy: [group:oncall]
  hold: 1s
  reason: messages to the CEO need a human
"""
OPERATOR = "alice"
APPROVAL_ID = re.compile(r"apr_[0-9a-f]{16}")

# test_a2a's fixtures as they are: this module's own three agents, emptied before each test
agents = test_a2a.agents
fresh = test_a2a.fresh


def op_token(name: str) -> str:
    return f"{name}-personal-token-0123456789"


@pytest.fixture(scope="module")
def gateway(agents: dict[str, A2aAgent], tmp_path_factory: pytest.TempPathFactory,
            confdir: Path, upstream_ca_file: Path) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("a2a-approvals-gateway")
    path = a2a_rules(workdir / "rules.yaml", agents)
    path.write_text(path.read_text() + TIER)
    users = workdir / "operators.yaml"
    users.write_text(json.dumps({"operators": [
        {"name": OPERATOR, "groups": ["oncall"],
         "tokenSha256": hashlib.sha256(op_token(OPERATOR).encode()).hexdigest()}]}))
    gw = Gateway(rules=path, workdir=workdir, confdir=confdir, upstream_ca=upstream_ca_file,
                 options={"fleetgate_admin_users_file": str(users)}).start()
    for a in agents.values():
        a.gateway = gw
    yield gw
    gw.stop()


def held(gw: Gateway, agent: A2aAgent, text: str, sub: str = "user-1") -> str:
    """Send ``text`` to ``agent`` and expect it held: the approval id the SDK's error names."""
    with pytest.raises(Exception, match=r"JSON-RPC Error -32040: fleetgate \(approvals\.pending\)"
                                        r".*needs human approval \(tier ceo-inbox") as exc:
        user_ask(gw, agent, text, sub=sub)
    found = APPROVAL_ID.search(str(exc.value))
    assert found, str(exc.value)
    return found.group(0)


def pending(gw: Gateway) -> list[dict[str, Any]]:
    return list(gw.admin("/v1/approvals?status=pending").json()["approvals"])


def test_a_message_to_the_ceo_waits_for_approval_and_its_retry_is_delivered_once(
        gateway: Gateway, agents: dict[str, A2aAgent]) -> None:
    ceo = agents["ceo"]
    approval_id = held(gateway, ceo, "echo quarterly numbers")
    assert ceo.received == []  # answered by the gateway, never forwarded
    [queued] = [a for a in pending(gateway) if a["id"] == approval_id]
    assert queued["tier"] == "ceo-inbox" and queued["agent"] == "user-1"
    assert queued["action"]["kind"] == "a2a" and queued["action"]["to"] == "ceo"
    assert queued["action"]["a2a_method"] == "message/send"
    refused = gateway.wait_for_decision(lambda d: d.get("rule") == "approvals.pending"
                                        and (d.get("approval") or {}).get("id") == approval_id)
    assert refused["a2a"]["to"] == "ceo" and refused["a2a"]["from"] == "user-1"

    # asked again before anyone decided (a new messageId from the SDK): the same approval
    assert held(gateway, ceo, "echo quarterly numbers") == approval_id
    assert [a["id"] for a in pending(gateway)].count(approval_id) == 1
    assert ceo.received == []

    approved = gateway.admin("/v1/approvals/approve", {"id": approval_id},
                             token=op_token(OPERATOR))
    assert approved.status_code == 200 and approved.json()["status"] == "approved", approved.text

    # the retry passes, exactly once
    answer = answer_text(user_ask(gateway, ceo, "echo quarterly numbers"))
    assert answer == "ceo: echo quarterly numbers"
    assert ceo.received == ["echo quarterly numbers"]
    record = gateway.admin(f"/v1/approvals/{approval_id}").json()
    assert record["status"] == "consumed" and [v["by"] for v in record["votes"]] == [OPERATOR]
    # the forwarded message's decision line has both its A2A facts and its approval
    sent = gateway.wait_for_decision(lambda d: (d.get("approval") or {}).get("id") == approval_id
                                     and d.get("result") == "allow")
    assert sent["a2a"]["method"] == "message/send" and sent["a2a"]["to"] == "ceo"
    assert sent["a2a"]["from"] == "user-1"
    assert sent["approval"]["status"] == "approved" and sent["approval"]["by"] == [OPERATOR]
    assert sent["approval"]["tier"] == "ceo-inbox"

    # the approval is used: the same message again needs a new one
    again = held(gateway, ceo, "echo quarterly numbers")
    assert again != approval_id
    assert ceo.received == ["echo quarterly numbers"]


def test_an_agent_hop_to_the_ceo_is_held_too(gateway: Gateway,
                                             agents: dict[str, A2aAgent]) -> None:
    answer = answer_text(user_ask(gateway, agents["cto"], "ask ceo echo ship it"))
    # the CTO's own SDK raised the gateway's answer; the CEO never got the message
    assert answer.startswith("cto < refused: JSON-RPC Error -32040: fleetgate "
                             "(approvals.pending)"), answer
    assert agents["cto"].received == ["ask ceo echo ship it"]
    assert agents["ceo"].received == []
    found = APPROVAL_ID.search(answer)
    assert found
    [queued] = [a for a in pending(gateway) if a["id"] == found.group(0)]
    assert queued["agent"] == "cto" and queued["action"]["to"] == "ceo"


def test_a_message_to_an_agent_in_no_tier_passes_untouched(
        gateway: Gateway, agents: dict[str, A2aAgent]) -> None:
    before = {a["id"] for a in pending(gateway)}
    logged = len(gateway.decisions())
    answer = answer_text(user_ask(gateway, agents["cto"], "echo nothing to approve"))
    assert answer == "cto: echo nothing to approve"
    assert agents["cto"].received == ["echo nothing to approve"]
    assert {a["id"] for a in pending(gateway)} == before  # nothing queued
    found: list[dict[str, Any]] = []

    def logged_now() -> bool:
        found[:] = [d for d in gateway.decisions()[logged:]
                    if (d.get("a2a") or {}).get("method") == "message/send"]
        return bool(found)
    assert wait_until(logged_now), gateway.decisions()[logged:]
    [rec] = found
    assert rec["a2a"]["to"] == "cto" and rec["a2a"]["from"] == "user-1"
    assert rec["result"] == "allow" and rec["status"] == 200 and "approval" not in rec
