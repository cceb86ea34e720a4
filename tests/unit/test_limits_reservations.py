"""The reservation book with injected clocks: all-or-nothing reservations, mid-stream
overruns (budgets before token buckets), settlement and give-back per flow."""

from __future__ import annotations

import calendar

import pytest

from fleetgate.celexpr import Activation, compile_expr
from fleetgate.limits.bucket import BucketSpec, LimitKind
from fleetgate.limits.budget import BudgetSpec, Period
from fleetgate.llm.pricing import Price, PricingTable
from fleetgate.policy.model import Budget, RateLimit
from fleetgate.runtime.reservations import ReservationBook
from fleetgate.stores.spend import SqliteSpendStore

T = float(calendar.timegm((2026, 11, 23, 13, 45, 10)))
PRICING = PricingTable({"m": Price(1.0, 1.0, 1.0, 1.0)})  # $1 per million tokens
REQ = RateLimit("req", BucketSpec(2, 2, 60.0))
TOK = RateLimit("tok", BucketSpec(100, 100, 60.0, LimitKind.TOKENS))
DAILY = Budget("daily", BudgetSpec(Period.DAY, hard_tokens=100))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def book() -> ReservationBook:
    return ReservationBook(SqliteSpendStore(None), clock=Clock(1000.0), wall_clock=Clock(T))


def level(book: ReservationBook, limit: str, key: str = "a") -> float:
    [row] = [b for b in book.rates.snapshot()["buckets"]
             if b["limit"] == limit and b["key"] == key]
    return float(row["level"])


def test_a_refusal_gives_back_what_the_other_limits_took(book: ReservationBook) -> None:
    first = book.rates.reserve("f1", [REQ, TOK], agent="a", llm_tokens=80, act=None)
    assert first.failed is None and [h.taken for h in first.held] == [1, 80]
    second = book.rates.reserve("f2", [REQ, TOK], agent="a", llm_tokens=80, act=None)
    assert second.failed is TOK and second.needed == 80 and second.take is not None
    assert level(book, "req") == 1  # the request 'req' took for f2 was given back
    assert not book.watched("f2")


def test_token_limits_skip_calls_that_are_not_llm(book: ReservationBook) -> None:
    out = book.rates.reserve("f", [REQ, TOK], agent="a", llm_tokens=None, act=None)
    assert [h.limit.id for h in out.held] == ["req"]
    assert not book.watched("f")  # nothing depends on its output


def test_an_unevaluable_key_is_a_failure_with_the_error(book: ReservationBook) -> None:
    keyed = RateLimit("team", BucketSpec(5, 5, 60.0), key=compile_expr("jwt.team", ["jwt"]))
    out = book.rates.reserve("f", [REQ, keyed], agent="a", llm_tokens=None,
                             act=Activation({"jwt": {}}))
    assert out.failed is keyed and out.error
    assert level(book, "req") == 2


def test_output_beyond_the_reservation_is_taken_until_the_bucket_is_empty(
        book: ReservationBook) -> None:
    book.rates.reserve("f", [TOK], agent="a", llm_tokens=60, act=None)
    assert book.watched("f")
    assert book.overrun("f", 10, 40, PRICING, "m") is None  # 50 of the 60 reserved
    assert book.overrun("f", 10, 80, PRICING, "m") is None  # 30 more taken: 10 left
    over = book.overrun("f", 10, 100, PRICING, "m")  # 20 more: the bucket has 10
    assert over is not None and over.kind == "ratelimit" and over.rule == "tok"
    assert "ran out after 100 output tokens" in over.reason


def test_settlement_refunds_to_the_usage_and_counts_the_extra(book: ReservationBook) -> None:
    book.rates.reserve("f", [TOK], agent="a", llm_tokens=60, act=None)
    assert book.overrun("f", 10, 70, PRICING, "m") is None  # 20 extra taken mid-stream
    [(hold, after)] = book.rates.settle("f", 50) or []
    assert hold.extra == 20 and after == 50  # 100 - 80 taken + 30 given back
    assert book.rates.settle("f", 50) is None  # settled once
    assert not book.watched("f")


def test_no_usage_leaves_the_reservation_standing(book: ReservationBook) -> None:
    book.rates.reserve("f", [TOK], agent="a", llm_tokens=60, act=None)
    assert book.rates.settle("f", None) is None
    assert level(book, "tok") == 40


def test_a_budget_overrun_is_reported_before_a_token_bucket(book: ReservationBook) -> None:
    book.rates.reserve("f", [TOK], agent="a", llm_tokens=60, act=None)
    out = book.spend.reserve("f", [DAILY], who={"agent": "a"}, usd=None, tokens=60, act=None)
    assert out.failed is None and book.watched("f")
    assert book.overrun("f", 10, 40, PRICING, "m") is None  # within both reservations
    over = book.overrun("f", 10, 95, PRICING, "m")  # 105 tokens: past the 100-token budget
    assert over is not None and over.kind == "budget" and over.rule == "daily"
    assert level(book, "tok") == 40  # the bucket was not asked for the overrun


def test_budget_reservations_count_against_each_other(book: ReservationBook) -> None:
    assert book.spend.reserve("f1", [DAILY], who={"agent": "a"}, usd=None, tokens=60,
                              act=None).failed is None
    refused = book.spend.reserve("f2", [DAILY], who={"agent": "a"}, usd=None, tokens=60, act=None)
    assert refused.failed is DAILY and refused.refusal is not None
    assert refused.refusal.promised.tokens == 60 and refused.now == T
    other = book.spend.reserve("f3", [DAILY], who={"agent": "b"}, usd=None, tokens=60, act=None)
    assert other.failed is None  # per agent


def test_a_budget_per_role_needs_a_role(book: ReservationBook) -> None:
    per_role = Budget("roles", BudgetSpec(Period.DAY, hard_tokens=100), per="role")
    out = book.spend.reserve("f", [per_role], who={"agent": "a"}, usd=None, tokens=1, act=None)
    assert out.failed is per_role and out.error == "the identity has no role claim"


def test_a_usd_budget_refuses_an_unpriced_model(book: ReservationBook) -> None:
    usd = Budget("usd", BudgetSpec(Period.DAY, hard_usd=1.0))
    out = book.spend.reserve("f", [DAILY, usd], who={"agent": "a"}, usd=None, tokens=60,
                             act=None)
    assert out.failed is usd and out.unpriced
    # what 'daily' reserved was released: a full-size call fits again
    assert book.spend.reserve("g", [DAILY], who={"agent": "a"}, usd=None, tokens=100,
                              act=None).failed is None


def test_settle_charges_usage_or_releases_a_call_never_sent(book: ReservationBook) -> None:
    book.spend.reserve("sent", [DAILY], who={"agent": "a"}, usd=0.5, tokens=60, act=None)
    [s] = book.spend.settle("sent", 30, 0.25, charge=True) or []
    assert (s.before.tokens, s.after.tokens, s.after.usd) == (0, 30, 0.25)
    book.spend.reserve("unsent", [DAILY], who={"agent": "a"}, usd=0.5, tokens=60, act=None)
    assert book.spend.settle("unsent", None, None, charge=False) == []
    book.spend.reserve("unmetered", [DAILY], who={"agent": "a"}, usd=0.5, tokens=60, act=None)
    [s] = book.spend.settle("unmetered", None, None, charge=True) or []
    assert s.after.tokens == 90  # sent, nothing metered: charged what it reserved
    assert book.spend.settle("unmetered", None, None, charge=True) is None
    report = book.spend.report(None)
    assert report == {"budgets": []}
