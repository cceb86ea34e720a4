"""The approval queue's stores, the same behaviours on each: SQLite in memory, SQLite in a
file (which survives a reopen), and Redis (a real redis-server, ``tests/redisd.py``).

One open record per action digest: a retry joins it, a denial stays the digest's answer, a
consumed approval frees the digest. ``transition`` is atomic: of two retries racing to consume
one approval, exactly one succeeds (two store objects stand for two gateways where the
backend is shared).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redisd import RedisServer

from fleetgate.approvals.model import Approval, ApprovalConflict, Status
from fleetgate.approvals.operators import Operator
from fleetgate.errors import NotFound
from fleetgate.stores.approvals import ApprovalStore, SqliteApprovalStore
from fleetgate.stores.redis_approvals import RedisApprovalStore
from fleetgate.stores.redis_conn import parse_state

ALICE = Operator("alice", frozenset({"oncall"}))
_ids = itertools.count(1)

# opens another handle on the same backing data (another gateway), or None for memory
Opener = Callable[[], ApprovalStore]


def approval(digest: str = "d1", created: float = 100.0, window: float = 100.0) -> Approval:
    return Approval(id=f"apr_{next(_ids):04d}", tier="infra", digest=digest, created=created,
                    deadline=created + window, window=window, needed=1, agent="coder",
                    action={"kind": "mcp", "tool": "kubectl"}, decision_id="dec_1")


@pytest.fixture(params=["sqlite-memory", "sqlite-file", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Opener]]:
    opened: list[ApprovalStore] = []

    def track(open_: Opener) -> Opener:
        def opener() -> ApprovalStore:
            s = open_()
            opened.append(s)
            return s
        return opener

    if request.param == "sqlite-memory":
        memory = SqliteApprovalStore(None)
        opened.append(memory)
        yield request.param, lambda: memory
    elif request.param == "sqlite-file":
        yield request.param, track(lambda: SqliteApprovalStore(tmp_path / "approvals.sqlite3"))
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        settings = parse_state(server.url)
        assert settings is not None
        yield request.param, track(lambda: RedisApprovalStore(settings))
    for s in opened:
        s.close()


@pytest.fixture
def store(backend: tuple[str, Opener]) -> ApprovalStore:
    return backend[1]()


def test_a_retry_joins_the_open_record_for_its_digest(store: ApprovalStore) -> None:
    first = approval("d1")
    got, created = store.create_or_get(first)
    assert created and got == first
    again, created = store.create_or_get(approval("d1", created=150.0))
    assert not created and again == first
    other, created = store.create_or_get(approval("d2"))
    assert created and other.id != first.id
    assert store.find("d1") == first and store.get(first.id) == first
    assert store.find("nothing") is None and store.get("apr_none") is None


def test_an_approved_record_is_joined_until_it_is_consumed(store: ApprovalStore) -> None:
    first, _ = store.create_or_get(approval("d1"))
    approved = store.transition(first.id, lambda a: a.approve(ALICE, 120.0))
    assert approved.status is Status.APPROVED
    assert store.create_or_get(approval("d1")) == (approved, False)
    used = store.transition(first.id, lambda a: a.consume(130.0, "dec_2"))
    assert used.status is Status.CONSUMED and store.get(first.id) == used
    # the digest is free: the next identical action asks again
    assert store.find("d1") is None
    fresh = approval("d1", created=140.0)
    got, created = store.create_or_get(fresh)
    assert created and got == fresh and got.id != first.id
    assert store.find("d1") == fresh


def test_a_denial_stays_the_answer_for_its_digest(store: ApprovalStore) -> None:
    first, _ = store.create_or_get(approval("d1"))
    denied = store.transition(first.id, lambda a: a.deny(ALICE, 120.0, "no"))
    assert store.find("d1") == denied
    got, created = store.create_or_get(approval("d1", created=200.0))
    assert not created and got == denied and got.status is Status.DENIED


def test_a_refused_transition_changes_nothing(store: ApprovalStore) -> None:
    first, _ = store.create_or_get(approval("d1"))
    with pytest.raises(ApprovalConflict):
        store.transition(first.id, lambda a: a.consume(110.0, "dec_2"))
    assert store.get(first.id) == first

    def broken(a: Approval) -> Approval:
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        store.transition(first.id, broken)
    assert store.get(first.id) == first
    with pytest.raises(NotFound, match="no approval 'apr_missing'"):
        store.transition("apr_missing", lambda a: a)


def test_two_racing_retries_consume_one_approval_exactly_once(
        backend: tuple[str, Opener]) -> None:
    _, open_store = backend
    one, two = open_store(), open_store()  # two gateways on one backend (memory: one)
    first, _ = one.create_or_get(approval("d1"))
    one.transition(first.id, lambda a: a.approve(ALICE, 110.0))
    barrier = threading.Barrier(2)
    results: list[str] = []

    def consume(store: ApprovalStore, decision: str) -> None:
        barrier.wait()

        def change(a: Approval) -> Approval:
            time.sleep(0.05)  # both have read the record before either writes
            return a.consume(120.0, decision)
        try:
            store.transition(first.id, change)
            results.append(decision)
        except ApprovalConflict:
            results.append("conflict")

    threads = [threading.Thread(target=consume, args=(s, d))
               for s, d in ((one, "dec_a"), (two, "dec_b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) in (["conflict", "dec_a"], ["conflict", "dec_b"]), results
    winner = next(r for r in results if r != "conflict")
    final = two.get(first.id)
    assert final is not None and final.status is Status.CONSUMED
    assert final.consumed_by_decision == winner


def test_entries_by_status_newest_first(store: ApprovalStore) -> None:
    a = store.create_or_get(approval("d1", created=100.0))[0]
    b = store.create_or_get(approval("d2", created=200.0))[0]
    c = store.create_or_get(approval("d3", created=300.0))[0]
    b = store.transition(b.id, lambda x: x.approve(ALICE, 210.0))
    assert [x.id for x in store.entries()] == [c.id, b.id, a.id]
    assert [x.id for x in store.entries("pending")] == [c.id, a.id]
    assert store.entries("approved") == [b]
    assert store.entries("denied") == []
    assert [x.id for x in store.entries(limit=2)] == [c.id, b.id]
    assert [x.id for x in store.entries("pending", limit=1)] == [c.id]


def test_due_lists_pending_records_whose_window_passed(store: ApprovalStore) -> None:
    early = store.create_or_get(approval("d1", created=100.0, window=50.0))[0]  # due at 150
    late = store.create_or_get(approval("d2", created=100.0, window=500.0))[0]  # due at 600
    decided = store.create_or_get(approval("d3", created=100.0, window=50.0))[0]
    store.transition(decided.id, lambda x: x.approve(ALICE, 110.0))
    assert store.due(149.0) == []
    assert store.due(150.0) == [early]
    assert sorted(x.id for x in store.due(700.0)) == sorted([early.id, late.id])
    up = store.transition(early.id, lambda x: x.escalate(160.0))  # next window: until 210
    assert store.due(200.0) == []
    assert store.due(210.0) == [up]


@pytest.mark.parametrize("backend", ["sqlite-file", "redis"], indirect=True)
def test_records_outlive_the_store_object(backend: tuple[str, Opener]) -> None:
    _, open_store = backend
    first = open_store()
    a = first.create_or_get(approval("d1"))[0]
    approved = first.transition(a.id, lambda x: x.approve(ALICE, 120.0, "ok"))
    first.close()
    again = open_store()
    assert again.get(a.id) == approved
    assert again.find("d1") == approved
    assert again.create_or_get(approval("d1")) == (approved, False)
    assert again.entries("approved") == [approved]
