"""Automatic kill-switch triggers: thresholds, windows, the escalation ladder, keys, hot
reload, memory bounds and the rules YAML form. Pure: every call gets its time injected."""

from __future__ import annotations

import math
from typing import Any

import pytest

from fleetgate.kill.model import Scope, ScopeKind, Subject, Throttle, Verb
from fleetgate.kill.triggers import (
    MAX_FINGERPRINTS,
    Event,
    Firing,
    Metric,
    TriggerEngine,
    TriggerSpec,
    request_fingerprint,
)
from fleetgate.policy.parse_triggers import parse_triggers
from fleetgate.policy.report import Reporter

GEN = Subject("gen-1", session="s1", role="general")
GEN2 = Subject("gen-2", session="s1", role="general")
CLOUD = Subject("cloud-1", session="s9", role="cloud")
NO_SESSION = Subject("gen-3", role="general")


def spec(metric: str, above: float, **kw: Any) -> TriggerSpec:
    return TriggerSpec(id=kw.pop("id", "t"), metric=Metric(metric), above=above, **kw)


def req(subject: Subject = GEN, **kw: Any) -> Event:
    return Event.request(subject, **kw)


def resp(subject: Subject = GEN, **kw: Any) -> Event:
    return Event.response(subject, **kw)


def run(engine: TriggerEngine, events: list[Event], start: float = 0.0,
        step: float = 1.0) -> list[list[Firing]]:
    return [engine.observe(ev, start + i * step) for i, ev in enumerate(events)]


# -- thresholds ---------------------------------------------------------------------------

THRESHOLDS = [
    # (spec, events that reach the limit exactly, the event that passes it)
    (spec("requests", 3), [req(), req(), req(), resp()], req()),
    (spec("tokens", 100), [resp(tokens=60), req(), resp(tokens=40)], resp(tokens=1)),
    (spec("tokens", 100), [req(tokens=100)], req(tokens=1)),  # counted on any event
    (spec("usd", 1.0), [resp(usd=0.5), resp(usd=0.5)], resp(usd=0.25)),
    (spec("errors", 2), [resp(error=True), resp(), resp(error=True), req()], resp(error=True)),
    (spec("denials", 2), [req(denied=True), req(), req(denied=True)], req(denied=True)),
    (spec("error_rate", 0.5, min_requests=4),
     [resp(error=True), resp(), resp(error=True), resp()], resp(error=True)),
    (spec("denial_rate", 0.5, min_requests=4),
     [req(denied=True), req(), req(denied=True), req()], req(denied=True)),
    (spec("identical_requests", 3), [req(fingerprint="f"), req(fingerprint="f")],
     req(fingerprint="f")),
    (spec("message_depth", 5), [req(message_depth=5), req(message_depth=1)],
     req(message_depth=6)),
    (spec("delegation_depth", 3), [req(delegation_depth=3)], req(delegation_depth=4)),
    (spec("delegation_fanout", 10), [req(delegation_fanout=10)], req(delegation_fanout=11)),
]


@pytest.mark.parametrize(("trigger", "before", "breach"), THRESHOLDS,
                         ids=[f"{t.metric.value}-{i}" for i, (t, _, _) in enumerate(THRESHOLDS)])
def test_each_metric_breaches_exactly_past_its_limit(trigger: TriggerSpec, before: list[Event],
                                                     breach: Event) -> None:
    engine = TriggerEngine([trigger])
    assert run(engine, before) == [[] for _ in before]
    fired = engine.observe(breach, len(before))
    assert [(f.trigger, f.verb, f.step) for f in fired] == [("t", Verb.THROTTLE, 0)]


def test_identical_requests_breach_at_the_limit_not_past_it() -> None:
    engine = TriggerEngine([spec("identical_requests", 3)])
    fired = run(engine, [req(fingerprint="f")] * 3)
    assert [len(f) for f in fired] == [0, 0, 1]


def test_varied_requests_are_not_identical() -> None:
    engine = TriggerEngine([spec("identical_requests", 3)])
    fired = run(engine, [req(fingerprint=f"f{i}") for i in range(50)]
                + [req() for _ in range(10)])  # no fingerprint: not judged
    assert not any(fired)
    assert run(engine, [req(fingerprint="f7")] * 2, start=100) == [[], []]  # 1 left in window
    engine2 = TriggerEngine([spec("identical_requests", 3)])
    mixed = [req(fingerprint="loop") if i % 2 else req(fingerprint=f"v{i}") for i in range(6)]
    assert [len(f) for f in run(engine2, mixed)] == [0, 0, 0, 0, 0, 1]


