"""Every flow's comment starts with who sent it, once, whichever addons write to it.

mitmweb's flow list (comment column), ``mitmdump -w`` files and ``~comment`` filters read it;
the prefix is what lets an operator select one agent's flows. Also the kill log's cut row for
an LLM stream carries the usage counted so far (the meter records it when the flow is cut).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chain import SECRET, basic, request_flow, respond, run_hook, run_request, running_chain
from mitmproxy import flowfilter
from mitmproxy.test import taddons, tflow

from fleetgate.addons.flowtools import cut_flow, deny
from fleetgate.addons.kill_flows import flow_report
from fleetgate.addons.llm import LlmInspector
from fleetgate.addons.llm_meter import LlmMeter
from fleetgate.addons.rules import PolicyStore
from fleetgate.addons.state import (
    DECISION,
    IDENTITY,
    LLM_REQUEST,
    LLM_USAGE,
    add_comment,
    comment_text,
    identity_label,
    set_comment,
)
from fleetgate.identity.mint import mint_token
from fleetgate.llm.ledger import Ledger
from fleetgate.metrics import GatewayMetrics
from fleetgate.runtime.reservations import ReservationBook
from fleetgate.stores.spend import SqliteSpendStore

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "addons" / "fleetgate"
HELPER = PACKAGE / "addons" / "state.py"

RULES = """apiVersion: fleetgate/v1
llm:
  providers:
  - name: openai
    api: openai
    hosts: [api.openai.com]
authorization:
  rules:
  - deny: 'request.path.contains("delete")'
agents:
- name: research
  match: 'jwt.agent_role == "researcher"'
  egress:
    hosts: [api.example.com, api.openai.com]
  authorization:
    rules:
    - id: research.allow
      allow: 'request.method in ["GET", "POST"]'
"""


def research_token(session: str | None = "s-123") -> str:
    claims: dict[str, Any] = {"agent_role": "researcher"}
    if session:
        claims["session_id"] = session
    return mint_token(SECRET, "research-bot", 600, claims)


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[list[Any]]:
    with running_chain(tmp_path, RULES) as (_, addons):
        yield addons


def with_identity(agent: str = "research-bot", role: str | None = "researcher",
                  session: str | None = "s-123") -> Any:
    f = tflow.tflow(resp=True)
    f.metadata[IDENTITY] = {"agent": agent, "role": role, "session": session, "jti": None}
    return f


# -- the helper ---------------------------------------------------------------------------


def test_prefix_names_agent_role_session_with_dashes_for_missing_parts() -> None:
    assert identity_label(with_identity()) == "research-bot / researcher / s-123"
    assert identity_label(with_identity(role=None, session=None)) == "research-bot / - / -"
    assert identity_label(tflow.tflow()) == ""


def test_several_writers_keep_one_prefix() -> None:
    f = with_identity()
    set_comment(f, "")
    assert f.comment == "research-bot / researcher / s-123"
    set_comment(f, "denied by rule-x: reason")
    set_comment(f, "cut by rule-y: why")  # replaces what follows the prefix
    add_comment(f, "credential openai-key injected")
    add_comment(f, "credential openai-key injected")  # said once
    assert f.comment == ("research-bot / researcher / s-123 \u00b7 cut by rule-y: why; "
                         "credential openai-key injected")
    assert comment_text(f) == "cut by rule-y: why; credential openai-key injected"
    set_comment(f, "")  # cleared (the kill switch's pause released): the prefix stays
    assert f.comment == "research-bot / researcher / s-123" and comment_text(f) == ""


def test_a_flow_without_identity_has_no_prefix() -> None:
    f = tflow.tflow()
    set_comment(f, "denied by identity.missing: no token")
    add_comment(f, "more")
    assert f.comment == "denied by identity.missing: no token; more"


def test_an_operators_own_comment_is_kept_behind_the_prefix() -> None:
    f = with_identity()
    f.comment = "looked at by alice"  # what mitmweb's comment editor does
    add_comment(f, "credential k injected")
    assert f.comment == ("research-bot / researcher / s-123 \u00b7 looked at by alice; "
                         "credential k injected")


def test_mitmweb_filter_selects_one_agents_flows() -> None:
    mine, other, anonymous = with_identity(), with_identity(agent="research-bot-2"), tflow.tflow()
    for f in (mine, other):
        set_comment(f, "openai gpt-4o: 12 in / 30 out tokens, $0.000100")
    set_comment(anonymous, "denied by identity.missing: research-bot / says so")
    match = flowfilter.parse('~comment "^research-bot /"')
    assert match is not None
    assert [bool(match(f)) for f in (mine, other, anonymous)] == [True, False, False]


def test_no_module_writes_or_reads_flow_comment_but_the_helper() -> None:
    """A new ``flow.comment = ...`` would drop (or double) the identity prefix: every write
    goes through set_comment/add_comment, every read through comment_text."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == HELPER:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            attribute = isinstance(node, ast.Attribute) and node.attr == "comment"
            by_name = (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                       and node.func.id in ("setattr", "getattr") and len(node.args) > 1
                       and isinstance(node.args[1], ast.Constant)
                       and node.args[1].value == "comment")
            if attribute or by_name:
                offenders.append(f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}")
    assert not offenders, f"use fleetgate.addons.state.set_comment/add_comment: {offenders}"
    assert "flow.comment = " in HELPER.read_text()  # the guard still scans the real helper


