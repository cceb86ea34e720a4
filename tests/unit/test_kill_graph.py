"""The session graph, the kill board and the core: pure, with an injected clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetgate.kill.board import KillBoard
from fleetgate.kill.core import KillCore
from fleetgate.kill.delegation import DelegationError, DelegationPolicy, child_claims
from fleetgate.kill.graph import GraphError, SessionGraph
from fleetgate.kill.model import Action, Scope, ScopeKind, Subject, Throttle, Verb
from fleetgate.stores.kill import SqliteKillStore


def subj(session: str, agent: str | None = None, role: str | None = None,
         user: str | None = None) -> Subject:
    return Subject(agent=agent or f"agent-{session}", session=session, role=role, user=user,
                   jti=f"jti-{session}")


def tree(graph: SessionGraph, edges: list[tuple[str | None, str]]) -> None:
    for parent, child in edges:
        graph.observe(subj(child), parent, now=0.0)


def stop(kind: ScopeKind, value: str | None, cascade: bool = False) -> Action:
    return Action(Verb.STOP, Scope(kind, value, cascade), "test", at=0.0)


# -- graph --------------------------------------------------------------------------------


def test_deep_chain_cascade_reaches_every_level() -> None:
    g = SessionGraph()
    chain = [f"s{i}" for i in range(40)]
    tree(g, [(None, chain[0])] + [(chain[i - 1], chain[i]) for i in range(1, 40)])
    assert g.get("s39").depth == 39
    assert g.descendants("s0") == chain[1:]
    board = KillBoard(g)
    board.apply(stop(ScopeKind.SESSION, "s0", cascade=True))
    for s in chain:
        v = board.verdict(subj(s), 0.0)
        assert v is not None and v.action.verb is Verb.STOP
    assert board.verdict(subj("s39"), 0.0).via == "s0"


def test_wide_tree_cascade_reaches_all_and_only_descendants() -> None:
    g = SessionGraph()
    edges: list[tuple[str | None, str]] = [(None, "root"), (None, "other")]
    for i in range(200):
        edges.append(("root", f"c{i}"))
        edges.append((f"c{i}", f"g{i}"))
    edges.append(("other", "bystander"))
    tree(g, edges)
    board = KillBoard(g)
    board.apply(stop(ScopeKind.SESSION, "root", cascade=True))
    assert len(g.descendants("root")) == 400
    assert all(board.verdict(subj(f"g{i}"), 0.0) for i in range(200))
    assert board.verdict(subj("other"), 0.0) is None
    assert board.verdict(subj("bystander"), 0.0) is None
    reach = board.reach(next(iter(board.actions.values())))
    assert reach.sessions == ("root",) and len(reach.descendants) == 400


def test_without_cascade_children_stay_live() -> None:
    g = SessionGraph()
    tree(g, [(None, "p"), ("p", "c")])
    board = KillBoard(g)
    board.apply(stop(ScopeKind.SESSION, "p"))
    assert board.verdict(subj("p"), 0.0) is not None
    assert board.verdict(subj("c"), 0.0) is None


def test_late_child_of_killed_parent_is_dead_on_arrival() -> None:
    g = SessionGraph()
    tree(g, [(None, "p")])
    board = KillBoard(g)
    board.apply(stop(ScopeKind.SESSION, "p", cascade=True))
    g.observe(subj("late"), "p", now=5.0)  # first seen after the kill
    v = board.verdict(subj("late"), 5.0)
    assert v is not None and v.via == "p"


def test_child_seen_before_its_parent_is_linked_through_a_placeholder() -> None:
    g = SessionGraph()
    g.observe(subj("child"), "parent", now=0.0)
    assert g.get("parent").via == "placeholder"
    board = KillBoard(g)
    board.apply(stop(ScopeKind.SESSION, "parent", cascade=True))
    assert board.verdict(subj("child"), 0.0) is not None
    g.observe(subj("grand"), None, now=0.0)
    g.observe(subj("parent"), "grand", now=1.0)  # the placeholder becomes real, under grand
    assert g.get("parent").via == "token" and g.get("child").depth == 2


def test_cycles_and_reparenting_are_refused() -> None:
    g = SessionGraph()
    tree(g, [(None, "a"), ("a", "b"), ("b", "c")])
    with pytest.raises(GraphError) as e:
        g.observe(subj("x"), "x", now=0.0)
    assert e.value.code == "cycle"
    with pytest.raises(GraphError) as e:
        g.observe(subj("b"), "c", now=0.0)  # b already belongs to a
    assert e.value.code == "reparent"
    g.observe(subj("a2"), "c", now=0.0)
    # a placeholder parent that is really a descendant: linking it would close a cycle
    g2 = SessionGraph()
    g2.observe(subj("kid"), "ghost", now=0.0)
    with pytest.raises(GraphError) as e:
        g2.observe(subj("ghost"), "kid", now=0.0)
    assert e.value.code == "cycle"


def test_graph_is_bounded_and_prunes_expired_leaves() -> None:
    g = SessionGraph(max_nodes=100)
    for i in range(250):
        g.observe(subj(f"s{i}"), None, now=float(i), exp=float(i))
    assert len(g) <= 100
    g2 = SessionGraph()
    g2.observe(subj("p"), None, now=0.0, exp=10.0)
    g2.observe(subj("c"), "p", now=0.0, exp=10.0)
    g2.observe(subj("live"), None, now=0.0, exp=10_000_000.0)
    assert sorted(g2.prune(now=100_000.0, grace=60.0)) == ["c", "p"]
    assert g2.get("live") is not None


# -- board --------------------------------------------------------------------------------


def test_strongest_action_wins_and_apply_is_idempotent() -> None:
    g = SessionGraph()
    tree(g, [(None, "s")])
    board = KillBoard(g)
    thr = Action(Verb.THROTTLE, Scope(ScopeKind.ROLE, "cloud"), "slow", at=0.0,
                 throttle=Throttle(2, 10.0))
    board.apply(thr)
    s = subj("s", role="cloud")
    assert board.verdict(s, 0.0).action.verb is Verb.THROTTLE
    _, new = board.apply(Action(Verb.THROTTLE, Scope(ScopeKind.ROLE, "cloud"), "again", at=1.0,
                                throttle=Throttle(2, 10.0)))
    assert new is False and len(board.actions) == 1
    board.apply(Action(Verb.PAUSE, Scope(ScopeKind.GLOBAL), "hold", at=0.0))
    assert board.verdict(s, 0.0).action.verb is Verb.PAUSE
    board.apply(stop(ScopeKind.USER, "alice"))
    assert board.verdict(subj("s", role="cloud", user="alice"), 0.0).action.verb is Verb.STOP
    assert board.verdict(s, 0.0).action.verb is Verb.PAUSE


def test_throttle_bucket_and_lift_rules() -> None:
    g = SessionGraph()
    board = KillBoard(g)
    board.apply(Action(Verb.THROTTLE, Scope(ScopeKind.AGENT, "a"), "x", at=0.0,
                       throttle=Throttle(2, 10.0)))
    board.apply(stop(ScopeKind.AGENT, "b"))
    v = board.verdict(Subject("a"), 0.0)
    assert [board.take(v, 0.0).ok for _ in range(3)] == [True, True, False]
    assert board.take(v, 10.0).ok
    # resume lifts throttles, not stops; lifting is by exact scope
    assert board.lift(Scope(ScopeKind.AGENT, "b"), [Verb.PAUSE, Verb.THROTTLE]) == []
    assert len(board.lift(Scope(ScopeKind.AGENT, "b"), [Verb.STOP])) == 1
    assert len(board.lift(Scope(ScopeKind.AGENT, "a"), [Verb.PAUSE, Verb.THROTTLE])) == 1
    assert board.verdict(Subject("a"), 0.0) is None


def test_timed_actions_expire() -> None:
    board = KillBoard(SessionGraph())
    board.apply(Action(Verb.PAUSE, Scope(ScopeKind.AGENT, "a"), "x", at=0.0, until=30.0))
    assert board.verdict(Subject("a"), 29.0) is not None
    assert board.verdict(Subject("a"), 30.0) is None
    assert len(board.expire(31.0)) == 1 and not board.actions


def test_scope_parsing_and_json_round_trip() -> None:
    with pytest.raises(ValueError, match="unknown scope"):
        Scope.parse("planet", "x")
    with pytest.raises(ValueError, match="needs a value"):
        Scope.parse("agent", "")
    a = Action(Verb.THROTTLE, Scope.parse("session", "s1", True), "r", throttle=Throttle(3, 5))
    assert Action.from_json(a.to_json()) == a
    assert a.scope.label == "session:s1+descendants"


# -- core + store: durable across a restart ----------------------------------------------


def test_core_survives_restart_and_logs_append_only(tmp_path: Path) -> None:
    db = tmp_path / "kill.sqlite"
    core = KillCore(SqliteKillStore(db), clock=lambda: 100.0)
    core.observe(subj("p"), None, exp=1e12)
    core.observe(subj("c"), "p", exp=1e12)
    applied = core.apply(Action(Verb.STOP, Scope(ScopeKind.SESSION, "p", True), "runaway",
                                at=100.0))
    assert applied.new and applied.reach.descendants == ("c",)
    assert core.apply(Action(Verb.STOP, Scope(ScopeKind.SESSION, "p", True), "again")).new is False
    core.record_cut(applied.action, "killswitch.stop", {"method": "POST", "host": "h"})
    core.store.close()

    again = KillCore(SqliteKillStore(db), clock=lambda: 200.0)
    assert again.load() == 1
    v = again.verdict(subj("c"))
    assert v is not None and v.via == "p"  # graph and action both came back
    again.observe(subj("late"), "c", exp=1e12)
    assert again.verdict(subj("late")) is not None
    log = again.store.log()
    assert [r["event"] for r in log] == ["action", "cut"]
    assert log[0]["descendants"] == ["c"] and log[1]["host"] == "h"
    again.lift(Scope(ScopeKind.SESSION, "p"), [Verb.STOP], by="ops", reason="fixed")
    assert again.verdict(subj("c")) is None
    assert [r["event"] for r in again.store.log()] == ["action", "cut", "lift"]
    again.store.close()
    third = KillCore(SqliteKillStore(db), clock=lambda: 300.0)
    assert third.load() == 0


def test_rules_actions_replace_not_accumulate() -> None:
    core = KillCore(SqliteKillStore(None), clock=lambda: 0.0)
    a = Action(Verb.STOP, Scope(ScopeKind.AGENT, "x"), "r", source="rules", id="rules-1")
    b = Action(Verb.STOP, Scope(ScopeKind.AGENT, "y"), "r", source="rules", id="rules-2")
    applied, lifted = core.set_rules_actions([a, b])
    assert len(applied) == 2 and not lifted
    applied, lifted = core.set_rules_actions([b])
    assert not applied and [x.id for x in lifted] == ["rules-1"]
    assert core.verdict(Subject("x")) is None and core.verdict(Subject("y")) is not None
    assert core.store.actions() == []  # the rules file is their durable home


def test_expired_action_is_dropped_at_load(tmp_path: Path) -> None:
    db = tmp_path / "k.sqlite"
    core = KillCore(SqliteKillStore(db), clock=lambda: 0.0)
    core.apply(Action(Verb.PAUSE, Scope(ScopeKind.AGENT, "a"), "r", at=0.0, until=10.0))
    core.store.close()
    later = KillCore(SqliteKillStore(db), clock=lambda: 11.0)
    assert later.load() == 0 and later.store.actions() == []


# -- delegation ---------------------------------------------------------------------------

POLICY = DelegationPolicy(roles={"coordinator": frozenset({"security", "cloud"}),
                                 "security": frozenset({"general"})},
                          max_depth=2, max_children=2, max_ttl=600)


def parent_claims(session: str = "root", role: str = "coordinator", exp: float = 10_000.0
                  ) -> dict[str, object]:
    return {"sub": "coord", "agent_role": role, "session_id": session, "exp": exp,
            "user": "alice", "iss": "idp", "custom": "not inherited"}


def test_child_scope_only_narrows() -> None:
    g = SessionGraph()
    g.observe(subj("root"), None, now=0.0)
    c = child_claims(parent_claims(), {"role": "security", "ttl": 60}, POLICY, g, now=1000.0)
    assert c["agent_role"] == "security" and c["parent_session"] == "root"
    assert c["exp"] == 1060 and c["delegation_depth"] == 1
    assert c["user"] == "alice" and c["iss"] == "idp" and "custom" not in c
    assert c["sub"].startswith("coord/security-")
    capped = child_claims(parent_claims(exp=1100.0), {"role": "cloud", "ttl": 99999}, POLICY, g,
                          now=1000.0)
    assert capped["exp"] == 1100  # never outlives the parent
    for req, code in (({"role": "general"}, "delegation.role"),
                      ({}, "delegation.bad_request"),
                      ({"role": "cloud", "ttl": -1}, "delegation.bad_request"),
                      ({"role": "cloud", "name": "../x"}, "delegation.bad_request")):
        with pytest.raises(DelegationError) as e:
            child_claims(parent_claims(), req, POLICY, g, now=1000.0)
        assert e.value.code == code


def test_depth_and_fanout_limits() -> None:
    g = SessionGraph()
    g.observe(subj("root"), None, now=0.0)
    for i in range(2):
        g.observe(subj(f"k{i}"), "root", now=0.0)
    with pytest.raises(DelegationError) as e:
        child_claims(parent_claims(), {"role": "security"}, POLICY, g, now=0.0)
    assert e.value.code == "delegation.fanout"
    g.observe(subj("k0a"), "k0", now=0.0)  # depth 2
    with pytest.raises(DelegationError) as e:
        child_claims(parent_claims("k0a", "security"), {"role": "general"}, POLICY, g, now=0.0)
    assert e.value.code == "delegation.depth"
    with pytest.raises(DelegationError) as e:
        child_claims({"sub": "x", "agent_role": "coordinator", "exp": 1e9}, {"role": "cloud"},
                     POLICY, g, now=0.0)
    assert e.value.code == "delegation.no_session"


def test_verdict_with_many_actions_in_force_uses_every_scope_kind() -> None:
    g = SessionGraph()
    g.observe(subj("child", agent="kid", role="general", user="bob"), "ghost", now=0.0)
    board = KillBoard(g)
    for i in range(500):  # an incident's worth of unrelated actions
        board.apply(stop(ScopeKind.AGENT, f"other-{i}", cascade=True))
    kid = subj("child", agent="kid", role="general", user="bob")
    assert board.verdict(kid, 0.0) is None
    # the placeholder parent is known by its session only: an agent-scoped cascade on ""
    # (what a placeholder's agent would be) must not reach the child
    board.apply(stop(ScopeKind.AGENT, "x", cascade=True))
    assert board.verdict(kid, 0.0) is None
    board.apply(Action(Verb.PAUSE, Scope(ScopeKind.USER, "bob"), "u", at=0.0))
    assert board.verdict(kid, 0.0).action.verb is Verb.PAUSE
    board.apply(stop(ScopeKind.SESSION, "ghost", cascade=True))
    v = board.verdict(kid, 0.0)
    assert v.action.verb is Verb.STOP and v.via == "ghost"
    assert board.lift(Scope(ScopeKind.SESSION, "ghost"), [Verb.STOP])
    assert board.verdict(kid, 0.0).action.verb is Verb.PAUSE
    assert board.reach(stop(ScopeKind.SESSION, "ghost", cascade=True)).descendants == ("child",)


def test_sessions_are_written_behind_not_on_the_request_path(tmp_path: Path) -> None:
    db = tmp_path / "k.sqlite"
    core = KillCore(SqliteKillStore(db), clock=lambda: 0.0)
    core.observe(subj("p"), None, exp=1e12)
    core.observe(subj("c"), "p", exp=1e12)
    assert core.store.nodes() == []  # seen: in memory only
    assert core.verdict(subj("c")) is None and core.graph.get("c") is not None
    core.flush()
    assert sorted(n.session for n in core.store.nodes()) == ["c", "p"]
    core.observe(subj("d"), "c", exp=1e12)
    core.apply(Action(Verb.STOP, Scope(ScopeKind.SESSION, "c", True), "r", at=0.0))
    core.store.close()  # an action saved has the sessions it reached saved beside it
    again = KillCore(SqliteKillStore(db), clock=lambda: 1.0)
    assert again.load() == 1 and again.verdict(subj("d")) is not None