def test_rates_wait_for_min_requests() -> None:
    engine = TriggerEngine([spec("error_rate", 0.5, min_requests=10)])
    fired = run(engine, [resp(error=True)] * 10)
    assert [len(f) for f in fired] == [0] * 9 + [1]
    # requests are not the error rate's denominator: responses are
    engine = TriggerEngine([spec("error_rate", 0.5, min_requests=3)])
    assert not any(run(engine, [req(), req(), req(), resp(error=True), resp(error=True)]))
    assert engine.observe(resp(error=True), 10)


# -- windows ------------------------------------------------------------------------------

def test_a_breach_needs_its_events_inside_the_window() -> None:
    engine = TriggerEngine([spec("requests", 2, window=10)])
    assert engine.observe(req(), 0) == []
    assert engine.observe(req(), 1) == []
    assert engine.observe(req(), 10) == []        # the request at 0 has left (10 - 0 >= 10)
    assert engine.observe(req(), 10.5)            # 1, 10, 10.5: three within 10s


def test_spend_window_slides() -> None:
    engine = TriggerEngine([spec("usd", 1.0, window=3600)])
    assert engine.observe(resp(usd=0.75), 0) == []
    assert engine.observe(resp(usd=0.25), 1800) == []
    assert engine.observe(resp(usd=0.5), 3600) == []   # 0.75 expired: 0.75 in window
    assert engine.observe(resp(usd=0.3), 3601)          # 1.05


def test_identical_requests_expire_from_the_window() -> None:
    engine = TriggerEngine([spec("identical_requests", 3, window=60)])
    assert run(engine, [req(fingerprint="f")] * 2) == [[], []]   # at 0 and 1
    assert engine.observe(req(fingerprint="f"), 60) == []         # 0 has left: 1, 60
    assert engine.observe(req(fingerprint="f"), 60.5)             # 1, 60, 60.5


def test_a_clock_stepping_back_counts_as_standing_still() -> None:
    engine = TriggerEngine([spec("requests", 1, window=10)])
    engine.observe(req(), 100)
    assert engine.observe(req(), 50)  # treated as 100: both in the window


# -- ladder -------------------------------------------------------------------------------

def test_ladder_climbs_throttle_pause_stop_respecting_cooldown() -> None:
    engine = TriggerEngine([spec("requests", 0, id="flood", cooldown=30, hold=600)])
    seen: dict[float, list[Firing]] = {}
    for t in (0, 10, 29.9, 30, 45, 59.9, 60, 100, 650, 1249.9, 1850):
        seen[t] = engine.observe(req(), t)
    assert {t: [(f.verb, f.step) for f in fs] for t, fs in seen.items() if fs} == {
        0: [(Verb.THROTTLE, 0)], 30: [(Verb.PAUSE, 1)], 60: [(Verb.STOP, 2)],
        # the last step never fires again while breaches go on; a key quiet for `hold`
        # (an operator resumed it, then it misbehaved again) starts over
        1850: [(Verb.THROTTLE, 0)]}
    throttle, pause, stop = seen[0][0], seen[30][0], seen[60][0]
    assert (throttle.until, throttle.throttle) == (600, Throttle(1, 10.0))
    assert (pause.until, pause.throttle) == (630, None)
    assert stop.until is None  # a stop never lifts itself
    assert throttle.scope == Scope(ScopeKind.AGENT, "gen-1", cascade=False)


def test_no_refiring_on_the_same_step() -> None:
    engine = TriggerEngine([spec("requests", 0, cooldown=30)])
    fired = [f for t in range(30) for f in engine.observe(req(), t * 0.5)]
    assert [f.verb for f in fired] == [Verb.THROTTLE]


def test_single_step_ladder_fires_once() -> None:
    engine = TriggerEngine([spec("message_depth", 5, ladder=(Verb.STOP,))])
    fired = [f for t in range(100) for f in engine.observe(req(message_depth=9), t * 10)]
    assert [(f.verb, f.until) for f in fired] == [(Verb.STOP, None)]


def test_ladder_resets_after_hold_without_breach() -> None:
    engine = TriggerEngine([spec("requests", 0, cooldown=30, hold=600)])
    assert engine.observe(req(), 0)[0].verb is Verb.THROTTLE
    assert engine.observe(req(), 600)[0].verb is Verb.THROTTLE  # quiet for 600s: step 0 again
    engine = TriggerEngine([spec("requests", 0, cooldown=30, hold=600)])
    engine.observe(req(), 0)
    assert engine.observe(req(), 599.9)[0].verb is Verb.PAUSE   # not quiet long enough


