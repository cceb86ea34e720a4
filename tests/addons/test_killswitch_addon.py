"""The kill switch as mitmproxy addons: fail closed, mitmweb commands, state durability."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chain import SECRET, basic, request_flow, run_request, running_chain
from mitmproxy import exceptions
from mitmproxy.test import taddons
from prometheus_client import generate_latest

from fleetgate.addons.kill_commands import KillCommands
from fleetgate.addons.kill_flows import kill_service
from fleetgate.addons.killswitch import KillSwitch
from fleetgate.addons.rules import PolicyStore
from fleetgate.identity.mint import mint_token
from fleetgate.kill.model import Action, ScopeKind, Subject, Verb, parse_scope
from fleetgate.metrics import GatewayMetrics
from fleetgate.runtime.identity import IdentityRegistry
from fleetgate.runtime.kill import KillService
from fleetgate.runtime.kill_tasks import KillHousekeeping

RULES = """apiVersion: fleetgate/v1
agents:
- name: tester
  match: 'jwt.agent_role == "tester"'
  egress: {hosts: [api.example.com]}
  authorization: {rules: [{allow: 'true'}]}
"""


def tok(sub: str = "agent-7", session: str = "s-1", **claims: Any) -> str:
    return mint_token(SECRET, sub, 600, {"agent_role": "tester", "session_id": session, **claims})


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[tuple[Any, list[Any]]]:
    with running_chain(tmp_path, RULES) as running:
        yield running


def switch_of(addons: list[Any]) -> KillService:
    """The kill service the chain's kill-switch addons share."""
    return next(a for a in addons if isinstance(a, KillSwitch)).kill


def commands_of(addons: list[Any]) -> KillCommands:
    return next(a for a in addons if isinstance(a, KillCommands))


