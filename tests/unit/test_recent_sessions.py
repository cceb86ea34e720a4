"""The bounded in-memory store behind ``GET /v1/trace/<session>``: families, eviction of the
least recently active sessions, a per-session cap that counts what it dropped, the admin view."""

from __future__ import annotations

import io
import json
import threading
from typing import Any

import pytest

from fleetgate.errors import NotFound
from fleetgate.metrics import GatewayMetrics
from fleetgate.runtime.listeners import HttpListener
from fleetgate.telemetry.recent import RecentSessions
from fleetgate.telemetry.tree import build

_n = iter(range(10**9))


def rec(session: str | None, parent: str | None = None, **kw: Any) -> dict[str, Any]:
    i = next(_n)
    out: dict[str, Any] = {"ts": 100.0 + i / 1000, "start_ts": 100.0 + i / 1000,
                           "decision_id": f"d{i}", "result": "allow", "rule": "r",
                           "agent": f"agent-{session}", "role": "tester", "session": session,
                           "method": "GET", "host": "h", "port": 443, "path": f"/{i}",
                           "status": 200}
    if parent:
        out["parent_session"] = parent
    out.update(kw)
    return out


def sessions_of(records: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["session"] for r in records))


def test_family_is_the_session_and_its_descendants_ancestors_on_request() -> None:
    store = RecentSessions()
    for r in (rec("s1"), rec("c1", "s1"), rec("g1", "c1"), rec("c2", "s1"), rec("x"),
              rec("s1"), rec("g1", "c1")):
        store.add(r, None)
    assert set(sessions_of(store.family("s1"))) == {"s1", "c1", "g1", "c2"}
    assert sessions_of(store.family("c1")) == ["c1", "g1"]
    assert sessions_of(store.family("g1", ancestors=True)) == ["s1", "c1", "g1"]
    assert store.family("nobody") == []
    assert len(store.family("s1")) == 6  # both of s1's records, oldest first
    s1 = [r for r in store.family("s1") if r["session"] == "s1"]
    assert s1[0]["ts"] < s1[1]["ts"]


def test_records_without_a_session_and_request_prelines_are_not_kept() -> None:
    store = RecentSessions()
    store.add(rec(None), None)
    store.add(rec(""), None)
    store.add(rec("s", phase="request"), None)
    assert len(store) == 0 and store.records == 0


def test_the_least_recently_active_session_is_evicted_first() -> None:
    store = RecentSessions(max_sessions=3)
    for sid in ("a", "b", "c"):
        store.add(rec(sid), None)
    store.add(rec("a"), None)  # a is active again: b is now the oldest
    store.add(rec("d"), None)
    assert store.family("b") == [] and len(store) == 3
    assert all(store.family(s) for s in ("a", "c", "d"))
    assert store.evicted_sessions == 1


def test_a_session_with_a_million_calls_keeps_the_last_n_and_counts_the_rest() -> None:
    store = RecentSessions(max_records_per_session=100)
    for i in range(1_000_000):
        store.add({"session": "loop", "decision_id": f"d{i}", "ts": float(i),
                   "start_ts": float(i), "result": "allow", "rule": "r", "method": "GET",
                   "host": "h", "path": "/"}, None)
    kept = store.family("loop")
    assert len(kept) == 100 and store.records == 100
    assert kept[0]["decision_id"] == "d999900" and kept[-1]["decision_id"] == "d999999"
    assert store.dropped("loop") == 999_900
    view = store.trace_view("loop")
    assert view["dropped"] == {"loop": 999_900}
    assert view["tree"]["root"]["dropped_calls"] == 999_900
    trace = build(view["records"], "loop", dropped=view["dropped"])
    assert trace is not None and trace.root.family.calls == 100
    assert trace.root.family.dropped == 999_900


def test_the_total_record_bound_evicts_whole_sessions() -> None:
    store = RecentSessions(max_sessions=100, max_records_per_session=10, max_records=25)
    for sid in ("a", "b", "c"):
        for _ in range(10):
            store.add(rec(sid), None)
    assert store.records <= 25 and store.family("a") == []
    assert len(store.family("b")) == 10 and len(store.family("c")) == 10


def test_evicting_a_parent_keeps_its_live_children_reachable_and_the_index_bounded() -> None:
    store = RecentSessions(max_sessions=3)
    store.add(rec("p"), None)
    store.add(rec("k1", "p"), None)
    store.add(rec("k2", "p"), None)
    store.add(rec("other"), None)  # evicts p
    assert store.family("p") == []
    assert sessions_of(store.family("k1", ancestors=True)) == ["k1"]
    for i in range(10):
        store.add(rec(f"n{i}"), None)  # evicts k1, k2
    assert store._children == {}  # no entry outlives the children it indexes


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RecentSessions(max_sessions=0)


def test_the_admin_view_answers_the_tree_and_records_or_a_clear_404() -> None:
    store = RecentSessions()
    store.add(rec("s1"), None)
    store.add(rec("c 1/x", "s1"), None)  # any id, encoded in the path
    out = store.trace_view("s1")
    assert out["tree"]["totals"]["sessions"] == 2 and len(out["records"]) == 2
    assert "records" not in store.trace_view("s1", records="0")
    with pytest.raises(NotFound, match="--log FILE"):
        store.trace_view("nobody")

    admin = HttpListener(GatewayMetrics(), lambda: {}, admin=True)
    admin.admin_token = "t0ken"
    admin.routes.get("/v1/trace/{session}", store.trace_view)

    def get(path: str, query: str = "", auth: str = "Bearer t0ken") -> tuple[str, Any]:
        status: list[str] = []
        environ = {"PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": "GET",
                   "REMOTE_ADDR": "10.0.0.1", "HTTP_AUTHORIZATION": auth,
                   "wsgi.input": io.BytesIO()}
        body = b"".join(admin._app(environ, lambda s, h: status.append(s)))
        return status[0], json.loads(body)

    status, body = get("/v1/trace/s1")
    assert status == "200 OK" and body["session"] == "s1"
    status, body = get("/v1/trace/c 1/x", "ancestors=1")
    assert status == "200 OK" and body["tree"]["root"]["session"] == "s1"
    status, body = get("/v1/trace/nobody")
    assert status == "404 Not Found" and "no records of session 'nobody'" in body["error"]
    assert get("/v1/trace/s1", auth="Bearer wrong")[0] == "401 Unauthorized"
    assert get("/v1/trace/")[0] == "404 Not Found"  # no session: no such route
    assert get("/v1/trace/s1", "bogus=1")[0] == "400 Bad Request"


def test_adds_and_reads_from_two_threads_do_not_break_the_store() -> None:
    store = RecentSessions(max_sessions=50, max_records_per_session=20)
    stop = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        while not stop.is_set():
            try:
                store.family("s0", ancestors=True)
                stop.wait(0.0005)
            except BaseException as exc:  # pragma: no cover - the failure being tested for
                errors.append(exc)
                return

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(3_000):
        store.add(rec(f"s{i % 80}", f"s{(i % 80) // 2}" if i % 80 else None), None)
    stop.set()
    reader.join()
    assert errors == [] and len(store) <= 50
