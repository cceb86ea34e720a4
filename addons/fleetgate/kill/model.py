"""Actions and scopes: the vocabulary every kill-switch surface speaks.

An :class:`Action` is one operator (or rules, or trigger) decision: a :class:`Verb` applied to
a :class:`Scope`. A scope names the identities it reaches by one field of their token (agent
id, ``jti``, session, role, user claim) or all of them; ``cascade`` extends a scope to every
session descended from a session it reaches, however deep, through the gateway's own
session graph. The same scope vocabulary is used by the CLI, the admin API, mitmweb commands,
the rules' ``killswitch:`` section and automatic triggers, so a stop looks the same in the
kill log whatever issued it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

__all__ = ["Action", "Scope", "ScopeKind", "Subject", "Throttle", "Verb", "parse_scope"]


class Verb(StrEnum):
    """What an action does. Ordered by strength: a stop beats a pause beats a throttle."""

    THROTTLE = "throttle"
    PAUSE = "pause"
    STOP = "stop"

    @property
    def strength(self) -> int:
        return _STRENGTH[self]


_STRENGTH = {Verb.THROTTLE: 1, Verb.PAUSE: 2, Verb.STOP: 3}


class ScopeKind(StrEnum):
    AGENT = "agent"
    TOKEN = "token"
    SESSION = "session"
    ROLE = "role"
    USER = "user"
    GLOBAL = "global"


@dataclass(frozen=True)
class Subject:
    """The fields of one identity (or one session-graph node) that scopes match on."""

    agent: str
    session: str | None = None
    role: str | None = None
    jti: str | None = None
    user: str | None = None

    @classmethod
    def from_identity(cls, ident: Mapping[str, Any]) -> Subject:
        def opt(key: str) -> str | None:
            v = ident.get(key)
            return str(v) if v is not None and v != "" else None
        return cls(agent=str(ident.get("agent") or ""), session=opt("session"),
                   role=opt("role"), jti=opt("jti"), user=opt("user"))

    def field(self, kind: ScopeKind) -> str | None:
        return {ScopeKind.AGENT: self.agent, ScopeKind.TOKEN: self.jti,
                ScopeKind.SESSION: self.session, ScopeKind.ROLE: self.role,
                ScopeKind.USER: self.user}.get(kind)


@dataclass(frozen=True)
class Scope:
    """Which identities an action reaches. ``value`` is ``None`` only for ``global``."""

    kind: ScopeKind
    value: str | None = None
    cascade: bool = False

    def __post_init__(self) -> None:
        if self.kind is ScopeKind.GLOBAL:
            if self.value not in (None, "", "*"):
                raise ValueError("a global scope takes no value")
            object.__setattr__(self, "value", None)
        elif not self.value:
            raise ValueError(f"a {self.kind.value} scope needs a value")

    @classmethod
    def parse(cls, kind: str, value: str | None = None, cascade: bool = False) -> Scope:
        """Build from operator input; raises ValueError naming the accepted kinds."""
        try:
            k = ScopeKind(kind.strip().lower())
        except ValueError:
            raise ValueError(f"unknown scope {kind!r}: use one of "
                             f"{', '.join(s.value for s in ScopeKind)}") from None
        return cls(k, value.strip() if isinstance(value, str) else value, cascade)

    def matches(self, subject: Subject) -> bool:
        """True when the subject itself is in scope (descendants are the graph's business)."""
        if self.kind is ScopeKind.GLOBAL:
            return True
        return subject.field(self.kind) == self.value

    @property
    def label(self) -> str:
        """Human and metric label: ``session:S+descendants``, ``role:cloud``, ``global``."""
        if self.kind is ScopeKind.GLOBAL:
            return "global"
        return f"{self.kind.value}:{self.value}" + ("+descendants" if self.cascade else "")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "value": self.value, "cascade": self.cascade}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Scope:
        return cls.parse(str(data["kind"]), data.get("value"), bool(data.get("cascade")))


def parse_scope(spec: str, cascade: bool = False) -> Scope:
    """Operator shorthand: ``agent:X``, ``session:S+`` (``+``: with descendants), ``role:R``,
    ``all``."""
    spec = spec.strip()
    if spec.endswith("+"):
        spec, cascade = spec[:-1], True
    if spec in ("all", "global", "*"):
        return Scope(ScopeKind.GLOBAL)
    kind, sep, value = spec.partition(":")
    if not sep:
        raise ValueError(f"scope {spec!r}: write kind:value (agent:X, token:JTI, session:S, "
                         "session:S+ with descendants, role:R, user:U) or 'all'")
    return Scope.parse(kind, value, cascade)


@dataclass(frozen=True)
class Throttle:
    """A throttle's rate ceiling: ``requests`` per ``per`` seconds (burst = ``requests``)."""

    requests: int
    per: float

    def __post_init__(self) -> None:
        if self.requests <= 0 or self.per <= 0:
            raise ValueError("a throttle needs requests > 0 per a period > 0")

    @property
    def label(self) -> str:
        return f"{self.requests} request(s) per {self.per:g}s"


@dataclass(frozen=True)
class Action:
    """One applied kill-switch decision.

    ``source`` is ``operator`` (CLI, admin API, mitmweb), ``rules`` (the rules YAML) or
    ``trigger:<id>``; ``until`` (epoch seconds) makes an action lift itself (automatic throttles
    and pauses); ``by`` says who (operator name, rules file, trigger id). ``at`` is when it was
    issued (epoch seconds), stamped by the issuer from its clock: this package reads none.
    """

    verb: Verb
    scope: Scope
    reason: str
    by: str = "operator"
    source: str = "operator"
    at: float = 0.0
    until: float | None = None
    throttle: Throttle | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        if self.verb is Verb.THROTTLE and self.throttle is None:
            raise ValueError("a throttle action needs a rate (requests per period)")

    @property
    def key(self) -> tuple[str, str, str | None, bool]:
        """Actions with the same key are the same action (applying it again is a no-op)."""
        return (self.verb.value, self.scope.kind.value, self.scope.value, self.scope.cascade)

    def active(self, now: float) -> bool:
        return self.until is None or now < self.until

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["verb"] = self.verb.value
        d["scope"] = self.scope.to_json()
        d["throttle"] = asdict(self.throttle) if self.throttle else None
        return d

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Action:
        thr = data.get("throttle")
        return cls(verb=Verb(data["verb"]), scope=Scope.from_json(data["scope"]),
                   reason=str(data.get("reason") or ""), by=str(data.get("by") or "operator"),
                   source=str(data.get("source") or "operator"), at=float(data["at"]),
                   until=float(data["until"]) if data.get("until") is not None else None,
                   throttle=Throttle(int(thr["requests"]), float(thr["per"])) if thr else None,
                   id=str(data["id"]))
