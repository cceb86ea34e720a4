"""Automatic kill-switch triggers: sliding windows per agent or session, and an escalation
ladder (the KILLSWITCH.md convention: throttle -> pause -> full stop).

A :class:`TriggerSpec` measures one :class:`Metric` over the events of one key (an agent id,
or a session id) and says what happens when the measure passes its limit. The
:class:`TriggerEngine` is fed every request and response (:class:`Event`) with the time
(``now``, epoch seconds, injected) and answers with :class:`Firing` s, which the kill switch
applies as :class:`~fleetgate.kill.model.Action` s (``source="trigger:<id>"``).

**Comparisons** (``above`` is the spec's limit; "value" is what the trigger measures):

==========================  ======================================================  =============
metric                      value                                                   breach when
==========================  ======================================================  =============
``requests``                request events in the window                            value > above
``tokens``                  LLM tokens carried by the window's events               value > above
``usd``                     spend carried by the window's events                    value > above
``errors``                  responses marked ``error`` (upstream 5xx, connection)   value > above
``denials``                 requests fleetgate denied                               value > above
``error_rate``              errors / responses in the window; judged only once      value > above
                            ``min_requests`` responses are in the window
``denial_rate``             denied / requests in the window; judged only once       value > above
                            ``min_requests`` requests are in the window
``identical_requests``      how often this request's fingerprint occurs in the      value >= above
                            window (judged on requests that carry a fingerprint)
``message_depth``           the depth the event itself carries (no window)          value > above
``delegation_depth``        the delegation depth the gateway supplies (no window)   value > above
``delegation_fanout``       the fan-out the gateway supplies (no window)            value > above
==========================  ======================================================  =============

An event at time ``t`` is in the window at ``now`` while ``now - t < window``. Windowed
measures are judged after every event of their key (a key over its token limit that keeps
sending requests is still in breach); per-event measures only on events that carry them.

**Ladder.** A key's first breach fires step 0 of the ladder. A breach while on step ``k``, at
least ``cooldown`` seconds after step ``k`` began, fires step ``k + 1``; the last step never
fires again while breaches go on. A key that has had no breach for ``hold`` seconds starts
over at step 0 (an agent whose automatic throttle lifted and then behaved is not punished
twice; a stopped agent an operator resumed starts at the bottom). Throttles and pauses lift
themselves after ``hold`` seconds; a stop never does.

**Bounded memory.** Windows merge events that arrive within ``window / 256`` of each other
into one entry (so an event may count up to ``window / 256`` longer than ``window``, never
shorter) and keep running sums: ``observe`` is O(1) amortised per trigger. At most
``max_keys`` keys are tracked (least recently active evicted), at most 1,000 distinct
fingerprints per key (least recently seen evicted), and each fingerprint keeps at most
``above`` timestamps (so an identical-request count is reported up to its limit). A clock
that steps back is treated as standing still.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from fleetgate.kill.model import Action, Scope, ScopeKind, Subject, Throttle, Verb
from fleetgate.rule import Mode

__all__ = ["DEFAULT_LADDER", "DEFAULT_THROTTLE", "Event", "Firing", "Metric", "TriggerEngine",
           "TriggerSpec", "request_fingerprint"]

DEFAULT_LADDER: tuple[Verb, ...] = (Verb.THROTTLE, Verb.PAUSE, Verb.STOP)
DEFAULT_THROTTLE = Throttle(1, 10.0)
MAX_FINGERPRINTS = 1_000
MAX_IDENTICAL_LIMIT = 10_000
_RESOLUTION = 256


class Metric(StrEnum):
    REQUESTS = "requests"
    TOKENS = "tokens"
    USD = "usd"
    ERRORS = "errors"
    DENIALS = "denials"
    ERROR_RATE = "error_rate"
    DENIAL_RATE = "denial_rate"
    IDENTICAL_REQUESTS = "identical_requests"
    MESSAGE_DEPTH = "message_depth"
    DELEGATION_DEPTH = "delegation_depth"
    DELEGATION_FANOUT = "delegation_fanout"

    @property
    def is_rate(self) -> bool:
        return self in (Metric.ERROR_RATE, Metric.DENIAL_RATE)

    @property
    def per_event(self) -> bool:
        """Judged on one event's own value: no window."""
        return self in (Metric.MESSAGE_DEPTH, Metric.DELEGATION_DEPTH, Metric.DELEGATION_FANOUT)


