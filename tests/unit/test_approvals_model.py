"""The approval queue's pure logic: the Approval state machine and who may move it, the
operators file, and what an action is (its digest and the summary people read)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from fleetgate.approvals.action import EXCERPT_BYTES, action_digest, action_summary, canonical_body
from fleetgate.approvals.model import Approval, ApprovalConflict, NotAllowed, Status, Vote
from fleetgate.approvals.operators import Operator, OperatorsError, parse_operators, token_sha256

ALICE = Operator("alice", frozenset({"oncall"}))
BOB = Operator("bob", frozenset({"oncall"}))
SEC = Operator("sam", frozenset({"security"}))
LEAD = Operator("lee", frozenset({"leads"}))
MALLORY = Operator("mallory", frozenset({"sales"}))


def pending(**kw: Any) -> Approval:
    base = Approval(id="apr_1", tier="infra", digest="d" * 64, created=100.0, deadline=200.0,
                    window=100.0, needed=1, agent="coder", action={"kind": "mcp", "tool": "kubectl"},
                    approved_by=("group:oncall",), escalate_to=("group:leads",),
                    decision_id="dec_1")
    return replace(base, **kw)


# -- the state machine ----------------------------------------------------------------


def test_one_approval_of_a_one_person_tier_approves() -> None:
    a = pending().approve(ALICE, 150.0, "looks fine")
    assert a.status is Status.APPROVED and a.decided_at == 150.0
    assert a.votes == (Vote("alice", 150.0, "looks fine"),)
    assert a.open


def test_two_person_tier_needs_two_distinct_people() -> None:
    a = pending(needed=2).approve(ALICE, 110.0)
    assert a.status is Status.PENDING and a.decided_at is None and len(a.votes) == 1
    with pytest.raises(ApprovalConflict, match=r"alice already approved apr_1.*needs 2 distinct"):
        a.approve(ALICE, 120.0)
    b = a.approve(BOB, 130.0)
    assert b.status is Status.APPROVED and [v.by for v in b.votes] == ["alice", "bob"]
    assert b.decided_at == 130.0


def test_the_second_approval_must_come_from_secondary() -> None:
    a = pending(needed=2, secondary=("group:security",)).approve(ALICE, 110.0)
    with pytest.raises(NotAllowed, match="bob may not give the secondary review"):
        a.approve(BOB, 120.0)  # in approvedBy, but not the secondary reviewer
    b = a.approve(SEC, 130.0)
    assert b.status is Status.APPROVED and [v.by for v in b.votes] == ["alice", "sam"]


def test_the_first_of_two_approvals_comes_from_approved_by_not_secondary() -> None:
    a = pending(needed=2, secondary=("group:security",))
    with pytest.raises(NotAllowed, match="sam may not approve"):
        a.approve(SEC, 110.0)


def test_someone_not_in_approved_by_may_neither_approve_nor_deny() -> None:
    a = pending()
    assert not a.may_decide(MALLORY)
    with pytest.raises(NotAllowed, match="mallory may not approve apr_1"):
        a.approve(MALLORY, 110.0)
    with pytest.raises(NotAllowed, match="mallory may not deny apr_1"):
        a.deny(MALLORY, 110.0, "no")


def test_a_tier_naming_no_one_lets_any_operator_decide() -> None:
    a = pending(approved_by=())
    assert a.may_decide(MALLORY)
    assert a.approve(MALLORY, 110.0).status is Status.APPROVED


def test_escalate_to_may_decide_only_after_escalation() -> None:
    a = pending()
    assert not a.may_decide(LEAD)
    with pytest.raises(NotAllowed):
        a.approve(LEAD, 150.0)
    up = a.escalate(200.0)
    assert up.may_decide(LEAD)
    assert up.approve(LEAD, 210.0).status is Status.APPROVED
    assert up.deny(LEAD, 210.0, "not now").denied_by == "lee"


def test_escalate_to_may_give_the_secondary_review_after_escalation() -> None:
    a = pending(needed=2, secondary=("group:security",)).approve(ALICE, 110.0)
    with pytest.raises(NotAllowed):
        a.approve(LEAD, 150.0)
    assert a.escalate(200.0).approve(LEAD, 210.0).status is Status.APPROVED


def test_secondary_may_deny() -> None:
    a = pending(needed=2, secondary=("group:security",))
    d = a.deny(SEC, 120.0, "too risky")
    assert d.status is Status.DENIED and d.denied_by == "sam" and d.denial_reason == "too risky"


def test_deny_is_final() -> None:
    d = pending().deny(ALICE, 120.0, "")
    assert d.status is Status.DENIED and d.decided_at == 120.0
    assert d.denial_reason == "no reason given"
    assert not d.open
    with pytest.raises(ApprovalConflict, match=r"is denied \(denied by alice: no reason given\); "
                                               "nothing to approve"):
        d.approve(BOB, 130.0)
    with pytest.raises(ApprovalConflict, match="cannot be denied now"):
        d.deny(BOB, 130.0, "again")
    with pytest.raises(ApprovalConflict, match="not approved"):
        d.consume(130.0, "dec_2")


def test_an_approved_but_unconsumed_action_can_still_be_denied() -> None:
    a = pending().approve(ALICE, 110.0)
    d = a.deny(BOB, 120.0, "changed my mind")
    assert d.status is Status.DENIED and d.denied_by == "bob"
    with pytest.raises(ApprovalConflict):
        d.consume(130.0, "dec_2")


def test_approving_an_approved_action_again_is_refused() -> None:
    a = pending().approve(ALICE, 110.0)
    with pytest.raises(ApprovalConflict, match=r"is approved \(approved by alice\)"):
        a.approve(BOB, 120.0)


def test_consume_only_an_approved_action_and_only_once() -> None:
    with pytest.raises(ApprovalConflict, match="apr_1 is pending, not approved"):
        pending().consume(110.0, "dec_2")
    a = pending().approve(ALICE, 110.0)
    c = a.consume(120.0, "dec_2")
    assert c.status is Status.CONSUMED and c.consumed_at == 120.0
    assert c.consumed_by_decision == "dec_2" and not c.open
    with pytest.raises(ApprovalConflict, match="is consumed, not approved"):
        c.consume(130.0, "dec_3")
    with pytest.raises(ApprovalConflict, match="cannot be denied now"):
        c.deny(ALICE, 130.0, "late")
    with pytest.raises(ApprovalConflict, match="nothing to approve"):
        c.approve(BOB, 130.0)


def test_escalate_only_when_pending_and_due() -> None:
    a = pending()
    with pytest.raises(ApprovalConflict, match="not due"):
        a.escalate(199.9)
    up = a.escalate(200.0)  # the deadline itself is due
    assert up.escalations == 1 and up.deadline == 300.0 and up.status is Status.PENDING
    with pytest.raises(ApprovalConflict, match="not due"):
        up.escalate(250.0)  # once per window
    assert up.escalate(300.0).escalations == 2
    with pytest.raises(ApprovalConflict, match="not due"):
        a.approve(ALICE, 150.0).escalate(500.0)
    with pytest.raises(ApprovalConflict, match="not due"):
        a.deny(ALICE, 150.0, "x").escalate(500.0)


def test_round_trips_through_json() -> None:
    a = (pending(needed=2, secondary=("group:security",), identity={"role": "coder"},
                 reason="infra changes")
         .approve(ALICE, 110.0, "ok").escalate(200.0).approve(LEAD, 210.0)
         .consume(220.0, "dec_9").with_outcome({"status": 200}))
    back = Approval.from_dict(json.loads(json.dumps(a.as_dict())))
    assert back == a
    d = pending().deny(ALICE, 120.0, "no")
    assert Approval.from_dict(json.loads(json.dumps(d.as_dict()))) == d
    assert a.as_dict()["status"] == "consumed" and a.as_dict()["votes"][1]["by"] == "lee"


# -- operators ------------------------------------------------------------------------

HASH = token_sha256("alice-token")


def test_operators_authenticate_by_token() -> None:
    table = parse_operators(f"""
