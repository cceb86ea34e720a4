"""ApprovalService over an in-memory store with a fake clock: one record per digest, a decision
from another thread waking a held request, escalation once per window, and the audit lines
(approval id, decision id) and metrics each event leaves."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from fleetgate.approvals.model import NotAllowed, Status, Tier
from fleetgate.approvals.operators import Operator
from fleetgate.celexpr import compile_expr
from fleetgate.errors import StateError
from fleetgate.metrics import GatewayMetrics
from fleetgate.runtime.approvals import ApprovalService

ALICE = Operator("alice", frozenset({"oncall"}))
BOB = Operator("bob", frozenset({"oncall"}))
LEAD = Operator("lee", frozenset({"leads"}))
MALLORY = Operator("mallory", frozenset({"sales"}))

TIER = Tier(id="infra", when=compile_expr("true", ("request",)), approvers=1,
            approved_by=("group:oncall",), escalate_to=("group:leads",), window=3600.0,
            hold=30.0, reason="infra changes need a human")
ACTION = {"kind": "mcp", "method": "POST", "url": "https://mcp.example.com/mcp",
          "tool": "kubectl", "arguments": {"command": "delete pod web-1"}, "excerpt": "{...}"}


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Setup:
    def __init__(self) -> None:
        self.clock = Clock()
        self.metrics = GatewayMetrics()
        self.service = ApprovalService(self.metrics, clock=self.clock)
        self.lines: list[dict[str, Any]] = []
        self.service.emit.append(self.lines.append)

    def events(self) -> list[str]:
        return [line["event"] for line in self.lines]

    def count(self, event: str, tier: str = "infra") -> float:
        value = self.metrics.registry.get_sample_value(
            "fleetgate_approvals_total", {"tier": tier, "event": event})
        return value or 0.0

    async def ask(self, digest: str = "d1", decision_id: str = "dec_ask",
                  tier: Tier = TIER) -> Any:
        return await self.service.ask(tier, digest, "coder", ACTION,
                                      {"role": "ops", "session": "s1"}, decision_id)


@pytest.fixture
def s() -> Setup:
    return Setup()


def test_asking_twice_for_one_action_makes_one_record_and_one_request_line(s: Setup) -> None:
    async def main() -> None:
        first, created = await s.ask(decision_id="dec_1")
        assert created and first.status is Status.PENDING
        assert (first.tier, first.agent, first.needed) == ("infra", "coder", 1)
        assert first.created == 1000.0 and first.deadline == 1000.0 + 3600.0
        assert first.approved_by == ("group:oncall",) and first.reason == TIER.reason
        s.clock.now += 5
        again, created = await s.ask(decision_id="dec_2")
        assert not created and again == first
        assert await s.service.find("d1") == first
        other, created = await s.ask(digest="d2", decision_id="dec_3")
        assert created and other.id != first.id
    asyncio.run(main())
    assert len(s.service.store.entries()) == 2
    assert s.events() == ["approval.requested", "approval.requested"]
    assert [line["decision_id"] for line in s.lines] == ["dec_1", "dec_3"]
    assert s.count("requested") == 2


def test_an_approval_from_another_thread_wakes_a_held_request(s: Setup) -> None:
    s.service.poll = 60.0  # only the wake-up can end the wait before its timeout

    async def main() -> tuple[Any, float]:
        s.service.attach(asyncio.get_running_loop())
        try:
            a, _ = await s.ask()
            started = threading.Event()

            def approve() -> None:
                started.wait(5)
                time.sleep(0.1)  # the request is waiting by now
                s.service.approve(a.id, ALICE, "ok")
            t = threading.Thread(target=approve)
            t.start()
            t0 = time.monotonic()
            started.set()
            got = await s.service.wait(a.id, timeout=10.0)
            elapsed = time.monotonic() - t0
            t.join(5)
            return got, elapsed
        finally:
            await s.service.close()
    got, elapsed = asyncio.run(main())
    assert got is not None and got.status is Status.APPROVED
    assert elapsed < 5.0, elapsed
    assert s.service._waiters == {}  # the held request left no waiter behind


def test_a_denial_from_another_thread_wakes_a_held_request(s: Setup) -> None:
    s.service.poll = 60.0

    async def main() -> Any:
        s.service.attach(asyncio.get_running_loop())
        try:
            a, _ = await s.ask()

            async def deny_later() -> None:  # the admin API's thread
                await asyncio.sleep(0.1)
                await asyncio.to_thread(s.service.deny, a.id, BOB, "not in prod")
            denier = asyncio.create_task(deny_later())
            got = await s.service.wait(a.id, timeout=10.0)
            await denier
            return got
        finally:
            await s.service.close()
    t0 = time.monotonic()
    got = asyncio.run(main())
    assert time.monotonic() - t0 < 5.0
    assert got.status is Status.DENIED and got.denial_reason == "not in prod"


def test_wait_returns_the_pending_record_when_no_one_decides(s: Setup) -> None:
    s.service.poll = 0.01

    async def main() -> Any:
        a, _ = await s.ask()
        return await s.service.wait(a.id, timeout=0.1)
    got = asyncio.run(main())
    assert got is not None and got.status is Status.PENDING
    assert asyncio.run(s.service.wait("apr_missing", timeout=1.0)) is None


def test_escalate_due_escalates_once_per_window(s: Setup) -> None:
    async def main() -> None:
        a, _ = await s.ask(decision_id="dec_1")
        decided, _ = await s.ask(digest="d2")
        s.service.approve(decided.id, ALICE)
        assert await s.service.escalate_due() == []  # not due yet
        s.clock.now = a.deadline
        up = await s.service.escalate_due()
        assert [(x.id, x.escalations, x.deadline) for x in up] == [
            (a.id, 1, a.deadline + 3600.0)]
        assert await s.service.escalate_due() == []  # once per window
        s.clock.now += 3599
        assert await s.service.escalate_due() == []
        s.clock.now += 1
        again = await s.service.escalate_due()
        assert [(x.id, x.escalations) for x in again] == [(a.id, 2)]
        # after escalation, escalateTo may decide
        assert s.service.approve(a.id, LEAD).status is Status.APPROVED
        s.clock.now += 10 * 3600
        assert await s.service.escalate_due() == []  # decided: never escalated again
    asyncio.run(main())
    escalated = [line for line in s.lines if line["event"] == "approval.escalated"]
    assert [line["escalations"] for line in escalated] == [1, 2]
    assert all(line["decision_id"] == "dec_1" for line in escalated)
    assert s.count("escalated") == 2


def test_escalate_to_may_not_decide_before_the_window_passes(s: Setup) -> None:
    async def main() -> Any:
        a, _ = await s.ask()
        return a
    a = asyncio.run(main())
    with pytest.raises(NotAllowed):
        s.service.approve(a.id, LEAD)
    with pytest.raises(NotAllowed):
        s.service.deny(a.id, MALLORY, "no")
    assert s.events() == ["approval.requested"]  # a refusal writes no audit line
    assert s.service.store.get(a.id) == a


def test_audit_lines_link_the_approval_to_its_decisions(s: Setup) -> None:
    async def main() -> None:
        a, _ = await s.ask(decision_id="dec_ask")
        s.clock.now = 1010.0
        assert await s.service.consume(a.id, "dec_early") is None  # not approved yet
        s.service.approve(a.id, ALICE, "fine")
        s.clock.now = 1020.0
        used = await s.service.consume(a.id, "dec_retry")
        assert used is not None and used.status is Status.CONSUMED
        assert used.consumed_by_decision == "dec_retry" and used.consumed_at == 1020.0
        assert await s.service.consume(a.id, "dec_again") is None  # once
        assert (await s.service.find("d1")) is None  # the digest is free again
    asyncio.run(main())
    assert s.events() == ["approval.requested", "approval.approved", "approval.consumed"]
    requested, approved, consumed = s.lines
    assert {line["approval_id"] for line in s.lines} == {requested["approval_id"]}
    assert requested["approval_id"].startswith("apr_")
    assert requested["decision_id"] == "dec_ask" and requested["time"] == 1000.0
    assert requested["action"] == {"kind": "mcp", "method": "POST",
                                   "url": "https://mcp.example.com/mcp", "tool": "kubectl"}
    assert "arguments" not in requested["action"] and "excerpt" not in requested["action"]
    assert approved["decision_id"] == "dec_ask"
    assert approved["by"] == "alice" and approved["note"] == "fine"
    assert approved["votes"] == ["alice"] and approved["status"] == "approved"
    assert consumed["decision_id"] == "dec_retry"
    assert consumed["forwarded_decision_id"] == "dec_retry"
    assert consumed["status"] == "consumed"
    assert s.count("requested") == 1 and s.count("approved") == 1


def test_a_two_person_tier_records_a_vote_then_the_approval(s: Setup) -> None:
    two = Tier(id="two", when=TIER.when, approvers=2, approved_by=("group:oncall",))

    async def main() -> Any:
        a, _ = await s.ask(tier=two)
        return a
    a = asyncio.run(main())
    assert s.service.approve(a.id, ALICE).status is Status.PENDING
    assert s.service.approve(a.id, BOB).status is Status.APPROVED
    assert s.events() == ["approval.requested", "approval.vote", "approval.approved"]
    assert s.lines[-1]["votes"] == ["alice", "bob"]
    assert s.count("vote", tier="two") == 1 and s.count("approved", tier="two") == 1


def test_a_denial_is_logged_with_its_reason(s: Setup) -> None:
    async def main() -> Any:
        a, _ = await s.ask(decision_id="dec_ask")
        return a
    a = asyncio.run(main())
    d = s.service.deny(a.id, ALICE, "not during the freeze")
    assert d.status is Status.DENIED
    line = s.lines[-1]
    assert line["event"] == "approval.denied" and line["reason"] == "not during the freeze"
    assert line["by"] == "alice" and line["decision_id"] == "dec_ask"
    assert s.count("denied") == 1


def test_an_unreadable_queue_is_a_state_error(s: Setup) -> None:
    s.service.store.close()
    with pytest.raises(StateError, match=r"the approval queue \(memory\) cannot be read"):
        asyncio.run(s.service.find("d1"))


def test_a_failing_audit_sink_does_not_stop_the_others(s: Setup) -> None:
    def broken(line: dict[str, Any]) -> None:
        raise RuntimeError("disk full")
    s.service.emit.insert(0, broken)
    asyncio.run(s.ask())
    assert s.events() == ["approval.requested"]