@dataclass(frozen=True)
class TriggerSpec:
    """One automatic trigger. See the module docstring for the exact comparisons.

    ``roles`` / ``agents`` select the identities it watches: a subject is watched when its
    role is in ``roles`` or its agent id is in ``agents``; both empty watch every agent.
    """

    id: str
    metric: Metric
    above: float
    window: float = 60.0
    per: ScopeKind = ScopeKind.AGENT
    roles: frozenset[str] = frozenset()
    ladder: tuple[Verb, ...] = DEFAULT_LADDER
    throttle: Throttle = DEFAULT_THROTTLE
    hold: float = 600.0
    cooldown: float = 30.0
    min_requests: int = 10
    agents: frozenset[str] = frozenset()
    # report: a firing is logged and counted ("would stop ..."), never put in force
    mode: Mode = Mode.ENFORCE

    def __post_init__(self) -> None:
        object.__setattr__(self, "metric", Metric(self.metric))
        object.__setattr__(self, "per", ScopeKind(self.per))
        object.__setattr__(self, "roles", frozenset(self.roles))
        object.__setattr__(self, "agents", frozenset(self.agents))
        object.__setattr__(self, "ladder", tuple(Verb(v) for v in self.ladder))
        if not self.id or not isinstance(self.id, str):
            raise ValueError("a trigger needs a non-empty id")
        if not _finite(self.above) or self.above < 0:
            raise ValueError(f"above must be a number >= 0 (got {self.above!r})")
        object.__setattr__(self, "above", float(self.above))
        if self.metric.is_rate and self.above >= 1:
            raise ValueError(f"{self.metric.value} is a fraction: above must be below 1 "
                             f"(0.5 means 50%), got {self.above:g}")
        if self.metric is Metric.IDENTICAL_REQUESTS and not 1 <= self.above <= MAX_IDENTICAL_LIMIT:
            raise ValueError(f"identical_requests: above must be 1..{MAX_IDENTICAL_LIMIT}")
        if not _finite(self.window) or self.window <= 0:
            raise ValueError("window must be > 0 seconds")
        if self.per not in (ScopeKind.AGENT, ScopeKind.SESSION):
            raise ValueError("per must be agent or session")
        if not self.ladder:
            raise ValueError("the ladder needs at least one step")
        if any(b.strength <= a.strength for a, b in itertools.pairwise(self.ladder)):
            raise ValueError("ladder steps must grow in strength (throttle -> pause -> stop), "
                             f"got {' -> '.join(v.value for v in self.ladder)}")
        if not _finite(self.hold) or self.hold <= 0:
            raise ValueError("hold must be > 0 seconds")
        if not _finite(self.cooldown) or self.cooldown < 0:
            raise ValueError("cooldown must be >= 0 seconds")
        if isinstance(self.min_requests, bool) or not isinstance(self.min_requests, int) \
                or self.min_requests < 1:
            raise ValueError("min_requests must be an integer >= 1")

    def watches(self, subject: Subject) -> bool:
        if not self.roles and not self.agents:
            return True
        return subject.role in self.roles or subject.agent in self.agents


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Event:
    """One request (as it is judged) or one response (as it completes) of one identity.

    ``tokens`` and ``usd`` count on whichever event carries them (usually the response);
    ``fingerprint`` (requests only) identifies "the same request" for loop detection, see
    :func:`request_fingerprint`.
    """

    subject: Subject
    kind: Literal["request", "response"]
    fingerprint: str | None = None
    denied: bool = False
    error: bool = False
    tokens: int = 0
    usd: float = 0.0
    message_depth: int | None = None
    delegation_depth: int | None = None
    delegation_fanout: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("request", "response"):
            raise ValueError("an event is a request or a response")
        if self.kind == "response" and (self.fingerprint is not None or self.denied):
            raise ValueError("fingerprint and denied belong to request events")
        if self.kind == "request" and self.error:
            raise ValueError("error belongs to response events")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 0:
            raise ValueError("tokens must be an integer >= 0")
        if not _finite(self.usd) or self.usd < 0:
            raise ValueError("usd must be a finite number >= 0")

    @classmethod
    def request(cls, subject: Subject, *, fingerprint: str | None = None, denied: bool = False,
                tokens: int = 0, usd: float = 0.0, message_depth: int | None = None,
                delegation_depth: int | None = None,
                delegation_fanout: int | None = None) -> Event:
        return cls(subject, "request", fingerprint=fingerprint, denied=denied, tokens=tokens,
                   usd=usd, message_depth=message_depth, delegation_depth=delegation_depth,
                   delegation_fanout=delegation_fanout)

    @classmethod
    def response(cls, subject: Subject, *, error: bool = False, tokens: int = 0,
                 usd: float = 0.0) -> Event:
        return cls(subject, "response", error=error, tokens=tokens, usd=usd)

    def measure(self, metric: Metric) -> int | None:
        """A per-event metric's value, ``None`` when this event does not carry it."""
        attr = _PER_EVENT_FIELDS.get(metric)
        value: int | None = None if attr is None else getattr(self, attr)
        return value


