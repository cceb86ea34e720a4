"""The session graph: which session spawned which, recorded by the gateway itself.

Agents cannot be trusted to report their own lineage, so edges come from two places only:
the gateway's delegation endpoint (a parent's token buys a child token; the edge is written
when the child token is minted) and tokens from a trusted issuer carrying a
``parent_session`` claim (linked the first time the gateway sees the child). A session's
parent never changes after it is first recorded, and an edge that would close a cycle is
refused, so every walk up the graph ends at a root.

"Kill the parent, recall the children" is then a walk: a cascading action on a session
reaches every descendant, and the liveness check before each request walks the other way
(from the requester to its root), so a child first seen after its parent was killed is dead
on arrival.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fleetgate.errors import FleetgateError
from fleetgate.kill.model import Subject

__all__ = ["GraphError", "Node", "SessionGraph"]

MAX_DEPTH = 64  # a hard stop for walks; delegation limits are far lower


class GraphError(FleetgateError, ValueError):
    """An edge the graph refuses (cycle, re-parenting, too deep). ``code`` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Node:
    session: str
    agent: str = ""
    role: str | None = None
    user: str | None = None
    jti: str | None = None
    parent: str | None = None
    depth: int = 0
    created: float = 0.0
    exp: float | None = None
    via: str = "token"  # token (seen on a request) | delegation | placeholder (parent not seen)
    children: list[str] = field(default_factory=list)

    def subject(self) -> Subject:
        return Subject(agent=self.agent, session=self.session, role=self.role, jti=self.jti,
                       user=self.user)

    def to_json(self) -> dict[str, Any]:
        return {"session": self.session, "agent": self.agent, "role": self.role,
                "user": self.user, "jti": self.jti, "parent": self.parent, "depth": self.depth,
                "created": self.created, "exp": self.exp, "via": self.via}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Node:
        return cls(session=str(d["session"]), agent=str(d.get("agent") or ""),
                   role=d.get("role"), user=d.get("user"), jti=d.get("jti"),
                   parent=d.get("parent"), depth=int(d.get("depth") or 0),
                   created=float(d.get("created") or 0.0),
                   exp=float(d["exp"]) if d.get("exp") is not None else None,
                   via=str(d.get("via") or "token"))