def test_well_behaved_traffic_after_a_breach_resets_the_ladder() -> None:
    engine = TriggerEngine([spec("requests", 2, window=10, hold=600)])
    assert [len(f) for f in run(engine, [req()] * 3)] == [0, 0, 1]
    for t in range(20, 700, 20):  # one request every 20s: never more than 2 in 10s
        assert engine.observe(req(), t) == []
    fired = run(engine, [req()] * 3, start=700, step=0.1)
    assert [f.verb for fs in fired for f in fs] == [Verb.THROTTLE]


def test_to_action_names_the_trigger() -> None:
    firing = TriggerEngine([spec("requests", 0, id="flood")]).observe(req(), 1000)[0]
    action = firing.to_action(1000)
    assert (action.verb, action.scope, action.source, action.by, action.at, action.until) == (
        Verb.THROTTLE, Scope(ScopeKind.AGENT, "gen-1"), "trigger:flood", "flood", 1000, 1600)
    assert action.throttle == Throttle(1, 10.0)
    assert action.reason == firing.reason


def test_reasons_carry_the_figures() -> None:
    loop = TriggerEngine([spec("identical_requests", 5, id="runaway-loop")])
    fired = [f for t in range(5) for f in loop.observe(req(fingerprint="x"), t)]
    assert fired[0].reason == ("trigger runaway-loop: 5 identical requests within 60s (limit 5); "
                               "escalation step 1 of 3: throttle to 1 request(s) per 10s, "
                               "lifts after 10m")
    spend = TriggerEngine([spec("usd", 5, id="spend", window=3600, ladder=(Verb.PAUSE,))])
    assert spend.observe(resp(usd=5.5), 0)[0].reason == (
        "trigger spend: $5.50 spent within 1h (limit $5.00); escalation step 1 of 1: pause, "
        "lifts after 10m")
    rate = TriggerEngine([spec("error_rate", 0.5, id="errs", min_requests=4,
                               ladder=(Verb.STOP,))])
    fired = [f for t, e in enumerate([True, True, False, True]) for f in
             rate.observe(resp(error=e), t)]
    assert fired[0].reason == ("trigger errs: error rate 75% (3 of 4 responses) within 60s "
                               "(limit 50%); escalation step 1 of 1: stop")


# -- keys ---------------------------------------------------------------------------------

def test_role_filter() -> None:
    engine = TriggerEngine([spec("requests", 0, roles=frozenset({"general"}))])
    assert engine.observe(req(CLOUD), 0) == []
    assert len(engine) == 0  # nothing tracked for identities the trigger does not watch
    assert engine.observe(req(GEN), 0)


def test_agent_filter_or_role_filter() -> None:
    engine = TriggerEngine([spec("requests", 0, roles=frozenset({"general"}),
                                 agents=frozenset({"cloud-1"}))])
    assert engine.observe(req(CLOUD), 0)
    assert engine.observe(req(Subject("sec-1", role="security")), 0) == []


def test_session_trigger_counts_the_whole_session_and_cascades() -> None:
    per_session = TriggerEngine([spec("requests", 3, per=ScopeKind.SESSION)])
    per_agent = TriggerEngine([spec("requests", 3)])
    events = [req(GEN), req(GEN2), req(GEN), req(GEN2)]  # 2 each, 4 in session s1
    assert [len(f) for f in run(per_agent, events)] == [0, 0, 0, 0]
    fired = run(per_session, events)
    assert [len(f) for f in fired] == [0, 0, 0, 1]
    assert fired[3][0].scope == Scope(ScopeKind.SESSION, "s1", cascade=True)


def test_session_trigger_skips_subjects_without_session() -> None:
    engine = TriggerEngine([spec("requests", 0, per=ScopeKind.SESSION)])
    assert engine.observe(req(NO_SESSION), 0) == []
    assert len(engine) == 0


def test_keys_are_independent() -> None:
    engine = TriggerEngine([spec("requests", 1)])
    run(engine, [req(GEN), req(GEN)])
    assert engine.observe(req(GEN2), 2) == []
    assert engine.observe(req(GEN2), 3)[0].scope.value == "gen-2"


# -- hot reload ---------------------------------------------------------------------------