_PER_EVENT_FIELDS = {Metric.MESSAGE_DEPTH: "message_depth",
                     Metric.DELEGATION_DEPTH: "delegation_depth",
                     Metric.DELEGATION_FANOUT: "delegation_fanout"}


def request_fingerprint(method: str, host: str, path: str, body: bytes = b"") -> str:
    """A short digest of what makes two requests "identical" for loop detection."""
    h = hashlib.sha256()
    for part in (method.upper().encode(), host.lower().encode(), path.encode()):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    h.update(body)
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class Firing:
    """A key moved to a new ladder step: apply ``verb`` to ``scope``."""

    trigger: str
    scope: Scope
    verb: Verb
    step: int
    reason: str
    until: float | None = None
    throttle: Throttle | None = None
    report: bool = False  # the trigger is in report mode: say what it would do, do nothing

    def to_action(self, now: float) -> Action:
        return Action(verb=self.verb, scope=self.scope, reason=self.reason, by=self.trigger,
                      source=f"trigger:{self.trigger}", at=now, until=self.until,
                      throttle=self.throttle)


# -- state --------------------------------------------------------------------------------

class _Window:
    """Running sums ``a`` (and ``b``, a rate's denominator) over a sliding window."""

    __slots__ = ("a", "b", "entries", "resolution", "span")

    def __init__(self, span: float) -> None:
        self.span = span
        self.resolution = span / _RESOLUTION
        # [first t, last t, a, b]
        self.entries: deque[list[float]] = deque()
        self.a = 0.0
        self.b = 0.0

    def prune(self, now: float) -> None:
        horizon = now - self.span
        entries = self.entries
        while entries and entries[0][1] <= horizon:
            _, _, a, b = entries.popleft()
            self.a -= a
            self.b -= b
        if not entries:  # no float residue from subtracting what was added
            self.a = self.b = 0.0

    def add(self, now: float, a: float, b: float) -> None:
        entries = self.entries
        if entries and now - entries[-1][0] < self.resolution:
            tail = entries[-1]
            tail[1] = now
            tail[2] += a
            tail[3] += b
        else:
            entries.append([now, now, a, b])
        self.a += a
        self.b += b


class _State:
    """One trigger's window and ladder position for one key."""

    __slots__ = ("fingerprints", "last_breach", "since", "step", "value", "window")

    def __init__(self, spec: TriggerSpec) -> None:
        self.window = _Window(spec.window) if not (
            spec.metric.per_event or spec.metric is Metric.IDENTICAL_REQUESTS) else None
        self.fingerprints: OrderedDict[str, deque[float]] | None = (
            OrderedDict() if spec.metric is Metric.IDENTICAL_REQUESTS else None)
        self.step = -1
        self.since = 0.0
        self.last_breach = 0.0
        self.value: float | None = None  # last per-event value, for the snapshot

    def settle(self, spec: TriggerSpec, now: float) -> None:
        """Forget the ladder position after ``hold`` seconds without a breach."""
        if self.step >= 0 and now - self.last_breach >= spec.hold:
            self.step = -1


_Key = tuple[ScopeKind, str]
_Measure = tuple[float, bool, float, float]


_Contribution = Callable[[Event], tuple[float, float] | None]
# What one event adds to a windowed metric's (numerator, denominator); None: nothing.
_CONTRIBUTIONS: dict[Metric, _Contribution] = {
    Metric.REQUESTS: lambda ev: (1.0, 0.0) if ev.kind == "request" else None,
    Metric.TOKENS: lambda ev: (float(ev.tokens), 0.0) if ev.tokens else None,
    Metric.USD: lambda ev: (ev.usd, 0.0) if ev.usd else None,
    Metric.ERRORS: lambda ev: (1.0, 0.0) if ev.error else None,
    Metric.DENIALS: lambda ev: (1.0, 0.0) if ev.denied else None,
    Metric.ERROR_RATE: lambda ev: None if ev.kind == "request" else (float(ev.error), 1.0),
    Metric.DENIAL_RATE: lambda ev: (float(ev.denied), 1.0) if ev.kind == "request" else None,
}

