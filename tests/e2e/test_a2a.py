"""A2A end to end: three agents built with the official ``a2a-sdk`` talk through a real mitmdump.

Every hop goes through the gateway with the sending agent's own token (see
:mod:`a2a_agents`). The gateway allows messages, denies who may not message whom (a CEL
rule), drops a loop at the depth *it* counted whatever the messages claim, streams
``SendStreamingMessage`` answers chunk by chunk, and logs every message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from a2a_agents import A2aAgent, answer_text, ask

from harness import Gateway, token

NAMES = ("ceo", "marketing", "cto")
RING = {"ceo": "marketing", "marketing": "cto", "cto": "ceo"}  # marketing never asks the CEO


def rules(path: Path, agents: dict[str, A2aAgent]) -> Path:
    hosts = ", ".join(json.dumps(f"{a.host}:{a.port}") for a in agents.values())
    entries = "\n".join(f"  - {{name: {a.name}, url: {json.dumps(a.url)}}}"
                        for a in agents.values())
    path.write_text(f"""apiVersion: fleetgate/v1
destinations:
  allowPrivate: ["127.0.0.1/32"]
a2a:
  maxDepth: 5
  agents:
{entries}
authorization:
  rules:
  - id: a2a.marketing-not-ceo
    deny: 'a2a.sender == "marketing" && a2a.target == "ceo" && a2a.method.startsWith("message/")'
    reason: marketing reports to its department head, not to the CEO
agents:
- name: fleet
  match: 'jwt.agent_role in ["agent", "user"]'
  egress:
    hosts: [{hosts}]
  authorization:
    rules:
    - allow: 'true'