def test_replace_keeps_unchanged_triggers_state() -> None:
    flood = spec("requests", 0, id="flood", cooldown=30)
    tokens = spec("tokens", 10, id="tokens")
    engine = TriggerEngine([flood, tokens])
    assert [f.trigger for f in engine.observe(resp(tokens=11), 0)] == ["tokens"]
    assert [f.trigger for f in engine.observe(req(), 1)] == ["flood"]
    engine.replace([flood, spec("tokens", 20, id="tokens"), spec("errors", 0, id="new")])
    # flood kept its ladder: its next step is pause, not a fresh throttle
    assert [(f.trigger, f.verb) for f in engine.observe(req(), 40)] == [("flood", Verb.PAUSE)]
    # the changed trigger started over: its window is empty again
    assert engine.observe(resp(tokens=15), 41) == []
    assert [(f.trigger, f.verb) for f in engine.observe(resp(tokens=6), 42)] == [
        ("tokens", Verb.THROTTLE)]
    engine.replace([spec("errors", 0, id="new")])
    assert {row["trigger"] for row in engine.snapshot(43)} <= {"new"}


def test_replace_refuses_duplicate_ids() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        TriggerEngine([spec("requests", 1, id="x"), spec("tokens", 1, id="x")])


def test_snapshot_reports_step_and_value() -> None:
    engine = TriggerEngine([spec("requests", 2, id="flood", window=10),
                            spec("identical_requests", 10, id="loop")])
    run(engine, [req(fingerprint="a")] * 3 + [req(fingerprint="b")])
    rows = {(r["trigger"], r["key"]): r for r in engine.snapshot(4)}
    assert rows[("flood", "gen-1")] | {} == {
        "trigger": "flood", "metric": "requests", "per": "agent", "key": "gen-1", "step": 0,
        "verb": "throttle", "since": 2.0, "value": 4.0, "above": 2.0}
    assert rows[("loop", "gen-1")]["value"] == 3.0 and rows[("loop", "gen-1")]["step"] is None
    later = {r["trigger"]: r for r in engine.snapshot(2000)}
    assert later["flood"]["value"] == 0.0 and later["flood"]["step"] is None  # reset by hold


# -- memory -------------------------------------------------------------------------------

def test_at_most_max_keys_least_recently_used_evicted() -> None:
    engine = TriggerEngine([spec("requests", 100)], max_keys=3)
    for i in range(3):
        engine.observe(req(Subject(f"a{i}")), i)
    engine.observe(req(Subject("a0")), 3)        # a0 is now the most recent
    engine.observe(req(Subject("a3")), 4)        # evicts a1
    engine.observe(req(Subject("a4")), 5)        # evicts a2
    assert len(engine) == 3
    assert {r["key"] for r in engine.snapshot(6)} == {"a0", "a3", "a4"}


def test_session_and_agent_keys_share_the_bound() -> None:
    engine = TriggerEngine([spec("requests", 100), spec("requests", 100, id="s",
                                                        per=ScopeKind.SESSION)], max_keys=2)
    engine.observe(req(GEN), 0)
    engine.observe(req(CLOUD), 1)
    assert len(engine) == 2


def test_fingerprints_per_key_are_bounded() -> None:
    def replay(others: int) -> bool:
        engine = TriggerEngine([spec("identical_requests", 3, window=1e6)])
        run(engine, [req(fingerprint="loop")] * 2)
        run(engine, [req(fingerprint=f"x{i}") for i in range(others)], start=10, step=0.001)
        return bool(engine.observe(req(fingerprint="loop"), 100))
    assert replay(MAX_FINGERPRINTS - 1)       # still remembered
    assert not replay(MAX_FINGERPRINTS)       # least recently seen, evicted


def test_window_memory_is_bounded_not_per_event() -> None:
    engine = TriggerEngine([spec("requests", 1e9, window=60)])
    for i in range(100_000):
        engine.observe(req(), i * 0.0006)     # 100,000 requests within 60s
    assert engine.snapshot(60)[0]["value"] == 100_000
    (state,) = next(iter(engine._keys.values())).values()
    assert state.window is not None and len(state.window.entries) <= 257


