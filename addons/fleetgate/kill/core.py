"""KillCore: the board, the session graph and the store, kept consistent.

Everything that changes kill state goes through here, so the three never disagree: an action
is in the board (effective for the next request), in the store (survives a restart) and in
the append-only log (who, when, why, which sessions it reached) before the caller returns.
Rules-declared actions (the rules' ``killswitch.actions``) are replaced wholesale on each
reload and are not stored: the rules file is their durable home.

If the store cannot be written, the action still takes effect in memory (a kill must not
fail because a disk is full); the error is raised to the caller after the board changed, so
the operator sees that it will not survive a restart.

Sessions are written behind: :meth:`KillCore.observe` records a session first seen in memory
only, and :meth:`KillCore.flush` writes them: before an action is saved (an action in the store
always has the sessions it reached beside it), when the gate asks for a new session to be
recorded, when a delegation is recorded, and from the kill service's housekeeping and shutdown.

A store may do its writes later (the kill service's store queues them to a writer thread,
off the event loop): each write method then returns a handle (a future) instead of ``None``.
The core does not look inside it; it hands the handles back (``Applied.writes``,
``on_saving``) to the service, which awaits them off the loop. A session whose write failed
is put back with :meth:`KillCore.requeue` and written again by the next flush.

Several gateways sharing one store (Redis) tell each other what changed: every new action,
every lift or expiry and every new session goes to :attr:`KillCore.outbox` (the service
publishes it) the moment the board or graph changes, and what another replica published comes
in through :meth:`KillCore.adopt`, :meth:`KillCore.discard` and :meth:`KillCore.adopt_node`,
which change the board and graph only: the other replica already wrote it, and nothing adopted
is published again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from fleetgate.errors import StateError
from fleetgate.kill.board import KillBoard, Reach, Verdict
from fleetgate.kill.graph import GraphError, Node, SessionGraph
from fleetgate.kill.model import Action, Scope, Subject, Verb

__all__ = ["Applied", "KillCore", "KillStore", "PersistError"]

RULES = "rules"


class KillStore(Protocol):
    """Where the core keeps what must survive a restart: actions in force (not the rules'),
    the session graph, and the append-only kill log. The core is the only writer; the
    implementations (SQLite: :mod:`fleetgate.stores.kill`) live outside this pure package."""

    # Writes return None when done, or a handle when the store does them later (queued).
    def save_action(self, action: Action) -> object: ...
    def remove_action(self, action_id: str) -> object: ...
    def replace_actions(self, actions: list[Action]) -> object: ...
    def actions(self) -> list[Action]: ...
    def save_node(self, node: Node) -> object: ...
    def forget_nodes(self, sessions: list[str]) -> object: ...
    def nodes(self) -> list[Node]: ...

    def append(self, event: str, body: dict[str, Any], action: str | None = None,
               at: float | None = None) -> object: ...

    def append_many(self, rows: list[tuple[str, dict[str, Any], str | None]],
                    at: float | None = None) -> object: ...

    def log(self, limit: int = 100, action: str | None = None,
            since: float | None = None) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class PersistError(StateError, RuntimeError):
    """The action is in force but could not be written to the state store."""


@dataclass(frozen=True)
class Applied:
    action: Action
    new: bool
    reach: Reach
    writes: tuple[object, ...] = ()  # what the store returned for this action's writes


class KillCore:
    def __init__(self, store: KillStore, clock: Callable[[], float]) -> None:
        self.store = store
        self.clock = clock
        self.graph = SessionGraph()
        self.board = KillBoard(self.graph)
        self.listeners: list[Callable[[], None]] = []  # called after every board change
        self._unsaved: dict[str, Node] = {}  # sessions first seen since the last flush
        self.on_saving: Callable[[Node, object], None] | None = None  # a session handed over
        # ``(op, payload)`` for the other replicas: "apply" {action}, "drop" {id, action,
        # event}, "node" {node}; called on every local change, never for an adopted one
        self.outbox: Callable[[str, dict[str, Any]], None] | None = None

    def load(self) -> int:
        """Read actions in force and the session graph from the store (startup)."""
        for node in sorted(self.store.nodes(), key=lambda n: n.depth):
            self.graph.nodes[node.session] = node
        for node in self.graph.nodes.values():
            parent = self.graph.nodes.get(node.parent) if node.parent else None
            if parent is not None and node.session not in parent.children:
                parent.children.append(node.session)
        now = self.clock()
        n = 0
        for action in self.store.actions():
            if action.active(now):
                self.board.apply(action)
                n += 1
            else:
                self.store.remove_action(action.id)
        self._changed()
        return n

    def _changed(self) -> None:
        for fn in list(self.listeners):
            fn()

    def _out(self, op: str, payload: dict[str, Any]) -> None:
        if self.outbox is not None:
            self.outbox(op, payload)

    # -- what other replicas did (no store writes, nothing published) ------------------

    def adopt(self, action: Action) -> bool:
        """Put in force an action another replica applied (and stored); True when new here."""
        if not action.active(self.clock()):
            return False
        _, new = self.board.apply(action)
        if new:
            self._changed()
        return new

    def discard(self, action_id: str, key: tuple[str, str, str | None, bool] | None = None
                ) -> Action | None:
        """Remove an action another replica lifted (``key``: by scope when the id is not
        here) or that expired there; what was removed."""
        gone = self.board.discard(action_id, key)
        if gone is not None:
            self._changed()
        return gone

    def adopt_node(self, node: Node) -> bool:
        """Add a session another replica recorded (linked under its parent) unless known;
        True when added. An edge this graph refuses (it knows another parent) is ignored:
        the first parent recorded here stays, as on the replica that saw both."""
        known = self.graph.get(node.session)
        if known is not None and known.via != "placeholder":
            return False
        try:
            added, created = self.graph.observe(node.subject(), node.parent, node.created,
                                                node.exp, node.via)
        except GraphError:
            return False
        if added is not None and created:
            added.created = node.created
        return created

    # -- actions -----------------------------------------------------------------------

    def apply(self, action: Action) -> Applied:
        in_force, new = self.board.apply(action)
        reach = self.board.reach(in_force)
        writes: list[object] = []
        if new:
            self._changed()
            self._out("apply", {"action": in_force.to_json()})  # before any write: latency
            body = {**in_force.to_json(), "sessions": list(reach.sessions),
                    "descendants": list(reach.descendants)}
            try:
                writes += self.flush().values()
                if in_force.source != RULES:
                    writes.append(self.store.save_action(in_force))
                writes.append(self.store.append("action", body, action=in_force.id,
                                                at=in_force.at))
            except Exception as exc:
                raise PersistError(f"{in_force.verb.value} on {in_force.scope.label} is in force "
                                   f"but was not saved ({exc}); it will not survive a restart"
                                   ) from exc
        return Applied(in_force, new, reach, tuple(w for w in writes if w is not None))

    def lift(self, scope: Scope, verbs: Iterable[Verb], by: str, reason: str = "") -> list[Action]:
        gone = self.board.lift(scope, verbs)
        if gone:
            self._changed()
        for a in gone:
            self._forget(a, "lift", by, reason)
        return gone

    def stored_actions(self) -> list[Action]:
        """What must be in the store: the actions in force that the rules did not declare."""
        return [a for a in self.board.actions.values() if a.source != RULES]

    def expire(self) -> list[Action]:
        gone = self.board.expire(self.clock())
        if gone:
            self._changed()
        for a in gone:
            self._forget(a, "expire", a.by, "its time ran out")
        return gone

    def _forget(self, action: Action, event: str, by: str, reason: str) -> None:
        self._out("drop", {"id": action.id, "action": action.to_json(), "event": event})
        if action.source != RULES:
            self.store.remove_action(action.id)
        self.store.append(event, {"verb": action.verb.value, "scope": action.scope.to_json(),
                                  "by": by, "reason": reason, "source": action.source},
                          action=action.id, at=self.clock())

    def set_rules_actions(self, actions: Iterable[Action]) -> tuple[list[Applied], list[Action]]:
        """Make the rules' actions exactly ``actions``: returns (newly applied, lifted)."""
        wanted = list(actions)
        lifted = self.board.lift_source(RULES, keep=wanted)
        if lifted:
            self._changed()
        for a in lifted:
            self._forget(a, "lift", "rules", "removed from the rules")
        applied = [r for r in (self.apply(a) for a in wanted) if r.new]
        return applied, lifted

    # -- identities --------------------------------------------------------------------

    def observe(self, subject: Subject, parent: str | None, exp: float | None,
                via: str = "token") -> Node | None:
        """Record the requester's session (and its parent edge) the first time it is seen."""
        node, created = self.graph.observe(subject, parent, self.clock(), exp, via)
        if created and node is not None:
            self._unsaved[node.session] = node
            self._out("node", {"node": node.to_json()})
            if node.parent:
                pnode = self.graph.get(node.parent)
                if pnode is not None and pnode.via == "placeholder":
                    self._unsaved[pnode.session] = pnode
        return node

    def flush(self) -> dict[str, object]:
        """Write the sessions first seen since the last flush; what the store returned for
        each (see ``on_saving``). On a write error the ones not written stay queued (the next
        flush retries) and the error is raised."""
        handles: dict[str, object] = {}
        for node in list(self._unsaved.values()):
            handle = handles[node.session] = self.store.save_node(node)
            self._unsaved.pop(node.session, None)
            if self.on_saving is not None:
                self.on_saving(node, handle)
        return handles

    def unsaved(self, session: str) -> bool:
        """The session is known but not yet handed to the store."""
        return session in self._unsaved

    def requeue(self, node: Node) -> None:
        """A session's write failed: write it again at the next flush (unless it was
        pruned meanwhile)."""
        if self.graph.nodes.get(node.session) is node:
            self._unsaved[node.session] = node

    def verdict(self, subject: Subject) -> Verdict | None:
        return self.board.verdict(subject, self.clock())

    def record_cut(self, action: Action | None, rule: str, flow: dict[str, Any]) -> None:
        self.record_cuts([(action, rule, flow)])

    def record_cuts(self, cuts: list[tuple[Action | None, str, dict[str, Any]]]) -> None:
        """One kill-log row per cut flow, written in one transaction."""
        self.store.append_many([("cut", {"rule": rule, **flow}, a.id if a else None)
                                for a, rule, flow in cuts], at=self.clock())

    def status(self) -> dict[str, Any]:
        now = self.clock()
        return {"actions": [{**a.to_json(), "remaining": (a.until - now) if a.until else None}
                            for a in self.board.actions.values()],
                "sessions": len(self.graph)}

    def prune(self) -> None:
        gone = self.graph.prune(self.clock())
        if gone:
            for session in gone:
                self._unsaved.pop(session, None)
            self.store.forget_nodes(gone)


__all__ += ["GraphError"]
