"""The request-body plan: read (bounded), stream, buffer or refuse, from the headers alone."""

from __future__ import annotations

import pytest

from fleetgate.body_plan import DEPTH_READ_LIMIT, BodyFacts, parse_content_length, plan_body

MIB = 1 << 20


def test_no_body_needs_no_plan() -> None:
    assert plan_body(BodyFacts(has_body=False, content_length=0)).action == "none"


def test_large_body_nothing_reads_is_streamed() -> None:
    plan = plan_body(BodyFacts(has_body=True, content_length=100 * MIB))
    assert (plan.action, plan.limit) == ("stream", 1 << 30)


def test_body_of_unknown_length_nothing_reads_is_streamed() -> None:
    assert plan_body(BodyFacts(has_body=True, content_length=None)).action == "stream"


def test_small_body_nothing_reads_is_buffered() -> None:
    assert plan_body(BodyFacts(has_body=True, content_length=1000)).action == "buffer"


def test_body_over_the_gateway_bound_is_refused() -> None:
    plan = plan_body(BodyFacts(has_body=True, content_length=(1 << 30) + 1))
    assert (plan.action, plan.reader) == ("refuse", "gateway")


def test_llm_body_over_its_limit_is_refused_before_reading() -> None:
    plan = plan_body(BodyFacts(has_body=True, content_length=100 * MIB, llm_limit=16 * MIB))
    assert (plan.action, plan.limit, plan.reader) == ("refuse", 16 * MIB, "llm")


@pytest.mark.parametrize("length", [None, 16 * MIB, 10])
def test_llm_body_within_its_limit_or_chunked_is_read_bounded(length: int | None) -> None:
    plan = plan_body(BodyFacts(has_body=True, content_length=length, llm_limit=16 * MIB))
    assert (plan.action, plan.limit, plan.reader) == ("read", 16 * MIB, "llm")


def test_mcp_body_is_read_within_the_mcp_limit() -> None:
    plan = plan_body(BodyFacts(has_body=True, content_length=None, mcp_limit=4 * MIB))
    assert (plan.action, plan.limit, plan.reader) == ("read", 4 * MIB, "mcp")


def test_json_body_the_depth_check_cannot_read_is_refused_not_passed_unchecked() -> None:
    plan = plan_body(BodyFacts(has_body=True, content_length=DEPTH_READ_LIMIT + 1,
                               depth_check=True))
    assert (plan.action, plan.reader) == ("refuse", "message-depth")


def test_the_smallest_reader_limit_wins() -> None:
    plan = plan_body(BodyFacts(has_body=True, content_length=DEPTH_READ_LIMIT + MIB,
                               llm_limit=DEPTH_READ_LIMIT + 4 * MIB, depth_check=True))
    assert (plan.action, plan.reader) == ("refuse", "message-depth")


def test_reader_limit_applies_even_above_the_gateway_bound() -> None:
    # a reader's own limit decides for what it reads; the gateway bound is for streams
    plan = plan_body(BodyFacts(has_body=True, content_length=3 * MIB, llm_limit=4 * MIB,
                               max_body=2 * MIB))
    assert plan.action == "read"


@pytest.mark.parametrize(("values", "expected"), [
    ([], None), (["12"], 12), (["12", "12"], 12), (["12, 12"], 12),
    (["12", "13"], "invalid"), (["-1"], "invalid"), (["1e3"], "invalid"), (["٣"], "invalid"),
    ([" 7 "], 7),
])
def test_content_length_is_read_one_way(values: list[str], expected: object) -> None:
    assert parse_content_length(values) == expected
