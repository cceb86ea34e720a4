"""The kill board: every action in force, and the verdict for one identity.

An identity is *live* when no stop reaches it: not through one of its own fields (agent,
token, session, role, user, or a global stop), and not through an ancestor session that a
cascading action reaches. The strongest action that reaches it wins (stop > pause >
throttle). Applying the same action twice is a no-op; lifting removes the actions on exactly
that scope (``resume`` lifts pauses and throttles, ``unrevoke`` lifts stops), so an operator
cannot lift a family stop by resuming one child.

Throttles are token buckets (one per throttle action: the scope shares the ceiling), with the
same discrete-fill arithmetic as ``localRateLimit``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fleetgate.kill.graph import Node, SessionGraph
from fleetgate.kill.model import Action, Scope, ScopeKind, Subject, Verb
from fleetgate.limits.bucket import Bucket, BucketSpec, Take

__all__ = ["KillBoard", "Reach", "Verdict"]

_KINDS = (ScopeKind.AGENT, ScopeKind.TOKEN, ScopeKind.SESSION, ScopeKind.ROLE, ScopeKind.USER)
_NONE: list[Action] = []


def _node_field(node: Node, kind: ScopeKind) -> str | None:
    """A graph node's value for a scope kind (a placeholder only knows its session)."""
    if kind is ScopeKind.SESSION:
        return node.session
    if node.via == "placeholder":
        return None
    return {ScopeKind.AGENT: node.agent or None, ScopeKind.TOKEN: node.jti,
            ScopeKind.ROLE: node.role, ScopeKind.USER: node.user}[kind]


@dataclass(frozen=True)
class Verdict:
    """What applies to one request: the action, and the session through which it reached
    the requester (``None`` when it reached the identity directly)."""

    action: Action
    via: str | None = None

    @property
    def reason(self) -> str:
        how = f" (through ancestor session {self.via!r})" if self.via else ""
        return f"{self.action.verb.value} by {self.action.source} on {self.action.scope.label}" \
               f"{how}: {self.action.reason}"


@dataclass(frozen=True)
class Reach:
    """The sessions an action reaches in the current graph (for the kill log)."""

    sessions: tuple[str, ...]
    descendants: tuple[str, ...]


class KillBoard:
    def __init__(self, graph: SessionGraph) -> None:
        self.graph = graph
        self.actions: dict[tuple[str, str, str | None, bool], Action] = {}
        self._buckets: dict[str, Bucket] = {}
        self.version = 0
        # Indexes so a verdict costs O(ancestors x scope kinds), not O(actions): every
        # request is judged, and an incident can put hundreds of actions in force.
        self._direct: dict[tuple[ScopeKind, str | None], list[Action]] = {}
        self._cascade: dict[tuple[ScopeKind, str | None], list[Action]] = {}
        self._global: list[Action] = []

    def _reindex(self) -> None:
        self._direct, self._cascade, self._global = {}, {}, []
        for a in self.actions.values():
            if a.scope.kind is ScopeKind.GLOBAL:
                self._global.append(a)
                continue
            key = (a.scope.kind, a.scope.value)
            self._direct.setdefault(key, []).append(a)
            if a.scope.cascade:
                self._cascade.setdefault(key, []).append(a)

    def __iter__(self) -> Iterable[Action]:
        return iter(list(self.actions.values()))

    def apply(self, action: Action) -> tuple[Action, bool]:
        """Put ``action`` in force; returns ``(action in force, newly applied)``. The same
        verb on the same scope again keeps the first one (idempotent)."""
        existing = self.actions.get(action.key)
        if existing is not None and existing.until == action.until:
            return existing, False
        self.actions[action.key] = action
        self.version += 1
        self._reindex()
        return action, True

    def lift(self, scope: Scope, verbs: Iterable[Verb]) -> list[Action]:
        """Remove the actions with these verbs on exactly this scope (cascading or not)."""
        wanted = set(verbs)
        gone = [a for a in self.actions.values()
                if a.verb in wanted and a.scope.kind == scope.kind and a.scope.value == scope.value]
        for a in gone:
            self._drop(a)
        return gone

    def lift_source(self, source: str, keep: Iterable[Action] = ()) -> list[Action]:
        """Remove the actions a source (e.g. ``rules``) put in force, except ``keep``."""
        kept = {a.key for a in keep}
        gone = [a for a in self.actions.values() if a.source == source and a.key not in kept]
        for a in gone:
            self._drop(a)
        return gone

    def discard(self, action_id: str, key: tuple[str, str, str | None, bool] | None = None
                ) -> Action | None:
        """Remove the action ``action_id`` (another replica lifted it or it expired there);
        with ``key``, whatever action is in force on that verb and scope when the id is not
        (a lift lifts the scope, whichever replica's copy of the action is in force here)."""
        found = next((a for a in self.actions.values() if a.id == action_id), None)
        if found is None and key is not None:
            found = self.actions.get(key)
        if found is not None:
            self._drop(found)
        return found

    def _drop(self, action: Action) -> None:
        self.actions.pop(action.key, None)
        self._buckets.pop(action.id, None)
        self.version += 1
        self._reindex()

    def expire(self, now: float) -> list[Action]:
        """Lift actions whose ``until`` has passed (automatic throttles and pauses)."""
        gone = [a for a in self.actions.values() if not a.active(now)]
        for a in gone:
            self._drop(a)
        return gone

    def verdict(self, subject: Subject, now: float) -> Verdict | None:
        """The strongest action in force that reaches ``subject``, or ``None`` (live)."""
        if not self.actions:
            return None
        best: Verdict | None = None

        def consider(actions: list[Action], via: str | None) -> None:
            nonlocal best
            for a in actions:
                if a.active(now) and (best is None
                                      or a.verb.strength > best.action.verb.strength):
                    best = Verdict(a, via)

        consider(self._global, None)
        for kind in _KINDS:
            value = subject.field(kind)
            if value is not None:
                consider(self._direct.get((kind, value), _NONE), None)
        if self._cascade and subject.session and (best is None or
                                                  best.action.verb is not Verb.STOP):
            for anc in self.graph.ancestors(subject.session):
                for kind in _KINDS:
                    value = _node_field(anc, kind)
                    if value is not None:
                        consider(self._cascade.get((kind, value), _NONE), anc.session)
        return best

    def take(self, verdict: Verdict, now: float) -> Take:
        """Take one request from a throttle action's bucket."""
        action = verdict.action
        assert action.throttle is not None
        bucket = self._buckets.get(action.id)
        if bucket is None:
            spec = BucketSpec(action.throttle.requests, action.throttle.requests,
                              action.throttle.per)
            bucket = self._buckets[action.id] = Bucket(spec, now)
        return bucket.take(1, now)

    def reach(self, action: Action) -> Reach:
        """The sessions in the graph the action reaches directly, and through cascade."""
        direct = [n.session for n in self.graph.nodes.values()
                  if (n.via != "placeholder" or action.scope.kind is ScopeKind.SESSION)
                  and action.scope.matches(n.subject())]
        below: list[str] = []
        if action.scope.cascade:
            seen = set(direct)
            for s in direct:
                for d in self.graph.descendants(s):
                    if d not in seen:
                        seen.add(d)
                        below.append(d)
        return Reach(tuple(direct), tuple(below))