# -- types --------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    {"ladder": (Verb.PAUSE, Verb.THROTTLE)}, {"ladder": (Verb.STOP, Verb.STOP)}, {"ladder": ()},
    {"per": ScopeKind.ROLE}, {"window": 0}, {"hold": 0}, {"cooldown": -1},
    {"min_requests": 0}, {"above": -1}, {"above": math.nan},
])
def test_spec_rejects_nonsense(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        spec(kw.pop("metric", "requests"), kw.pop("above", 1), **kw)


def test_rate_limits_are_fractions() -> None:
    with pytest.raises(ValueError, match="fraction"):
        spec("error_rate", 50)


@pytest.mark.parametrize("make", [
    lambda: Event(GEN, "response", fingerprint="f"), lambda: Event(GEN, "request", error=True),
    lambda: resp(usd=-1), lambda: resp(usd=math.nan), lambda: resp(tokens=-5),
])
def test_event_rejects_nonsense(make: Any) -> None:
    with pytest.raises(ValueError):
        make()


def test_request_fingerprint() -> None:
    a = request_fingerprint("post", "API.example.com", "/v1/x", b"{}")
    assert a == request_fingerprint("POST", "api.example.com", "/v1/x", b"{}")
    assert a != request_fingerprint("POST", "api.example.com", "/v1/x", b"{ }")
    assert a != request_fingerprint("POST", "api.example.com", "/v1/x/", b"{}")


# -- rules YAML ---------------------------------------------------------------------------

class Collect(Reporter):
    """A reporter that also keeps (key path, message) pairs, in order."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("rules.yaml")
        self.pairs = problems

    def error(self, path: str, message: str) -> None:
        super().error(path, message)
        self.pairs.append((path, message))


def collect() -> tuple[list[tuple[str, str]], Reporter]:
    problems: list[tuple[str, str]] = []
    return problems, Collect(problems)


def test_parse_triggers_full_entry() -> None:
    problems, err = collect()
    specs = parse_triggers([
        {"id": "runaway-loop", "metric": "identical_requests", "above": 5, "window": "1m",
         "per": "session", "roles": ["general"], "ladder": ["throttle", "stop"],
         "throttle": {"requests": 2, "per": "30s"}, "hold": "5m", "cooldown": 0},
        {"id": "errs", "metric": "error_rate", "above": 0.5, "minRequests": 20, "window": 300},
    ], "killswitch.triggers", err)
    assert problems == []
    assert specs == [
        TriggerSpec("runaway-loop", Metric.IDENTICAL_REQUESTS, 5, window=60,
                    per=ScopeKind.SESSION, roles=frozenset({"general"}),
                    ladder=(Verb.THROTTLE, Verb.STOP), throttle=Throttle(2, 30), hold=300,
                    cooldown=0),
        TriggerSpec("errs", Metric.ERROR_RATE, 0.5, window=300, min_requests=20),
    ]


def test_parse_triggers_reports_located_problems_and_keeps_valid_ones() -> None:
    problems, err = collect()
    specs = parse_triggers([
        {"metric": "requests", "above": 1},                                    # [0] no id
        {"id": "a", "metric": "requests", "above": 1, "bogus": 1},             # [1]
        {"id": "b", "metric": "requests", "above": 1, "ladder": ["stop", "pause"]},  # [2]
        {"id": "c", "metric": "karma", "above": 1},                            # [3]
        {"id": "d", "metric": "message_depth", "above": 5, "window": "60s"},   # [4]
        {"id": "e", "metric": "requests", "above": 1, "per": "role"},          # [5]
        {"id": "ok", "metric": "requests", "above": 1},                        # [6]
        {"id": "ok", "metric": "tokens", "above": 1},                          # [7] duplicate
        {"id": "f", "metric": "tokens", "above": 1, "minRequests": 5},         # [8]
        {"id": "g", "metric": "error_rate", "above": 2},                       # [9]
        {"id": "h", "metric": "requests", "above": 1, "throttle": {"requests": 0}},  # [10]
        {"id": "i", "metric": "requests", "above": "many"},                    # [11]
        {"id": "j", "metric": "requests", "above": 1, "window": "soon"},       # [12]
        "requests > 5",                                                        # [13]
        {"id": "k", "metric": "requests", "above": 1, "ladder": ["explode"]},  # [14]
    ], "killswitch.triggers", err)
    assert [s.id for s in specs] == ["ok"]
    paths = [p for p, _ in problems]
    assert paths == [
        "killswitch.triggers[0].id", "killswitch.triggers[1].bogus",
        "killswitch.triggers[2].ladder", "killswitch.triggers[3].metric",
        "killswitch.triggers[4].window", "killswitch.triggers[5].per",
        "killswitch.triggers[7].id", "killswitch.triggers[8].minRequests",
        "killswitch.triggers[9].above", "killswitch.triggers[10].throttle",
        "killswitch.triggers[11].above", "killswitch.triggers[12].window",
        "killswitch.triggers[13]", "killswitch.triggers[14].ladder",
    ]
    assert "duplicate trigger id 'ok'" in problems[6][1]
    assert "grow in strength" in problems[2][1]


def test_parse_triggers_needs_a_list() -> None:
    problems, err = collect()
    assert parse_triggers({"id": "x"}, "killswitch.triggers", err) == []
    assert problems[0][0] == "killswitch.triggers"
    assert parse_triggers(None, "killswitch.triggers", err) == []
