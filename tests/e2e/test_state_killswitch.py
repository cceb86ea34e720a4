"""The kill-switch store locked by another process (issue 16): nobody stalls, new sessions
fail closed, a stop is in force at once, and everything recovers without a restart.

Another process (this test) holds ``BEGIN EXCLUSIVE`` on ``killswitch.sqlite`` for ~7 s:
longer than SQLite's 5 s busy timeout, so the gateway's writes really fail. Before issue 16
those writes ran on the event loop and every agent waited them out (p50 4.9 s).
"""

from __future__ import annotations

import sqlite3
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from conftest import GatewayFactory

from harness import Gateway, Upstream, token, wait_until, write_rules

LOCK_SECONDS = 15.0  # as the fault battery held it: three times SQLite's 5 s busy timeout


def _get(gw: Gateway, tok: str, url: str) -> tuple[httpx.Response, float]:
    with gw.client(tok) as c:
        t0 = time.perf_counter()
        r = c.get(url)
        return r, time.perf_counter() - t0


def _rule(r: httpx.Response) -> str | None:
    try:
        return str(r.json()["fleetgate"]["rule"])
    except (ValueError, KeyError, TypeError):
        return None


def _state(gw: Gateway) -> dict[str, Any]:
    return dict(gw.ready().json().get("state", {}).get("killswitch", {}))


def _p99(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(len(xs) * 0.99) - 1)]


def test_a_locked_kill_store_stalls_nobody_and_new_sessions_fail_closed(
        make_gateway: GatewayFactory, upstream: Upstream, tmp_path: Path) -> None:
    state = tmp_path / "state"
    rules = write_rules(tmp_path / "rules.yaml", [upstream.port])
    gw = make_gateway(rules, fleetgate_state_dir=str(state))
    url = upstream.url + "/ping"
    control = token("ctl", session_id="s-ctl")
    victim = token("victim", session_id="s-victim")

    # before: the control agent's latencies, the victim's session recorded too
    assert _get(gw, victim, url)[0].status_code == 200
    before: list[float] = []
    with gw.client(control) as c:
        for _ in range(40):
            t0 = time.perf_counter()
            assert c.get(url).status_code == 200
            before.append(time.perf_counter() - t0)
    assert _state(gw)["ok"] is True

    locker = sqlite3.connect(state / "killswitch.sqlite", isolation_level=None, timeout=10)
    locker.execute("BEGIN EXCLUSIVE")
    locked_at = time.monotonic()
    during: list[float] = []
    codes: list[int] = []
    stop_loop = threading.Event()

    def control_loop() -> None:
        with gw.client(control) as c:
            while not stop_loop.is_set():
                t0 = time.perf_counter()
                codes.append(c.get(url).status_code)
                during.append(time.perf_counter() - t0)
                time.sleep(0.02)

    loop = threading.Thread(target=control_loop)
    loop.start()
    try:
        # a NEW session: its node cannot be written; refused 503 within the configured wait
        r, took = _get(gw, token("new-1", session_id="s-new-1"), url)
        assert r.status_code == 503 and _rule(r) == "killswitch.state", r.text
        assert "s-new-1" in r.json()["fleetgate"]["reason"]
        assert took < 2.0 + 1.0, took  # fleetgate_state_wait_ms (2000) + slack, never 5 s+

        # a stop issued during the lock is in force at once; the answer says it is not saved
        answer: dict[str, httpx.Response] = {}
        issued = time.monotonic()
        t = threading.Thread(target=lambda: answer.setdefault("r", gw.admin(
            "/v1/actions", {"verb": "stop", "scope": "agent:victim", "reason": "e2e stop"})))
        t.start()
        refused: list[float] = []

        def victim_refused() -> bool:
            try:
                r, _ = _get(gw, victim, url)
            except httpx.TransportError:  # in flight when the stop landed: cut
                return False
            if r.status_code == 503 and _rule(r) == "killswitch.stop":
                refused.append(time.monotonic() - issued)
                return True
            return False
        assert wait_until(victim_refused, 2.0, 0.02)
        assert refused[0] < 1.0, refused  # in force before the store answered
        t.join(10)
        out = answer["r"].json()
        assert answer["r"].status_code == 200 and "will not survive a restart" in out["error"]

        # once the write has failed (SQLite's 5 s busy timeout), the store is known failing:
        # readiness says so (degraded, still ready), the metric counts, new sessions are
        # refused at once
        assert wait_until(lambda: _state(gw).get("ok") is False, LOCK_SECONDS, 0.1)
        ready = gw.ready().json()
        assert ready["ready"] is True and ready["degraded"] is True
        assert "locked" in ready["state"]["killswitch"]["error"]
        assert 'fleetgate_state_errors_total{op="session",store="killswitch"}' in gw.metrics()
        r, took = _get(gw, token("new-2", session_id="s-new-2"), url)
        assert r.status_code == 503 and _rule(r) == "killswitch.state" and took < 0.5, took
        assert "failing" in r.json()["fleetgate"]["reason"]
        gw.wait_for_output("kill-switch store cannot be written")
        assert time.monotonic() - locked_at < LOCK_SECONDS  # all of it while locked
        time.sleep(max(0.0, LOCK_SECONDS - (time.monotonic() - locked_at)))
    finally:
        locker.execute("ROLLBACK")
        locker.close()
        stop_loop.set()
        loop.join(10)

    # the control agent never waited for the store
    assert codes and set(codes) == {200}, codes
    assert len(during) > 50, len(during)
    base_p99, lock_p99 = _p99(before), _p99(during)
    print(f"control p50/p99/max before {statistics.median(before) * 1000:.1f}/"
          f"{base_p99 * 1000:.1f}/{max(before) * 1000:.1f} ms, during the lock "
          f"{statistics.median(during) * 1000:.1f}/{lock_p99 * 1000:.1f}/"
          f"{max(during) * 1000:.1f} ms over {len(during)} requests")
    assert lock_p99 < 0.5 and max(during) < 1.0, (lock_p99, max(during))

    # recovery without a restart: readiness ok again, the refused sessions now work
    assert wait_until(lambda: _state(gw).get("ok") is True, 15.0, 0.1), _state(gw)
    assert gw.ready().json()["degraded"] is False
    gw.wait_for_output("kill-switch store works again")
    for name in ("new-1", "new-2", "new-3"):
        r, _ = _get(gw, token(name, session_id=f"s-{name}"), url)
        assert r.status_code == 200, (name, r.text)

    # the stop queued during the lock was written once it lifted: it survives a restart
    gw.stop()
    gw2 = make_gateway(rules, fleetgate_state_dir=str(state))
    r, _ = _get(gw2, victim, url)
    assert r.status_code == 503 and _rule(r) == "killswitch.stop"
    r, took = _get(gw2, token("new-1", session_id="s-new-1"), url)
    assert r.status_code == 200