# -- through the chain --------------------------------------------------------------------


def test_an_allowed_flow_says_who_sent_it(chain: list[Any]) -> None:
    f = request_flow(auth=basic(research_token()))
    run_request(chain, f)
    assert f.response is None and f.metadata[DECISION]["allow"] is True
    assert f.comment == "research-bot / researcher / s-123"


def test_a_denied_flow_says_who_then_why(chain: list[Any]) -> None:
    f = request_flow(path="/x/delete", auth=basic(research_token(session=None)))
    run_request(chain, f)
    assert f.response is not None and f.response.status_code == 403
    assert f.comment == ("research-bot / researcher / - \u00b7 denied by "
                         "rules.authorization[0]: " + f.metadata[DECISION]["reason"])


def test_a_tunnel_and_its_requests_carry_the_prefix(chain: list[Any]) -> None:
    connect = request_flow(method="CONNECT", path="", auth=basic(research_token()))
    run_hook(chain, "http_connect", connect)
    inner = request_flow()
    inner.client_conn = connect.client_conn
    run_request(chain, inner)
    assert connect.comment == inner.comment == "research-bot / researcher / s-123"


def test_an_llm_call_says_who_then_its_usage(chain: list[Any]) -> None:
    f = request_flow(path="/v1/chat/completions", host="api.openai.com", method="POST",
                     auth=basic(research_token()))
    f.request.headers["content-type"] = "application/json"
    f.request.content = json.dumps({"model": "gpt-4o", "messages": [
        {"role": "user", "content": "hi"}]}).encode()
    run_request(chain, f)
    assert f.response is None, f.response and f.response.content
    body = json.dumps({"model": "gpt-4o", "usage": {"prompt_tokens": 12,
                                                    "completion_tokens": 30}}).encode()
    respond(chain, f, body, {"content-type": "application/json"})
    assert f.comment.startswith("research-bot / researcher / s-123 \u00b7 openai gpt-4o: "
                                "12 in / 30 out tokens, ")
    assert f.comment.count("research-bot") == 1


def test_a_cut_flow_says_who_then_the_cut(chain: list[Any]) -> None:
    f = request_flow(auth=basic(research_token()))
    run_request(chain, f)
    cut_flow(f, "killswitch.stop", "incident 7")
    assert f.comment == "research-bot / researcher / s-123 \u00b7 cut by killswitch.stop: incident 7"
    deny(f, 503, "killswitch.stop", "again")  # a later writer replaces, never re-prefixes
    assert f.comment.count("research-bot") == 1


# -- the kill log's cut row --------------------------------------------------------------


def test_a_cut_streams_report_carries_its_usage_so_far() -> None:
    """The kill switch takes the cut row from flow_report before the flow's error hook: the
    meter must have recorded the usage by then."""
    metrics = GatewayMetrics()
    store = PolicyStore(metrics)
    meter = LlmMeter(store, metrics, Ledger(), ReservationBook(SqliteSpendStore(None)))
    with taddons.context(store, LlmInspector(store, metrics), meter) as tctx:
        tctx.configure(store, fleetgate_rules=str(REPO / "rules"))
        f = with_identity()
        f.metadata[LLM_REQUEST] = {"is_llm": True, "provider": "openai", "api": "openai",
                                   "operation": "chat", "model": "gpt-4o",
                                   "estimated_input_tokens": 42}
        f.metadata[DECISION] = {"allow": True, "rule": "x", "reason": "allowed"}
        f.response.headers["content-type"] = "text/event-stream"
        meter.responseheaders(f)
        for i in range(20):
            event = {"choices": [{"index": 0, "delta": {"content": f" word{i}"}}]}
            f.response.stream(f"data: {json.dumps(event)}\n\n".encode())
        row = flow_report(f)
        llm = row["llm"]
        assert llm is not None and llm["provider"] == "openai" and llm["model"] == "gpt-4o"
        assert llm["outcome"] == "cut" and llm["estimated"] is True
        assert llm["tokens"]["input"] == 42 and llm["tokens"]["output"] > 0
        assert llm["cost_usd"] > 0
        meter.error(f)  # the error hook that follows records nothing twice
        assert f.metadata[LLM_USAGE] is llm