class SessionGraph:
    """Sessions and their parent edges. Single-threaded (the proxy's event loop)."""

    def __init__(self, max_nodes: int = 200_000) -> None:
        self.nodes: dict[str, Node] = {}
        self.max_nodes = max_nodes

    def __len__(self) -> int:
        return len(self.nodes)

    def get(self, session: str | None) -> Node | None:
        return self.nodes.get(session) if session else None

    def observe(self, subject: Subject, parent: str | None, now: float,
                exp: float | None = None, via: str = "token") -> tuple[Node | None, bool]:
        """Record the session a request (or a minted token) belongs to.

        Returns ``(node, created)``; ``(None, False)`` for an identity without a session.
        A known session keeps its first parent: a token claiming a different one is refused
        (:class:`GraphError` ``reparent``), as is an edge closing a cycle.
        """
        if not subject.session:
            return None, False
        node = self.nodes.get(subject.session)
        if node is not None and node.via != "placeholder":
            if parent and node.parent != parent:
                raise GraphError("reparent", f"session {subject.session!r} already belongs to "
                                 f"parent {node.parent!r}; a token cannot move it under {parent!r}")
            return node, False
        if parent:
            self._check_edge(parent, subject.session)
        if node is None:
            self._make_room()
            node = Node(session=subject.session, created=now)
            self.nodes[subject.session] = node
        node.agent, node.role, node.user, node.jti = (subject.agent, subject.role, subject.user,
                                                      subject.jti)
        node.exp, node.via = exp, via
        if parent:
            self._attach(node, parent, now)
        return node, True

    def _check_edge(self, parent: str, child: str) -> None:
        if parent == child:
            raise GraphError("cycle", f"session {child!r} cannot be its own parent")
        for anc in self.ancestors(parent):
            if anc.session == child:
                raise GraphError("cycle", f"linking {child!r} under {parent!r} would make a cycle")
        pnode = self.nodes.get(parent)
        if pnode is not None and pnode.depth + 1 > MAX_DEPTH:
            raise GraphError("too_deep", f"session {parent!r} is already {pnode.depth} levels deep")

    def _attach(self, node: Node, parent: str, now: float) -> None:
        pnode = self.nodes.get(parent)
        if pnode is None:  # parent not seen yet: a placeholder keeps the edge killable
            self._make_room()
            pnode = Node(session=parent, created=now, via="placeholder")
            self.nodes[parent] = pnode
        node.parent = parent
        node.depth = pnode.depth + 1
        if node.session not in pnode.children:
            pnode.children.append(node.session)
        self._redepth(node)

    def _redepth(self, node: Node) -> None:
        """A placeholder that became a real node under a parent moves its subtree down."""
        queue = deque([node])
        while queue:
            n = queue.popleft()
            for c in n.children:
                child = self.nodes.get(c)
                if child is not None and child.depth != n.depth + 1:
                    child.depth = n.depth + 1
                    queue.append(child)

    def ancestors(self, session: str | None) -> Iterator[Node]:
        """The session's parent, grandparent, ... up to the root (the session excluded)."""
        node = self.get(session)
        seen = 0
        while node is not None and node.parent and seen < MAX_DEPTH:
            node = self.nodes.get(node.parent)
            if node is None:
                return
            seen += 1
            yield node

    def descendants(self, session: str) -> list[str]:
        """Every session below ``session`` (breadth first, the session excluded)."""
        out: list[str] = []
        seen = {session}
        queue = deque([session])
        while queue:
            node = self.nodes.get(queue.popleft())
            if node is None:
                continue
            for c in node.children:
                if c not in seen:
                    seen.add(c)
                    out.append(c)
                    queue.append(c)
        return out

    def fanout(self, session: str) -> int:
        node = self.nodes.get(session)
        return len(node.children) if node else 0

    def tree(self, root: str | None = None) -> list[dict[str, Any]]:
        """Nested ``{...node, children: [...]}`` for the CLI: one tree per root (or ``root``)."""
        def build(s: str, depth: int) -> dict[str, Any]:
            n = self.nodes[s]
            kids = [build(c, depth + 1) for c in n.children if c in self.nodes and
                    depth < MAX_DEPTH]
            return {**n.to_json(), "children": kids}
        if root is not None:
            return [build(root, 0)] if root in self.nodes else []
        return [build(s, 0) for s, n in self.nodes.items()
                if not n.parent or n.parent not in self.nodes]

    def _make_room(self) -> None:
        """Bound memory: drop the oldest expired leaves, then the oldest leaves."""
        if len(self.nodes) < self.max_nodes:
            return
        leaves = sorted((n for n in self.nodes.values() if not n.children),
                        key=lambda n: (n.exp is None, n.exp or 0.0, n.created))
        for n in leaves[: max(1, len(self.nodes) // 10)]:
            self.remove(n.session)

    def remove(self, session: str) -> None:
        node = self.nodes.pop(session, None)
        if node is None:
            return
        pnode = self.nodes.get(node.parent) if node.parent else None
        if pnode is not None and session in pnode.children:
            pnode.children.remove(session)

    def prune(self, now: float, grace: float = 86_400.0) -> list[str]:
        """Forget sessions whose token expired more than ``grace`` ago and that have no
        children left (a dead branch is forgotten leaf first)."""
        gone: list[str] = []
        changed = True
        while changed:
            changed = False
            for n in list(self.nodes.values()):
                if not n.children and n.exp is not None and n.exp + grace < now:
                    self.remove(n.session)
                    gone.append(n.session)
                    changed = True
        return gone