""")
    return path


@pytest.fixture(scope="module")
def agents(upstream_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[dict[str, A2aAgent]]:
    workdir = tmp_path_factory.mktemp("a2a-agents")
    started = {n: A2aAgent(upstream_ca, n, workdir) for n in NAMES}
    for a in started.values():
        a.next = RING[a.name]
        a.peers = started
    yield started
    for a in started.values():
        a.stop()


@pytest.fixture(scope="module")
def gateway(agents: dict[str, A2aAgent], tmp_path_factory: pytest.TempPathFactory,
            confdir: Path, upstream_ca_file: Path) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("a2a-gateway")
    gw = Gateway(rules=rules(workdir / "rules.yaml", agents), workdir=workdir, confdir=confdir,
                 upstream_ca=upstream_ca_file).start()
    for a in agents.values():
        a.gateway = gw
    yield gw
    gw.stop()


@pytest.fixture(autouse=True)
def fresh(agents: dict[str, A2aAgent]) -> None:
    for a in agents.values():
        a.received.clear()
        a.new_context, a.claim = False, None


def user_ask(gw: Gateway, agent: A2aAgent, text: str, sub: str = "user-1", **kw: Any) -> list[Any]:
    return asyncio.run(ask(agent.url.removesuffix("/a2a"), text,
                           proxy=gw.proxy_url(token(sub=sub, role="user")), ca=gw.ca_cert, **kw))


def a2a_records(gw: Gateway, **match: Any) -> list[dict[str, Any]]:
    return [d for d in gw.decisions() if isinstance(d.get("a2a"), dict)
            and all(d["a2a"].get(k) == v for k, v in match.items())]


def test_allowed_message_hops_and_is_logged_with_the_counted_depth(
        gateway: Gateway, agents: dict[str, A2aAgent]) -> None:
    events = user_ask(gateway, agents["ceo"], "ask cto echo status report")
    assert answer_text(events) == "ceo < cto: echo status report"
    assert agents["cto"].received == ["echo status report"]
    first = gateway.wait_for_decision(lambda d: (d.get("a2a") or {}).get("to") == "ceo"
                                      and d["a2a"]["from"] == "user-1"
                                      and d["a2a"]["method"] == "message/send")
    hop = gateway.wait_for_decision(lambda d: (d.get("a2a") or {}).get("from") == "ceo"
                                    and d["a2a"]["to"] == "cto"
                                    and d["a2a"]["method"] == "message/send")
    assert first["result"] == hop["result"] == "allow"
    assert first["a2a"]["rpc_method"] == "SendMessage" and first["a2a"]["depth"] == 1
    # the CEO sent while it handled the user's message: one hop deeper, counted, not claimed
    assert hop["a2a"]["depth"] == hop["a2a"]["counted_depth"] == 2
    assert hop["a2a"]["claimed_depth"] is None
    # the user opened no context (the CEO's server made one, and the CEO kept it onward)
    assert first["a2a"]["context"] == "" and hop["a2a"]["context"] != ""
    assert a2a_records(gateway, method="agent-card", to="cto", **{"from": "ceo"})


def test_cel_rule_denies_marketing_messaging_the_ceo_as_a_jsonrpc_error(
        gateway: Gateway, agents: dict[str, A2aAgent]) -> None:
    with pytest.raises(Exception, match=r"JSON-RPC Error -32050: .*a2a\.marketing-not-ceo"
                                        r".*department head") as exc:
        asyncio.run(ask(agents["ceo"].url.removesuffix("/a2a"), "echo buy ads?",
                        proxy=gateway.proxy_url(token(sub="marketing", role="agent")),
                        ca=gateway.ca_cert))
    assert "decision" in str(exc.value) or "fleetgate" in str(exc.value)
    assert agents["ceo"].received == []  # never reached the CEO
    # relayed by the marketing agent itself: it sees the same refusal from its own SDK
    events = user_ask(gateway, agents["marketing"], "ask ceo echo campaign ready")
    assert answer_text(events).startswith("marketing < refused: JSON-RPC Error -32050")
    assert agents["ceo"].received == []
    denied = gateway.wait_for_decision(lambda d: d["rule"] == "a2a.marketing-not-ceo")
    assert denied["result"] == "deny" and denied["a2a"]["from"] == "marketing"
    assert denied["a2a"]["to"] == "ceo" and denied["a2a"]["method"] == "message/send"
    # another agent may message the CEO
    assert answer_text(user_ask(gateway, agents["cto"], "ask ceo echo ship it")) == \
        "cto < ceo: echo ship it"


@pytest.mark.parametrize(("claim", "new_context"), [(None, False), (0, False), (0, True),
                                                    (None, True)],
                         ids=["no-field", "claims-0", "claims-0-new-context", "new-context"])
def test_loop_is_dropped_at_the_depth_the_gateway_counted(
        gateway: Gateway, agents: dict[str, A2aAgent], claim: int | None,
        new_context: bool) -> None:
    for a in agents.values():
        a.claim, a.new_context = claim, new_context
    answer = answer_text(user_ask(gateway, agents["ceo"], "loop"))
    # user>ceo 1, ceo>marketing 2, marketing>cto 3, cto>ceo 4, ceo>marketing 5: marketing>cto 6
    assert answer.startswith("ceo > marketing > cto > ceo > marketing > refused: "), answer
    assert "a2a.depth" in answer and "hop depth 6" in answer
    assert len(agents["cto"].received) == 1 and len(agents["marketing"].received) == 2
    dropped = gateway.wait_for_decision(
        lambda d: d["rule"] == "a2a.depth" and d["a2a"]["from"] == "marketing"
        and d.get("ts", 0) > 0 and d["a2a"]["depth"] == 6
        and (d["a2a"]["claimed_depth"] == claim))
    assert dropped["a2a"]["counted_depth"] == 6 and dropped["a2a"]["to"] == "cto"
    assert dropped["result"] == "deny" and dropped["a2a"]["status"] == 403


def test_a_claimed_depth_only_makes_it_stricter(gateway: Gateway,
                                                agents: dict[str, A2aAgent]) -> None:
    with pytest.raises(Exception, match=r"a2a\.depth.*claims 6"):
        user_ask(gateway, agents["cto"], "echo deep", claim=6)
    assert agents["cto"].received == []
    assert answer_text(user_ask(gateway, agents["cto"], "echo shallow", claim=3)) == \
        "cto: echo shallow"


def test_streaming_answers_pass_chunk_by_chunk(gateway: Gateway,
                                               agents: dict[str, A2aAgent]) -> None:
    events = user_ask(gateway, agents["cto"], "stream 4", streaming=True)
    kinds = [e.WhichOneof("payload") for _, e in events]
    assert kinds[0] == "task" and kinds.count("status_update") >= 4, kinds
    # the server takes 1.6 s: had the gateway buffered, every event would arrive at once
    assert events[-1][0] - events[0][0] > 1.0
    rec = gateway.wait_for_decision(lambda d: (d.get("a2a") or {}).get("method") == "message/stream")
    assert rec["result"] == "allow" and rec["a2a"]["rpc_method"] == "SendStreamingMessage"
    assert rec["a2a"]["to"] == "cto" and rec["a2a"]["depth"] == 1


def test_every_inter_agent_message_is_in_the_decision_log(gateway: Gateway,
                                                          agents: dict[str, A2aAgent]) -> None:
    user_ask(gateway, agents["cto"], "ask ceo ask marketing echo hello")
    assert agents["marketing"].received == ["echo hello"]
    chain = [(d["a2a"]["from"], d["a2a"]["to"], d["a2a"]["depth"])
             for d in a2a_records(gateway, method="message/send")]
    for hop in [("user-1", "cto", 1), ("cto", "ceo", 2), ("ceo", "marketing", 3)]:
        assert hop in chain