# how a trigger is judged, decided once per trigger (observe is on every request's path)
_SUM, _RATE, _IDENTICAL, _PER_EVENT = range(4)


class _Plan:
    __slots__ = ("contribution", "field", "kind", "spec", "watch_all")

    def __init__(self, spec: TriggerSpec) -> None:
        self.spec = spec
        self.watch_all = not spec.roles and not spec.agents
        self.kind = (_PER_EVENT if spec.metric.per_event else _RATE if spec.metric.is_rate
                     else _IDENTICAL if spec.metric is Metric.IDENTICAL_REQUESTS else _SUM)
        self.contribution = _CONTRIBUTIONS.get(spec.metric)
        self.field = _PER_EVENT_FIELDS.get(spec.metric, "")


class TriggerEngine:
    """Feeds events through every trigger and says when a key climbs the ladder.

    Not thread-safe: call it from one thread (mitmproxy's event loop).
    """

    def __init__(self, specs: Sequence[TriggerSpec], max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.max_keys = max_keys
        self._specs: dict[str, TriggerSpec] = {}
        self._keys: OrderedDict[_Key, dict[str, _State]] = OrderedDict()
        self._clock = -math.inf
        self.replace(specs)

    @property
    def specs(self) -> tuple[TriggerSpec, ...]:
        return tuple(self._specs.values())

    def replace(self, specs: Sequence[TriggerSpec]) -> None:
        """New trigger set (rules hot reload): a trigger whose id and spec are unchanged keeps
        its windows and ladder positions; changed or removed ones start over / are dropped."""
        new: dict[str, TriggerSpec] = {}
        for spec in specs:
            if spec.id in new:
                raise ValueError(f"duplicate trigger id {spec.id!r}")
            new[spec.id] = spec
        kept = {tid for tid, spec in new.items() if self._specs.get(tid) == spec}
        for key in list(self._keys):
            states = self._keys[key]
            for tid in [t for t in states if t not in kept]:
                del states[tid]
            if not states:
                del self._keys[key]
        self._specs = new
        self._by_per = {per: [_Plan(s) for s in new.values() if s.per is per]
                        for per in (ScopeKind.AGENT, ScopeKind.SESSION)}

    def __len__(self) -> int:
        """How many keys are tracked."""
        return len(self._keys)

    def _tick(self, now: float) -> float:
        self._clock = max(self._clock, float(now))
        return self._clock

    def _states(self, key: _Key) -> dict[str, _State]:
        states = self._keys.get(key)
        if states is None:
            states = self._keys[key] = {}
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key)
        return states

    def observe(self, event: Event, now: float) -> list[Firing]:
        """Count ``event`` for every trigger that watches its subject; return the firings
        of keys that moved to a new ladder step."""
        now = self._tick(now)
        firings: list[Firing] = []
        subject = event.subject
        for per, plans in self._by_per.items():
            if not plans:
                continue
            value = subject.agent if per is ScopeKind.AGENT else subject.session
            if not value:
                continue
            states: dict[str, _State] | None = None
            for plan in plans:
                if not plan.watch_all and not plan.spec.watches(subject):
                    continue
                if states is None:
                    states = self._states((per, value))
                state = states.get(plan.spec.id)
                if state is None:
                    state = states[plan.spec.id] = _State(plan.spec)
                measured = self._measure(plan, state, event, now)
                if measured is not None and measured[1]:
                    firing = self._climb(plan.spec, state, per, value, now, measured)
                    if firing is not None:
                        firings.append(firing)
        return firings

    @staticmethod
    def _measure(plan: _Plan, state: _State, ev: Event, now: float) -> _Measure | None:
        """(value, breach, rate numerator, rate denominator) or ``None`` when not judged."""
        spec, kind = plan.spec, plan.kind
        if kind == _PER_EVENT:
            v = getattr(ev, plan.field)
            if v is None:
                return None
            state.value = float(v)
            return float(v), v > spec.above, 0.0, 0.0
        if kind == _IDENTICAL:
            if ev.kind != "request" or not ev.fingerprint:
                return None
            assert state.fingerprints is not None
            count = _count_fingerprint(state.fingerprints, ev.fingerprint, now, spec)
            return float(count), count >= spec.above, 0.0, 0.0
        window = state.window
        assert window is not None and plan.contribution is not None
        if window.entries and window.entries[0][1] <= now - window.span:
            window.prune(now)
        contribution = plan.contribution(ev)
        if contribution is not None:
            window.add(now, contribution[0], contribution[1])
        if kind == _RATE:
            if window.b < spec.min_requests:
                return None
            rate = window.a / window.b
            return rate, rate > spec.above, window.a, window.b
        return window.a, window.a > spec.above, 0.0, 0.0

    @staticmethod
    def _climb(spec: TriggerSpec, state: _State, per: ScopeKind, key: str, now: float,
               measured: _Measure) -> Firing | None:
        state.settle(spec, now)
        state.last_breach = now
        last = len(spec.ladder) - 1
        if state.step < 0:
            state.step = 0
        elif state.step < last and now - state.since >= spec.cooldown:
            state.step += 1
        else:
            return None
        state.since = now
        verb = spec.ladder[state.step]
        scope = Scope(per, key, cascade=per is ScopeKind.SESSION)
        throttle = spec.throttle if verb is Verb.THROTTLE else None
        until = None if verb is Verb.STOP else now + spec.hold
        step_text = verb.value
        if throttle is not None:
            step_text += f" to {throttle.label}"
        if until is not None:
            step_text += f", lifts after {_duration_text(spec.hold)}"
        detail = _describe(spec, measured[0], measured[2], measured[3])
        reason = (f"trigger {spec.id}: {detail}; escalation step {state.step + 1} of "
                  f"{len(spec.ladder)}: {step_text}")
        return Firing(trigger=spec.id, scope=scope, verb=verb, step=state.step, reason=reason,
                      until=until, throttle=throttle, report=spec.mode is Mode.REPORT)

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """Every tracked (trigger, key): its ladder step (``None``: not escalated) and the
        current value, for the admin API. Most recently active keys first."""
        now = self._tick(now)
        out: list[dict[str, Any]] = []
        for (per, key), states in reversed(self._keys.items()):
            for tid, state in states.items():
                spec = self._specs[tid]
                state.settle(spec, now)
                out.append({
                    "trigger": tid, "metric": spec.metric.value, "per": per.value, "key": key,
                    "step": state.step if state.step >= 0 else None,
                    "verb": spec.ladder[state.step].value if state.step >= 0 else None,
                    "since": state.since if state.step >= 0 else None,
                    "value": _current(spec, state, now), "above": spec.above,
                })
        return out