def test_a_crash_while_judging_liveness_denies(chain: tuple[Any, list[Any]],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _, addons = chain
    ks = switch_of(addons)

    def boom(subject: Any) -> Any:
        raise RuntimeError("state unreadable")
    monkeypatch.setattr(ks.core, "verdict", boom)
    f = request_flow(auth=basic(tok()))
    run_request(addons, f)
    assert f.response is not None and f.response.status_code == 500
    assert json.loads(f.response.content)["fleetgate"]["rule"] == "internal-error"


def test_kill_state_that_cannot_be_opened_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    metrics = GatewayMetrics()
    store = PolicyStore(metrics)
    ks = KillSwitch(kill_service(metrics, IdentityRegistry()), metrics)
    with (taddons.context(store, ks) as tctx,
          pytest.raises(exceptions.OptionsError, match="kill-switch state")):
        tctx.options.update(fleetgate_state_dir=str(blocker))


def test_mitmweb_commands_stop_resume_and_stop_selected_flows(
        chain: tuple[Any, list[Any]]) -> None:
    _, addons = chain
    ks, cmd = switch_of(addons), commands_of(addons)
    live = request_flow(auth=basic(tok("a-1", "s-a")))
    run_request(addons, live)
    assert live.response is None and live.id in ks.live  # registered as in flight
    assert cmd.cmd_stop("session:s-a+", "runaway").startswith("stop ")
    assert live.metadata["fleetgate.cut"]["rule"] == "killswitch.stop"  # cut in flight
    f = request_flow(auth=basic(tok("a-1", "s-a")))
    run_request(addons, f)
    assert f.response.status_code == 503 and b"runaway" in f.response.content
    assert cmd.cmd_unrevoke("session:s-a+") == "lifted 1"
    f = request_flow(auth=basic(tok("a-1", "s-a")))
    run_request(addons, f)
    assert f.response is None
    # stop the session of a selected flow (mitmweb: fleetgate.stop.flows @focus "why")
    out = cmd.cmd_stop_flows([f], "seen in mitmweb")
    assert "session:s-a+descendants" in out
    v = ks.core.verdict(Subject("a-1", session="s-a"))
    assert v is not None and v.action.verb is Verb.STOP
    status = json.loads(cmd.cmd_status())
    assert [a["reason"] for a in status["actions"]] == ["seen in mitmweb"]
    with pytest.raises(ValueError, match="kind:value"):
        cmd.cmd_pause("agent", "no value")


def test_an_action_that_cannot_be_saved_still_stops_and_says_so(
        chain: tuple[Any, list[Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    _, addons = chain
    ks = switch_of(addons)

    def full_disk(action: Action) -> None:
        raise OSError("disk full")
    monkeypatch.setattr(ks.core.store, "save_action", full_disk)
    out = ks.apply(Action(Verb.STOP, parse_scope("agent:a-2"), "leak"))
    assert "will not survive a restart" in out["error"]
    f = request_flow(auth=basic(tok("a-2", "s-2")))
    run_request(addons, f)
    assert f.response.status_code == 503  # in force all the same


def test_scope_parsing() -> None:
    assert parse_scope("all").kind is ScopeKind.GLOBAL
    s = parse_scope("session:s-9+")
    assert s.kind is ScopeKind.SESSION and s.value == "s-9" and s.cascade
    with pytest.raises(ValueError, match="unknown scope"):
        parse_scope("planet:x")


def test_housekeeping_lifts_what_ran_out_and_saves_new_sessions(tmp_path: Path) -> None:
    """The periodic task's one tick, on an injected clock: no request needed."""
    now = [1000.0]
    metrics = GatewayMetrics()
    effects = kill_service(metrics, IdentityRegistry()).effects
    kill = KillService(metrics, IdentityRegistry(), effects, clock=lambda: now[0])
    kill.open_state(str(tmp_path))
    kill.observe(Subject("a-3", session="s-3"), None, None)
    kill.apply(Action(Verb.PAUSE, parse_scope("agent:a-3"), "hold", at=now[0], until=1010.0))
    tick = KillHousekeeping(kill).tick
    tick()
    assert [a["verb"] for a in kill.status()["actions"]] == ["pause"]
    now[0] = 1011.0
    tick()
    assert kill.status()["actions"] == []
    assert [r["event"] for r in kill.log()] == ["action", "expire"]
    assert 'fleetgate_kill_actions_in_force{verb="pause"} 0.0' in _exposition(metrics)
    kill.observe(Subject("a-4", session="s-4"), "s-3", None)
    tick()
    assert sorted(n.session for n in kill.core.store.nodes()) == ["s-3", "s-4"]
    kill.close()


def _exposition(metrics: GatewayMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def _refusal(f: Any) -> tuple[int, str, str] | None:
    if f.response is None:
        return None
    body = json.loads(f.response.content)["fleetgate"]
    return f.response.status_code, body["rule"], body["reason"]


def test_a_new_session_the_store_cannot_record_is_refused_until_it_recovers(
        chain: tuple[Any, list[Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16: fail closed on the kill-switch store; recorded sessions are unaffected."""
    _, addons = chain
    ks = switch_of(addons)
    store = ks.core.store
    old = request_flow(auth=basic(tok("a-1", "s-old")))
    run_request(addons, old)
    assert old.response is None and ks.recorded("s-old")

    def locked(node: Any) -> None:
        raise sqlite3.OperationalError("database is locked")
    monkeypatch.setattr(store.inner, "save_node", locked)
    f = request_flow(auth=basic(tok("a-2", "s-new")))
    run_request(addons, f)
    code, rule, reason = _refusal(f) or (0, "", "")
    assert (code, rule) == (503, "killswitch.state") and "database is locked" in reason
    assert f.response.headers["Retry-After"] == "1"
    assert ks.store_status()["ok"] is False
    assert ('fleetgate_state_errors_total{op="session",store="killswitch"} 1.0'
            in _exposition(ks.metrics))
    assert 'fleetgate_state_ok{store="killswitch"} 0.0' in _exposition(ks.metrics)
    # known failing: the next new session is refused without waiting; recorded ones pass
    f = request_flow(auth=basic(tok("a-3", "s-new2")))
    run_request(addons, f)
    assert (_refusal(f) or (0, "", ""))[1] == "killswitch.state" and "failing" in _refusal(f)[2]
    again = request_flow(auth=basic(tok("a-1", "s-old")))
    run_request(addons, again)
    assert again.response is None
    # the store works again: the next housekeeping tick writes what was refused
    monkeypatch.undo()
    KillHousekeeping(ks).tick()
    store.sync()
    assert ks.store_status()["ok"] is True
    assert 'fleetgate_state_ok{store="killswitch"} 1.0' in _exposition(ks.metrics)
    assert {"s-new", "s-new2"} <= {n.session for n in store.nodes()}
    for agent, session in (("a-2", "s-new"), ("a-3", "s-new2"), ("a-4", "s-new3")):
        f = request_flow(auth=basic(tok(agent, session)))
        run_request(addons, f)
        assert f.response is None, _refusal(f)


def test_a_stalled_store_bounds_the_wait_and_never_the_stop(
        chain: tuple[Any, list[Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that hangs (another process holds the lock): a new session waits at most
    ``state_wait``, an action is in force at once and the admin answer says it is unsaved."""
    _, addons = chain
    ks = switch_of(addons)
    ks.state_wait = 0.3
    store = ks.core.store
    run_request(addons, request_flow(auth=basic(tok("a-1", "s-old"))))
    release = threading.Event()
    real = store.inner.save_node

    def stalled(node: Any) -> None:
        release.wait(10)
        real(node)
    monkeypatch.setattr(store.inner, "save_node", stalled)
    try:
        f = request_flow(auth=basic(tok("a-2", "s-slow")))
        t0 = time.perf_counter()
        run_request(addons, f)
        took = time.perf_counter() - t0
        assert (_refusal(f) or (0, "", ""))[1] == "killswitch.state" and 0.3 <= took < 1.0
        assert "not written within 0.3s" in _refusal(f)[2]
        t0 = time.perf_counter()
        out = ks.act(Action(Verb.STOP, parse_scope("agent:a-1"), "stop while stalled"))
        assert "will not survive a restart" in out["error"]  # waited 0.3 s for the write
        v = ks.verdict(Subject("a-1", session="s-old"))
        assert v is not None and v.action.verb is Verb.STOP
    finally:
        release.set()
    store.sync()
    assert ks.recorded("s-slow") and ks.store_status()["ok"] is True
    # the stop (and the cut of a-1's flow in flight) was written after all
    assert [r["event"] for r in ks.log()] == ["action", "cut"]
    assert [a.reason for a in store.actions()] == ["stop while stalled"]
