"""A2A JSON-RPC requests: both protocol versions read alike, anything ambiguous refused."""

from __future__ import annotations

from typing import Any

import pytest

from fleetgate.a2a.facts import NOT_A2A, cel_view, log_view, message_facts
from fleetgate.a2a.messages import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    A2aError,
    parse_request,
)
from fleetgate.bodies import BodyError, parse_json


def send(method: str = "SendMessage", rid: Any = "r1", **message: Any) -> dict[str, Any]:
    msg = {"messageId": "m1", "role": "ROLE_USER", "parts": [{"text": "hi"}], **message}
    return {"jsonrpc": "2.0", "id": rid, "method": method, "params": {"message": msg}}


@pytest.mark.parametrize(("raw", "normalised"), [
    ("SendMessage", "message/send"), ("message/send", "message/send"),
    ("SendStreamingMessage", "message/stream"), ("message/stream", "message/stream"),
])
def test_both_versions_normalise_to_one_operation(raw: str, normalised: str) -> None:
    req = parse_request(send(raw, contextId="c1", taskId="t1"))
    assert (req.method, req.rpc_method) == (normalised, raw)
    assert (req.context_id, req.task_id, req.message_id, req.role) == ("c1", "t1", "m1", "user")
    assert req.is_message and req.streaming == (normalised == "message/stream")


@pytest.mark.parametrize(("raw", "normalised"), [
    ("GetTask", "tasks/get"), ("tasks/get", "tasks/get"), ("CancelTask", "tasks/cancel"),
    ("tasks/cancel", "tasks/cancel"), ("SubscribeToTask", "tasks/resubscribe"),
    ("tasks/resubscribe", "tasks/resubscribe"),
])
def test_task_methods_carry_the_task_id_and_make_no_hop(raw: str, normalised: str) -> None:
    req = parse_request({"jsonrpc": "2.0", "id": 7, "method": raw, "params": {"id": "t9"}})
    assert (req.method, req.task_id, req.rid) == (normalised, "t9", 7)
    assert not req.is_message


def test_part_kinds_of_both_versions() -> None:
    v10 = parse_request(send(parts=[{"text": "a"}, {"raw": "AAAA"}, {"url": "https://x/y"},
                                    {"data": {"k": 1}}]))
    v03 = parse_request(send("message/send", role="agent", parts=[
        {"kind": "text", "text": "a"}, {"kind": "file", "file": {"uri": "https://x"}},
        {"kind": "data", "data": {}}]))
    assert v10.parts == ("text", "file", "file", "data")
    assert v03.parts == ("text", "file", "data") and v03.role == "agent"


@pytest.mark.parametrize("part", [
    {"kind": "text", "data": {"k": 1}},  # a 0.3 reader and a 1.0 reader disagree
    {"text": "a", "data": {}},  # two contents
    {},  # none
    {"file": {"uri": "x"}},  # 0.3 file without its kind
    {"kind": "image", "text": "a"},
    "text",
])
def test_ambiguous_parts_are_refused(part: Any) -> None:
    with pytest.raises(A2aError) as exc:
        parse_request(send(parts=[part]))
    assert exc.value.code == INVALID_PARAMS and exc.value.rid == "r1"


@pytest.mark.parametrize(("body", "code"), [
    ([send()], INVALID_REQUEST),  # batch
    ({**send(), "jsonrpc": "1.0"}, INVALID_REQUEST),
    ({k: v for k, v in send().items() if k != "id"}, INVALID_REQUEST),  # notification
    ({**send(), "id": True}, INVALID_REQUEST),
    ({**send(), "method": "message/sendx"}, METHOD_NOT_FOUND),
    ({**send(), "method": "SENDMESSAGE"}, METHOD_NOT_FOUND),  # upper case is another method
    ({**send(), "params": []}, INVALID_PARAMS),
    ({**send(), "params": {"message": "hi"}}, INVALID_PARAMS),
    (send(contextId=5), INVALID_PARAMS),
    (send(role="admin"), INVALID_PARAMS),
    (send(parts={"text": "a"}), INVALID_PARAMS),
    ({"jsonrpc": "2.0", "id": 1, "method": "GetTask",
      "params": {"id": "t1", "taskId": "t2"}}, INVALID_PARAMS),  # which task?
    ("SendMessage", INVALID_REQUEST),
])
def test_malformed_requests_are_refused(body: Any, code: int) -> None:
    with pytest.raises(A2aError) as exc:
        parse_request(body)
    assert exc.value.code == code


def test_duplicate_keys_never_reach_the_parser() -> None:
    with pytest.raises(BodyError):
        parse_json(b'{"jsonrpc": "2.0", "id": 1, "method": "GetTask", "method": "SendMessage"}')


def test_claimed_depth_is_the_largest_field_the_sender_wrote() -> None:
    body = send(metadata={"depth": 2})
    body["depth"] = 1
    body["params"]["metadata"] = {"depth": 4}
    assert parse_request(body).claimed_depth == 4
    assert parse_request(send()).claimed_depth is None


def test_integral_float_depth_from_protobuf_metadata_counts() -> None:
    assert parse_request(send(metadata={"depth": 6.0})).claimed_depth == 6


@pytest.mark.parametrize("depth", [-1, "3", 2.5, True, None, float("inf"), -2.0])
def test_unreadable_claimed_depth_is_refused(depth: Any) -> None:
    with pytest.raises(A2aError):
        parse_request(send(metadata={"depth": depth}))


def test_facts_take_the_stricter_of_counted_and_claimed() -> None:
    req = parse_request(send(metadata={"depth": 0}))
    facts = message_facts(req, target="ceo", sender="marketing", counted=3)
    assert (facts["depth"], facts["counted_depth"], facts["claimed_depth"]) == (3, 3, 0)
    facts = message_facts(parse_request(send(metadata={"depth": 7})), target="ceo",
                          sender="m", counted=1)
    assert facts["depth"] == 7
    assert set(cel_view(facts)) == set(NOT_A2A)
    assert log_view(facts)["claimed_depth"] == 7
    bare = parse_request(send())
    assert bare.claimed_depth is None
    assert log_view(message_facts(bare, target="c", sender="m", counted=1))["claimed_depth"] is None


def test_non_a2a_requests_see_every_field_empty() -> None:
    view = cel_view(None)
    assert view["is_a2a"] is False and view["parts"] == [] and view["target"] == ""