operators:
  - name: alice
    groups: [oncall, finance]
    tokenSha256: {HASH.upper()}
  - name: bob
    tokenSha256: {token_sha256("bob-token")}
""")
    assert len(table) == 2
    alice = table.authenticate("alice-token")
    assert alice == Operator("alice", frozenset({"oncall", "finance"}))
    assert table.authenticate("bob-token") == Operator("bob", frozenset())
    assert table.authenticate("nobody") is None
    assert table.authenticate(HASH) is None  # the hash is not the token
    assert table.named("bob") is not None and table.named("carol") is None


def test_operators_file_may_be_empty() -> None:
    assert len(parse_operators("")) == 0
    assert parse_operators("").authenticate("x") is None


@pytest.mark.parametrize(("text", "message"), [
    ("[1, 2", "not YAML"),
    ("- a\n- b", "one key, 'operators'"),
    ("operators: []\nextra: 1", "one key, 'operators'"),
    ("operators: {name: a}", "'operators' must be a list"),
    ("operators: [x]", r"operators\[0\]: a mapping of name, groups, tokenSha256"),
    (f"operators: [{{name: a, tokenSha256: {HASH}, role: x}}]", r"operators\[0\]: a mapping"),
    (f"operators: [{{tokenSha256: {HASH}}}]", r"operators\[0\]\.name: a non-empty name"),
    (f"operators: [{{name: admin, tokenSha256: {HASH}}}]", r"other than 'admin'/'local'"),
    (f"operators: [{{name: local, tokenSha256: {HASH}}}]", r"other than 'admin'/'local'"),
    (f"operators: [{{name: a, tokenSha256: {HASH}}}, {{name: a, tokenSha256: {HASH}}}]",
     r"operators\[1\]\.name: 'a' is listed twice"),
    (f"operators: [{{name: a, groups: oncall, tokenSha256: {HASH}}}]",
     r"operators\[0\]\.groups: a list of group names"),
    (f"operators: [{{name: a, groups: [''], tokenSha256: {HASH}}}]", r"\.groups: a list"),
    ("operators: [{name: a, tokenSha256: abc}]", r"operators\[0\]\.tokenSha256: the SHA-256"),
    (f"operators: [{{name: a, tokenSha256: {'g' * 64}}}]", r"\.tokenSha256: the SHA-256"),
    ("operators: [{name: a}]", r"\.tokenSha256: the SHA-256"),
])
def test_operators_file_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(OperatorsError, match=message):
        parse_operators(text)


def test_group_principals_name_members_of_the_group() -> None:
    op = Operator("alice", frozenset({"oncall", "finance"}))
    assert op.is_in(["group:finance"])
    assert op.is_in(["bob", "alice"])
    assert not op.is_in(["group:security", "bob"])
    assert not op.is_in(["group:alice"])  # a name is not a group
    assert not op.is_in(["oncall"])  # a group is not a name
    assert not op.is_in(["group:"])
    assert not op.is_in([])


# -- the digest -----------------------------------------------------------------------

URL = "https://mcp.example.com/mcp"


def rpc(method: str = "tools/call", rid: Any = 1, **params: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}).encode()


def digest(body: bytes, agent: str = "coder", tier: str = "infra", method: str = "POST",
           url: str = URL) -> str:
    return action_digest(agent, tier, method, url, body)


CALL = rpc(name="kubectl", arguments={"command": "delete pod web-1", "namespace": "prod"})


def test_a_retry_with_a_new_json_rpc_id_has_the_same_digest() -> None:
    again = rpc(rid="c7f1-second-send", name="kubectl",
                arguments={"command": "delete pod web-1", "namespace": "prod"})
    assert digest(again) == digest(CALL)


def test_mcp_meta_is_ignored() -> None:
    again = rpc(rid=2, name="kubectl", arguments={"command": "delete pod web-1",
                                                  "namespace": "prod"},
                _meta={"progressToken": "p-99"})
    assert digest(again) == digest(CALL)


def test_key_order_and_whitespace_are_ignored() -> None:
    again = (b'{"params": {"arguments": {"namespace": "prod", "command": "delete pod web-1"},'
             b' "name": "kubectl"}, "method": "tools/call", "id": 5, "jsonrpc": "2.0"}')
    assert digest(again) == digest(CALL)


def a2a(message_id: str, text: str = "book the flight", context: str = "ctx-1") -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": message_id + "-rpc", "method": "message/send",
                       "params": {"message": {"messageId": message_id, "role": "user",
                                              "contextId": context,
                                              "parts": [{"kind": "text", "text": text}]}}}).encode()


def test_a2a_message_id_is_ignored_but_the_message_is_not() -> None:
    assert digest(a2a("m-1")) == digest(a2a("m-2"))
    assert digest(a2a("m-1")) != digest(a2a("m-1", text="cancel the flight"))
    assert digest(a2a("m-1")) != digest(a2a("m-1", context="ctx-2"))


@pytest.mark.parametrize("other", [
    rpc(name="kubectl", arguments={"command": "delete pod web-2", "namespace": "prod"}),
    rpc(name="kubectl", arguments={"command": "delete pod web-1", "namespace": "staging"}),
    rpc(name="kubectl", arguments={"command": "delete pod web-1"}),
    rpc(name="helm", arguments={"command": "delete pod web-1", "namespace": "prod"}),
    # an argument that happens to be called id, _meta or messageId is still an argument
    rpc(name="kubectl", arguments={"command": "delete pod web-1", "namespace": "prod", "id": 7}),
    rpc(name="kubectl", arguments={"command": "delete pod web-1", "namespace": "prod",
                                   "messageId": "x"}),
    rpc(name="kubectl", arguments={"command": "delete pod web-1", "namespace": "prod",
                                   "_meta": {"x": 1}}),
])
def test_any_change_of_the_call_changes_the_digest(other: bytes) -> None:
    assert digest(other) != digest(CALL)


def test_an_argument_named_id_is_part_of_the_action() -> None:
    # approving "delete user 5" must not approve "delete user 6"
    five = rpc(name="delete_user", arguments={"id": 5})
    six = rpc(rid=2, name="delete_user", arguments={"id": 6})
    assert digest(five) != digest(six)
    # nor cancelling task A approve cancelling task B (A2A tasks/cancel names it in params.id)
    assert (digest(rpc("tasks/cancel", rid=1, id="task-a"))
            != digest(rpc("tasks/cancel", rid=1, id="task-b")))


def test_id_of_a_plain_json_body_is_part_of_the_action() -> None:
    assert digest(b'{"id": "order-5", "refund": true}') != digest(b'{"id": "order-6", "refund": true}')


def test_a_batch_retry_matches_but_a_changed_batch_does_not() -> None:
    one = json.dumps([json.loads(CALL), json.loads(rpc(rid=2, name="helm", arguments={}))])
    two = json.dumps([json.loads(rpc(rid=10, name="kubectl", arguments={
        "command": "delete pod web-1", "namespace": "prod"})),
        json.loads(rpc(rid=11, name="helm", arguments={}))])
    assert digest(one.encode()) == digest(two.encode())
    three = json.dumps([json.loads(CALL), json.loads(rpc(rid=2, name="helm", arguments={"x": 1}))])
    assert digest(three.encode()) != digest(one.encode())


def test_an_llm_request_with_another_model_has_another_digest() -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "pay invoice 12"}]}
    other = {**body, "model": "gpt-4o-mini"}
    url = "https://api.openai.com/v1/chat/completions"
    assert digest(json.dumps(body).encode(), url=url) != digest(json.dumps(other).encode(), url=url)
    assert (digest(json.dumps(body).encode(), url=url)
            == digest(json.dumps(body, indent=2).encode(), url=url))


@pytest.mark.parametrize("kw", [
    {"url": "https://mcp.example.com/mcp?tenant=2"},
    {"url": "https://other.example.com/mcp"},
    {"agent": "reviewer"},
    {"tier": "financial"},
    {"method": "PUT"},
])
def test_who_asks_the_tier_and_the_target_are_part_of_the_digest(kw: dict[str, str]) -> None:
    assert digest(CALL, **kw) != digest(CALL)


def test_the_method_is_compared_case_insensitively() -> None:
    assert digest(CALL, method="post") == digest(CALL)


def test_the_parts_are_length_prefixed() -> None:
    # "ab" + "c" and "a" + "bc" must not collide
    assert digest(CALL, agent="ab", tier="c") != digest(CALL, agent="a", tier="bc")


def test_non_json_bodies_are_compared_by_their_bytes() -> None:
    assert canonical_body(b"amount=10&to=acct_1") == b"amount=10&to=acct_1"
    assert digest(b"amount=10&to=acct_1") == digest(b"amount=10&to=acct_1")
    assert digest(b"amount=10&to=acct_1") != digest(b"amount=11&to=acct_1")
    assert digest(b"\xff\xfe binary") != digest(b"\xff\xfd binary")
    assert digest(b"") != digest(b"x")
    assert canonical_body(b"") == b""


# -- the summary ----------------------------------------------------------------------

KEY = "sk-proj-" + "A1b2C3d4E5f6G7h8J9k0" * 2


def mcp_facts(arguments: dict[str, Any]) -> dict[str, Any]:
    return {"method": "tools/call", "server": {"name": "ops"},
            "tool": {"name": "deploy", "arguments": arguments}}


def test_summary_masks_keys_and_secret_named_values() -> None:
    args = {"env": "prod", "note": f"use {KEY} for it", "password": "hunter2",
            "db": {"api_key": "plainvalue123", "host": "db1"}}
    body = rpc(name="deploy", arguments=args)
    s = action_summary("POST", URL, "mcp.example.com", body, mcp=mcp_facts(args))
    assert s["kind"] == "mcp" and s["tool"] == "deploy" and s["server"] == "ops"
    assert s["mcp_method"] == "tools/call"
    assert s["arguments"] == {"env": "prod", "note": "use *** for it", "password": "***",
                              "db": {"api_key": "***", "host": "db1"}}
    text = json.dumps(s)
    for secret in (KEY, "hunter2", "plainvalue123"):
        assert secret not in text, secret  # not in the arguments, not in the excerpt
    assert "prod" in s["excerpt"]


def test_summary_masks_every_value_under_a_secret_named_key() -> None:
    args = {"credentials": ["hunter2", {"user": "bob"}], "token": {"value": "s3cr3t"}}
    s = action_summary("POST", URL, "mcp.example.com", rpc(name="deploy", arguments=args),
                       mcp=mcp_facts(args))
    text = json.dumps(s)
    assert "hunter2" not in text and "s3cr3t" not in text and "bob" not in text


def test_summary_masks_keys_in_the_url_and_a_non_json_excerpt() -> None:
    s = action_summary("POST", f"https://api.example.com/hook?k={KEY}", "api.example.com",
                       f"Authorization: Bearer {KEY}".encode())
    assert KEY not in json.dumps(s)
    assert s["kind"] == "http" and s["method"] == "POST" and s["host"] == "api.example.com"


def test_summary_excerpt_is_capped() -> None:
    s = action_summary("POST", URL, "h", b"x" * (EXCERPT_BYTES * 10))
    assert s["excerpt"] == "x" * EXCERPT_BYTES + "…"
    short = action_summary("POST", URL, "h", b"hello")
    assert short["excerpt"] == "hello"
    big = json.dumps({"data": "y" * (EXCERPT_BYTES * 3)}).encode()
    assert len(action_summary("POST", URL, "h", big)["excerpt"]) == EXCERPT_BYTES + 1


def test_summary_names_the_model_and_the_a2a_recipient() -> None:
    s = action_summary("POST", "https://api.openai.com/v1/chat/completions", "api.openai.com",
                       b"{}", llm={"is_llm": True, "model": "gpt-4o", "provider": "openai"})
    assert (s["kind"], s["model"], s["provider"]) == ("llm", "gpt-4o", "openai")
    s = action_summary("POST", "https://agents.example.com/a2a", "agents.example.com", b"{}",
                       a2a={"is_a2a": True, "method": "message/send", "target": "travel",
                            "context_id": "ctx-1"})
    assert (s["kind"], s["a2a_method"], s["to"], s["context"]) == (
        "a2a", "message/send", "travel", "ctx-1")
    plain = action_summary("GET", "https://x.example.com/", "x.example.com", b"",
                           llm={"is_llm": False}, a2a={"is_a2a": False}, mcp={})
    assert plain["kind"] == "http" and "model" not in plain and "tool" not in plain


def test_secret_named_keys_are_masked_and_lookalikes_kept() -> None:
    from fleetgate.approvals.action import mask_secrets
    masked = mask_secrets({"max_tokens": 5, "bypass": "x", "access_token": "t", "token": "t",
                           "passwd": "p", "client_secret": "s"})
    assert masked == {"max_tokens": 5, "bypass": "x", "access_token": "***", "token": "***",
                      "passwd": "***", "client_secret": "***"}
