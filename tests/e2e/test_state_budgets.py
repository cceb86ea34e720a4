"""Budgets whose state store fails, end to end through a real mitmdump (issue 16, items 1-3):
a disk that fills, a second process holding the database lock, kill -9 under load. In each,
nothing reaches the upstream unaccounted, the fault shows in readiness and metrics, a control
agent no budget governs is unaffected, and the gateway recovers without a restart."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import GatewayFactory
from llm_upstream import Control, install, llm_rules_extra

from harness import Gateway, Upstream, ssl_context, token, wait_until, write_rules

REPO = Path(__file__).resolve().parents[2]

BUDGET = """
budgets:
- id: cap
  per: fleet
  period: day
  tokens: {hard: 100000000}
  when: 'jwt.agent_role == "other"'
"""

_open: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


@pytest.fixture
def ctl(upstream: Upstream) -> Control:
    return install(upstream)


def rules_dir(tmp_path: Path, upstream: Upstream) -> Path:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    shutil.copy(REPO / "rules" / "pricing.yaml", rules / "pricing.yaml")
    write_rules(rules / "llm.yaml", [upstream.port], top=llm_rules_extra(upstream.port) + BUDGET)
    return rules


def client(gw: Gateway, upstream: Upstream, sub: str, role: str) -> openai.OpenAI:
    http = httpx.Client(proxy=gw.proxy_url(token(sub, role=role)), verify=ssl_context(gw.ca_cert),
                        timeout=20)
    c = openai.OpenAI(base_url=upstream.url + "/v1", api_key="sk-test", max_retries=0,
                      http_client=http)
    _open.append(c)
    return c


def chat(c: openai.OpenAI, **kw: object) -> object:
    return c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=20, **kw)  # type: ignore[call-overload]


def calls_upstream(upstream: Upstream) -> int:
    return sum(1 for s in upstream.seen if s.path.endswith("/chat/completions"))


def spend_tokens(gw: Gateway) -> int:
    report = httpx.get(f"http://127.0.0.1:{gw.metrics_port}/budgets").json()["budgets"]
    [cap] = [b for b in report if b["budget"] == "cap"]
    return sum(s["tokens"] for s in cap["spend"])


def state(gw: Gateway) -> dict[str, object]:
    body = gw.ready().json()
    return {"degraded": body.get("degraded"), **body["state"]["budgets"]}


def metric(gw: Gateway, pattern: str) -> float | None:
    m = re.search(pattern + r" (\S+)", gw.metrics())
    return float(m.group(1)) if m else None


def refused_for_state(c: openai.OpenAI) -> str:
    with pytest.raises(openai.APIStatusError) as info:
        chat(c)
    assert info.value.status_code == 503
    return str(info.value.message)


# -- disk full ----------------------------------------------------------------------------


class TmpfsGateway(Gateway):
    """The gateway in its own mount namespace, with a 1 MiB tmpfs at ``full`` where its
    ``budgets.sqlite`` lives (the state directory links it there): a disk that can fill."""

    full: Path = Path()

    def argv(self) -> list[str]:
        script = 'mount -t tmpfs -o size=1m tmpfs "$0" && exec "$@"'
        return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(self.full),
                *super().argv()]

    def inside(self) -> Path:
        """The tmpfs as the gateway sees it (this process is outside its namespace)."""
        assert self.proc is not None
        return Path(f"/proc/{self.proc.pid}/root{self.full}")


def fill(d: Path) -> Path:
    filler = d / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def _can_mount_private_tmpfs() -> bool:
    """Root alone is not enough: a container without CAP_SYS_ADMIN refuses ``unshare -m``."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    with tempfile.TemporaryDirectory() as d:
        probe = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs -o size=64k tmpfs "$0"', d],
            capture_output=True, timeout=10)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_private_tmpfs(),
                    reason="needs unshare -m and mount (root with CAP_SYS_ADMIN) for a tmpfs "
                           "the gateway alone sees")
def test_a_full_disk_refuses_budgeted_calls_and_recovers_when_space_returns(
        tmp_path: Path, confdir: Path, upstream_ca_file: Path, upstream: Upstream,
        ctl: Control) -> None:
    state_dir, full = tmp_path / "state", tmp_path / "full"
    state_dir.mkdir()
    full.mkdir()
    (state_dir / "budgets.sqlite").symlink_to(full / "budgets.sqlite")
    workdir = tmp_path / "gw"
    workdir.mkdir()
    gw = TmpfsGateway(rules=rules_dir(tmp_path, upstream), workdir=workdir, confdir=confdir,
                      upstream_ca=upstream_ca_file,
                      options={"fleetgate_state_dir": str(state_dir)})
    gw.full = full
    gw.start()
    try:
        budgeted = client(gw, upstream, "b-1", "other")
        control = client(gw, upstream, "c-1", "tester")
        chat(budgeted)
        assert state(gw)["ok"] is True and calls_upstream(upstream) == 1
        filler = fill(gw.inside())
        for _ in range(5):
            msg = refused_for_state(budgeted)
            assert "budget cap cannot be enforced" in msg and "budget.state" in msg
            assert "full" in msg
        assert calls_upstream(upstream) == 1  # nothing reached the upstream unaccounted
        s = state(gw)
        assert s["ok"] is False and "full" in str(s["error"]) and s["degraded"] is True
        assert gw.ready().status_code == 200  # ready: calls no budget governs still go
        assert metric(gw, r'fleetgate_state_ok\{store="spend"\}') == 0.0
        errors = metric(gw, r'fleetgate_state_errors_total\{op="reserve",store="spend"\}')
        assert errors is not None and errors >= 5
        gw.wait_for_output("budget spend store: reserve failed")
        chat(control)  # no budget governs it: unaffected
        assert calls_upstream(upstream) == 2
        filler.unlink()  # space returns: the next call's write works, no restart
        chat(budgeted)
        assert state(gw)["ok"] is True and calls_upstream(upstream) == 3
        assert metric(gw, r'fleetgate_state_ok\{store="spend"\}') == 1.0
        assert wait_until(lambda: spend_tokens(gw) == 2 * 30)  # both budgeted calls, metered
    finally:
        gw.stop()