def _count_fingerprint(fps: OrderedDict[str, deque[float]], fp: str, now: float,
                       spec: TriggerSpec) -> int:
    times = fps.get(fp)
    if times is None:
        times = fps[fp] = deque(maxlen=math.ceil(spec.above))
        while len(fps) > MAX_FINGERPRINTS:
            fps.popitem(last=False)
    else:
        fps.move_to_end(fp)
    horizon = now - spec.window
    while times and times[0] <= horizon:
        times.popleft()
    times.append(now)
    return len(times)


def _current(spec: TriggerSpec, state: _State, now: float) -> float | None:
    if spec.metric.per_event:
        return state.value
    if state.fingerprints is not None:
        horizon = now - spec.window
        return float(max((sum(1 for t in ts if t > horizon)
                          for ts in state.fingerprints.values()), default=0))
    window = state.window
    assert window is not None
    window.prune(now)
    if spec.metric.is_rate:
        return window.a / window.b if window.b else None
    return window.a


# -- reasons ------------------------------------------------------------------------------

def _duration_text(seconds: float) -> str:
    if seconds >= 120 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 120 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def _usd(v: float) -> str:
    return f"${v:.2f}" if v >= 1 or round(v, 2) == v else f"${v:.4g}"


def _describe(spec: TriggerSpec, value: float, num: float = 0.0, den: float = 0.0) -> str:
    m, w, a = spec.metric, _duration_text(spec.window), spec.above
    if m is Metric.USD:
        return f"{_usd(value)} spent within {w} (limit {_usd(a)})"
    if m.is_rate:
        what = "error rate" if m is Metric.ERROR_RATE else "denial rate"
        of = "responses" if m is Metric.ERROR_RATE else "requests"
        return (f"{what} {value:.0%} ({num:g} of {den:g} {of}) within {w} "
                f"(limit {a:.0%})")
    label = {Metric.REQUESTS: "requests", Metric.TOKENS: "tokens",
             Metric.ERRORS: "upstream errors", Metric.DENIALS: "denied requests",
             Metric.IDENTICAL_REQUESTS: "identical requests"}.get(m)
    if label is not None:
        return f"{value:g} {label} within {w} (limit {a:g})"
    label = {Metric.MESSAGE_DEPTH: "message depth", Metric.DELEGATION_DEPTH: "delegation depth",
             Metric.DELEGATION_FANOUT: "delegation fan-out"}[m]
    return f"{label} {value:g} (limit {a:g})"
