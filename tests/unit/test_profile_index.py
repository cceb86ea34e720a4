"""The profile index (fleetgate.policy.profile_index) never changes a decision: for random
claims and a random mix of indexable and unindexable selectors, ``decide`` with the index
gives exactly what the linear walk over every profile's ``match`` gives (kept here as the
reference), including which profiles select, the "lacks a claim" message, selector errors
that deny and report-mode selector errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetgate.celexpr import Activation, CelError, MissingField, compile_expr
from fleetgate.netaddr import HostPattern
from fleetgate.normalize import request_facts
from fleetgate.policy.decide import Decision, decide
from fleetgate.policy.model import AgentProfile, Policy, Revocations
from fleetgate.policy.profile_index import ProfileIndex, selector_key
from fleetgate.rule import Effect, Mode, Rule, WouldDeny

ROOTS = ("jwt", "request")
CLAIMS = ("agent_role", "agent_id", "sub", "team")
VALUES = ("a", "b", "c")

# selector templates: {c}/{d} a claim, {v}/{w} a value
INDEXABLE = [
    'jwt.{c} == "{v}"', '"{v}" == jwt.{c}', 'jwt["{c}"] == "{v}"', 'jwt.{c} in ["{v}", "{w}"]',
    'has(jwt.{c}) && jwt.{c} == "{v}"', 'jwt.{c} == "{v}" || jwt.{c} == "{w}"',
    '(jwt.{c} == "{v}" || jwt.{c} == "{w}") && request.method == "GET"',
    'jwt.{c} == "{v}" && request.method == "POST"', 'jwt.{c} == "{v}" && jwt.{d} == "{w}"',
    'jwt.{d}.startsWith("{w}") && jwt.{c} == "{v}"', 'jwt.{c} == "{v}" && int(jwt.{d}) > 0',
    "jwt.{c} == r'{v}'", 'jwt.{c} == "{v}" && size(jwt.{c}) == 1',
]
UNINDEXABLE = [
    'jwt.{c} != "{v}"', 'jwt.{c}.startsWith("{v}")', "true", 'int(jwt.{c}) > 0',
    'jwt.{c} == "{v}" || jwt.{d} == "{w}"', '!(jwt.{c} == "{v}")',
    'jwt.{c} == "{v}" ? true : false', '"{c}" in jwt', 'jwt.{c} == "{v}" || true',
    'has(jwt.{c}) ? jwt.{c} == "{v}" : jwt.{d} == "{w}"',
]

selectors = st.builds(
    lambda t, c, d, v, w: t.format(c=c, d=d, v=v, w=w),
    st.sampled_from(INDEXABLE + UNINDEXABLE), st.sampled_from(CLAIMS), st.sampled_from(CLAIMS),
    st.sampled_from(VALUES), st.sampled_from(VALUES))
claim_values = st.one_of(st.sampled_from((*VALUES, "d", "", "1", "A")), st.integers(-1, 2),
                         st.none(), st.booleans(), st.lists(st.sampled_from(VALUES), max_size=2))
tokens = st.dictionaries(st.sampled_from(CLAIMS), claim_values)
modes = st.sampled_from([Mode.ENFORCE, Mode.ENFORCE, Mode.REPORT])

ALLOW = Rule(id="allow-all", effect=Effect.ALLOW, expr=compile_expr("true", ROOTS))


def make_policy(entries: list[tuple[str, Mode]]) -> Policy:
    agents = tuple(
        AgentProfile(name=f"p{i}", match=compile_expr(src, ROOTS),
                     egress=(HostPattern("api.example.com"),), rules=(ALLOW,), mode=mode)
        for i, (src, mode) in enumerate(entries))
    return Policy(revision="t", files=(), rules=(), agents=agents, revoked=Revocations(),
                  allow_private=())


def linear_select(policy: Policy, claims: Mapping[str, Any], activation: Activation) -> Any:
    """The reference: every profile's match, in file order (decide's walk before the index).
    Returns the deny a selector error causes, or (selected names, lacking, reported)."""
    profiles: list[str] = []
    lacking: list[str] = []
    reported: list[WouldDeny] = []
    for profile in policy.agents:
        try:
            if profile.match.evaluate(activation):
                profiles.append(profile.name)
        except MissingField as exc:
            lacking.append(f"{profile.name} ({exc})")
        except CelError as exc:
            why = (f"agent selector {profile.name!r} could not be evaluated ({exc}); "
                   "denied rather than guessed")
            if profile.mode is Mode.REPORT:
                reported.append(WouldDeny(f"{profile.name}.match", why))
                continue
            return Decision.deny(f"{profile.name}.match", why, would_deny=tuple(reported))
    return profiles, lacking, reported


def linear_decide(policy: Policy, claims: Mapping[str, Any], method: str) -> Decision:
    """``decide`` on the same policy with an index that lists every profile: the walk."""
    class Everything(ProfileIndex):
        def candidates(self, claims: Mapping[str, Any]) -> tuple[list[int], list[tuple[int, str]]]:
            return list(range(len(policy.agents))), []

    ref = Policy(**{f: getattr(policy, f) for f in policy.__dataclass_fields__})
    ref.__dict__["profile_index"] = Everything(())
    return decide(ref, claims, facts(method))


def facts(method: str) -> Any:
    return request_facts(method, "https", "api.example.com", 443, "/v1/x",
                         [("host", "api.example.com")])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(selectors, modes), min_size=1, max_size=12),
       st.lists(tokens, min_size=1, max_size=6), st.sampled_from(["GET", "POST"]))
def test_indexed_decision_equals_linear_walk(entries: list[tuple[str, Mode]],
                                             tokens_: list[dict[str, Any]], method: str) -> None:
    policy = make_policy(entries)
    for claims in tokens_:
        indexed = decide(policy, claims, facts(method))
        assert indexed == linear_decide(policy, claims, method), (entries, claims)
        # and the walk itself, spelled out: the same selection as the indexed decision
        ref = linear_select(policy, claims, Activation({"jwt": dict(claims),
                                                        "request": facts(method).to_cel(
                                                            policy.cel_inputs)}))
        if isinstance(ref, Decision):
            assert indexed == ref
        else:
            names, lacking, reported = ref
            assert indexed.profiles == tuple(names) or not names
            assert indexed.would_deny[:len(reported)] == tuple(reported)
            if not names:
                assert indexed.rule == "no-profile"
                for text in lacking[:3]:
                    assert text in indexed.reason


@pytest.mark.parametrize(("source", "key"), [
    ('jwt.agent_role == "x"', ("agent_role", {"x"}, True)),
    ('jwt.agent_role in ["a","b"]', ("agent_role", {"a", "b"}, True)),
    ('has(jwt.agent_role) && jwt.agent_role == "x"', ("agent_role", {"x"}, True)),
    ('jwt.sub == "spiffe://corp/agent/7"', ("sub", {"spiffe://corp/agent/7"}, True)),
    ('jwt.agent_role == "x" && request.host.endsWith(".corp")', ("agent_role", {"x"}, False)),
    ('request.method == "GET" && jwt["team"] == "a\\"b"', ("team", {'a"b'}, False)),
    ('(jwt.r == "a" || jwt.r == "b") && jwt.t == "c"', ("r", {"a", "b"}, False)),
    ("jwt.r in ['a b', \"\", r'\\d', '''t'''] && true", ("r", {"a b", "", "\\d", "t"}, True)),
])
def test_recognises_the_common_selectors(source: str, key: tuple[str, set[str], bool]) -> None:
    assert selector_key(source) == (key[0], frozenset(key[1]), key[2])


@pytest.mark.parametrize("source", [
    'jwt.r == "a" || request.method == "GET"', 'jwt.r != "a"', '!(jwt.r == "a")',
    'jwt.r == "a" ? true : false', 'request.method == "GET" // && jwt.r == "a"',
    'jwt.r == "a" + "b"', 'jwt.r == 1', 'jwt.r in ["a", 1]', 'jwt.r == "a" == true',
    'jwt.r.startsWith("a")', 'jwt.?r == "a"',
])
def test_does_not_index_what_it_cannot_prove(source: str) -> None:
    assert selector_key(source) is None


def test_thousand_profiles_evaluate_only_the_ones_that_can_select() -> None:
    policy = make_policy([(f'jwt.agent_id == "agent-{i:04d}"', Mode.ENFORCE) for i in range(1000)]
                         + [('jwt.team.startsWith("x")', Mode.ENFORCE)])
    assert policy.profile_index.indexed == 1000
    order, lacking = policy.profile_index.candidates({"agent_id": "agent-0990", "team": "y"})
    assert order == [990, 1000] and lacking == []
    d = decide(policy, {"agent_id": "agent-0990", "team": "y"}, facts("GET"))
    assert d.allow and d.profiles == ("p990",)
    # a token without the claim: not one of the 1,000 is evaluated, the message is the walk's
    d = decide(policy, {"sub": "x"}, facts("GET"))
    assert d == linear_decide(policy, {"sub": "x"}, "GET")
    assert "p0 (no such field 'agent_id'), p1 (" in d.reason and d.reason.endswith(", ...)")


@given(st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=8),
       st.lists(st.sampled_from(["a", "b", "c", "x"]), max_size=4))
def test_named_profiles_are_the_walk_in_file_order(names: list[str], wanted: list[str]) -> None:
    policy = make_policy([('jwt.sub == "s"', Mode.ENFORCE)] * len(names))
    policy = Policy(**{**{f: getattr(policy, f) for f in policy.__dataclass_fields__},
                       "agents": tuple(AgentProfile(name=n, match=p.match, egress=p.egress,
                                                    rules=p.rules)
                                       for n, p in zip(names, policy.agents, strict=True))})
    assert policy.named(wanted) == [p for p in policy.agents if p.name in wanted]