# -- a second process holds the lock ---------------------------------------------------------


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def timed_calls(c: openai.OpenAI, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        chat(c)
        out.append(time.perf_counter() - t0)
    return out


def test_a_locked_store_delays_only_budgeted_calls_up_to_the_wait(
        make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream, ctl: Control) -> None:
    state_dir = tmp_path / "state"
    gw = make_gateway(rules_dir(tmp_path, upstream), fleetgate_state_dir=str(state_dir),
                      fleetgate_state_wait_ms="1000")
    budgeted = client(gw, upstream, "b-1", "other")
    control = client(gw, upstream, "c-1", "tester")
    chat(budgeted)
    timed_calls(control, 5)  # warm
    before = timed_calls(control, 60)
    holding, done = threading.Event(), threading.Event()

    def lock() -> None:
        db = sqlite3.connect(state_dir / "budgets.sqlite", isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        holding.set()
        done.wait(8)
        db.execute("COMMIT")
        db.close()

    locker = threading.Thread(target=lock)
    locker.start()
    assert holding.wait(5)
    results: list[tuple[float, str]] = []

    def budgeted_call() -> None:
        t0 = time.perf_counter()
        try:
            chat(budgeted)
            results.append((time.perf_counter() - t0, "200"))
        except openai.APIStatusError as exc:
            results.append((time.perf_counter() - t0, f"{exc.status_code} {exc.message}"))

    b = threading.Thread(target=budgeted_call)
    seen = calls_upstream(upstream)
    b.start()
    during = timed_calls(control, 60)
    b.join(10)
    done.set()
    locker.join(10)
    [(waited, outcome)] = results
    assert outcome.startswith("503") and "did not answer within 1000 ms" in outcome
    assert 0.9 < waited < 3.0
    assert calls_upstream(upstream) == seen + 60  # the control calls only
    print(f"control p99 before {p99(before) * 1000:.1f} ms, while locked "
          f"{p99(during) * 1000:.1f} ms; budgeted call refused after {waited * 1000:.0f} ms")
    assert p99(during) < p99(before) + 0.1  # a stall on the loop would be >= 1 s
    assert state(gw)["ok"] is False or wait_until(lambda: state(gw)["ok"] is True)
    # the lock is gone: budgeted calls work again, readiness says so
    chat(budgeted)
    assert wait_until(lambda: state(gw)["ok"] is True)
    assert metric(gw, r'fleetgate_state_errors_total\{op="reserve",store="spend"\}')
    assert wait_until(lambda: spend_tokens(gw) == 2 * 30)


# -- kill -9 under load --------------------------------------------------------------------


def test_calls_in_flight_at_kill_9_are_charged_their_reservation_at_restart(
        make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream, ctl: Control) -> None:
    state_dir = tmp_path / "state"
    rules = rules_dir(tmp_path, upstream)
    gw = make_gateway(rules, fleetgate_state_dir=str(state_dir))
    for i in range(5):
        chat(client(gw, upstream, f"b-{i}", "other"))
    one = gw.wait_for_decision(lambda d: d.get("budgets") is not None)["budgets"][0][
        "reserved_tokens"]
    assert wait_until(lambda: spend_tokens(gw) == 5 * 30)
    ctl.hold_after_first = True  # ten streams reach the upstream and stay in flight

    def agent(i: int) -> None:
        with contextlib.suppress(Exception):
            for _ in chat(client(gw, upstream, f"s-{i}", "other"), stream=True):  # type: ignore[attr-defined]
                pass

    threads = [threading.Thread(target=agent, args=(i,), daemon=True) for i in range(10)]
    for t in threads:
        t.start()
    assert wait_until(lambda: calls_upstream(upstream) == 15, timeout=15)
    assert gw.proc is not None
    os.killpg(gw.proc.pid, signal.SIGKILL)
    gw.proc.wait(10)
    ctl.release_after_first.set()
    for t in threads:
        t.join(15)
    gw2 = make_gateway(rules, fleetgate_state_dir=str(state_dir))
    # every call the upstream saw is charged: five metered, ten their reservation
    assert spend_tokens(gw2) == 5 * 30 + 10 * one
    assert calls_upstream(upstream) == 15
    assert gw2.text().count("outcome=lost-in-crash") == 10
    assert metric(gw2, r'fleetgate_budget_lost_in_crash_total\{budget="cap"\}') == 10.0
    gw2.stop()
    with sqlite3.connect(state_dir / "budgets.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM reservations").fetchone()[0] == 0
