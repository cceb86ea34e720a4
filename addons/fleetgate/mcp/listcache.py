"""Verdicts for list entries, remembered: a 1,000-tool ``tools/list`` judged at list speed.

Filtering a list evaluates every rule against every entry, and the same agent (or agents
with the same role) asks for the same list again and again. :class:`ListVerdicts` remembers
whether the rules show an entry, keyed by everything the verdict can depend on and nothing
else, so a hit can never be stale:

* the rules themselves, by value (a reload that changes a rule changes the key; a reload
  that keeps them identical may keep the verdicts, which are then still right). The cache
  is also dropped whenever the policy changes (:meth:`clear`), so it never grows with
  revisions;
* the values of exactly the claims the rules read (:func:`reads`), or all claims when some
  rule reaches ``jwt`` in a way a field list cannot describe (``jwt[k]``, ``jwt`` passed
  whole); the same for ``request`` facts;
* the ``mcp`` facts of the listing that are not the entry (method, server, host, path,
  session id when a rule may read it);
* the entry itself: its kind and its name or URI, which is all of an entry the rules see
  (:func:`fleetgate.mcp.facts.item_facts`).

Only the rules' verdict is cached here; tool vetting (poisoning, pins) is judged beside it
on every listing, so a pin change, an approval or a changed description (a rug pull) is seen
at once. A verdict reached while an evaluation ran over its time budget is not remembered
(the budget is wall-clock time: another run may judge otherwise).

Bounded: at most ``size`` entries, least recently used dropped first. Thread-safe.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from fleetgate.celexpr import string_literals
from fleetgate.rule import Rule

__all__ = ["ALL", "AnswerCache", "HiddenSummary", "ListVerdicts", "reads", "scope_key"]

DEFAULT_SIZE = 100_000  # entries (one per agent-view x entry name); ~200 bytes each

ALL = "*"  # the whole root is read (or may be): key on all of it


def _fields(code: str, literals: list[str], root: str) -> frozenset[str] | None:
    """The fields of ``root`` that ``code`` reads, or ``None`` when it may read any (the root
    is used other than as ``root.field`` or ``root["literal"]``)."""
    r = re.escape(root)
    uses = len(re.findall(rf"(?<![\w.]){r}\b", code))
    names: set[str] = set()
    hits = 0
    for m in re.finditer(rf"(?<![\w.]){r}\s*(?:\.\s*([A-Za-z_]\w*)|\[\s*__S(\d+)__\s*\])", code):
        hits += 1
        names.add(m.group(1) if m.group(1) is not None else literals[int(m.group(2))])
    return frozenset(names) if hits == uses else None


def reads(rules: Iterable[Rule], root: str) -> frozenset[str] | None:
    """The top-level fields of ``root`` (``jwt``, ``request``, ``mcp``) any of ``rules`` may
    read: a safe over-approximation (a field named in code counts even when never reached);
    ``None`` when some rule may read any field of it."""
    out: set[str] = set()
    for r in rules:
        for expr in (r.expr, r.list_expr):
            if expr is None:
                continue
            if expr.variables and root not in expr.variables:
                continue
            code, literals = string_literals(expr.source)
            got = _fields(code, literals, root)
            if got is None:
                return None
            out |= got
    return frozenset(out)


def _pick(values: Mapping[str, Any], fields: frozenset[str] | None) -> str:
    """Canonical JSON of the ``fields`` of ``values`` (all of them for ``None``)."""
    chosen = dict(values) if fields is None else {k: values[k] for k in fields if k in values}
    return json.dumps(chosen, sort_keys=True, separators=(",", ":"), default=repr)


class _Reads:
    """What one rules tuple reads, computed once per rules tuple."""

    __slots__ = ("jwt", "mcp", "request")

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.jwt = reads(rules, "jwt")
        self.request = reads(rules, "request")
        self.mcp = reads(rules, "mcp")


def scope_key(rules: tuple[Rule, ...], claims: Mapping[str, Any], request: Mapping[str, Any],
              base: Mapping[str, Any], what: _Reads | None = None) -> Hashable:
    """Everything but the entry that a list verdict depends on. ``base``: the listing's
    ``mcp`` facts without the entry (:func:`fleetgate.mcp.facts.base_facts`)."""
    what = what or _Reads(rules)
    session = base.get("session_id") if what.mcp is None or "session_id" in what.mcp else None
    mcp_part = {k: v for k, v in base.items() if k not in ("tool", "prompt", "resource")}
    if session is None:
        mcp_part.pop("session_id", None)
    return (rules, _pick(claims, what.jwt), _pick(request, what.request),
            json.dumps(mcp_part, sort_keys=True, separators=(",", ":"), default=repr))


class ListVerdicts:
    """Remembered list verdicts (``True``: the rules show the entry), LRU-bounded."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._verdicts: OrderedDict[tuple[int, str, str], bool] = OrderedDict()
        self._reads: dict[tuple[Rule, ...], _Reads] = {}
        # scope key -> a number standing for it (hashed once per listing, not per entry);
        # numbers are never reused, so a verdict of a forgotten scope is never found again
        self._scopes: dict[Hashable, int] = {}
        self._next = 0
        self.hits = 0
        self.misses = 0

    def key(self, rules: tuple[Rule, ...], claims: Mapping[str, Any],
            request: Mapping[str, Any], base: Mapping[str, Any]) -> int:
        """The number standing for this listing's scope (see :func:`scope_key`)."""
        with self._lock:
            what = self._reads.get(rules)
        if what is None:
            what = _Reads(rules)
        full = scope_key(rules, claims, request, base, what)
        with self._lock:
            self._reads[rules] = what
            n = self._scopes.get(full)
            if n is None:
                if len(self._scopes) >= self.size:  # many scopes, few hits: start over
                    self._scopes.clear()
                    self._verdicts.clear()
                n = self._scopes[full] = self._next
                self._next += 1
            return n

    def get(self, scope: int, kind: str, target: str) -> bool | None:
        k = (scope, kind, target)
        with self._lock:
            hit = self._verdicts.get(k)
            if hit is None:
                self.misses += 1
                return None
            self._verdicts.move_to_end(k)
            self.hits += 1
            return hit

    def put(self, scope: int, kind: str, target: str, shown: bool) -> None:
        with self._lock:
            self._verdicts[(scope, kind, target)] = shown
            if len(self._verdicts) > self.size:
                self._verdicts.popitem(last=False)

    def clear(self) -> None:
        """Forget everything (a new policy: its rules decide from now on)."""
        with self._lock:
            self._verdicts.clear()
            self._reads.clear()
            self._scopes.clear()

    def __len__(self) -> int:
        return len(self._verdicts)


@dataclass(frozen=True)
class HiddenSummary:
    """What the log and metrics need of an answer's hidden entries: the first few named,
    counts per reason. Remembered with a cached answer instead of every entry."""

    NAMED: ClassVar[int] = 20  # the decision log names this many; metrics count all

    first: tuple[tuple[str, str], ...]
    reasons: tuple[tuple[str, int], ...]
    total: int

    @classmethod
    def of(cls, hidden: list[tuple[str, str]]) -> HiddenSummary:
        counts: dict[str, int] = {}
        for _, why in hidden:
            reason = ("poisoning" if why.startswith("tool poisoning") else
                      "pin" if "approv" in why else "policy")
            counts[reason] = counts.get(reason, 0) + 1
        return cls(tuple(hidden[:cls.NAMED]), tuple(counts.items()), len(hidden))


class AnswerCache:
    """Whole rewritten answers, remembered by the exact bytes the server sent.

    Parsing and re-serialising a 1,000-tool answer costs more than judging it, so an answer
    whose bytes were already judged under the same key is not parsed again: the same bytes
    parse to the same messages, and the key (:meth:`key`) holds everything else the rewrite
    reads: the list-verdict scope (rules, the claims and facts they read: :meth:`ListVerdicts.key`),
    which requests the ids answer, the vetting state (its version moves with every pin, pending
    definition and listing that changes), the server's vetting modes and the JSON depth limit.
    Only answers with no placeholder to swap are cached. An answer is remembered only when the
    vetting state did not move while it was judged, so replaying it (a summary of its hidden
    entries is returned for metrics and the log) leaves that state as judging it again would.

    Bounded by total bytes held (least recently used dropped first). Thread-safe."""

    def __init__(self, max_bytes: int = 32 << 20) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._answers: OrderedDict[Hashable, tuple[bytes | None, HiddenSummary]] = OrderedDict()
        self._bytes = 0
        self.hits = 0

    @staticmethod
    def key(body: bytes, methods: Mapping[str, str], scope: int, vetting: object,
            version: Hashable, modes: Hashable) -> Hashable:
        """``scope``: the list-verdict scope number; ``vetting``: the vetting object itself
        (a new pin store is a new object) and its ``version``; ``modes``: the server's
        vetting modes and anything else the rewrite depends on."""
        return (hashlib.sha256(body).digest(), len(body), frozenset(methods.items()), scope,
                vetting, version, modes)

    def get(self, key: Hashable) -> tuple[bytes | None, HiddenSummary] | None:
        with self._lock:
            hit = self._answers.get(key)
            if hit is None:
                return None
            self._answers.move_to_end(key)
            self.hits += 1
        return hit

    @staticmethod
    def _size(answer: bytes | None) -> int:
        return len(answer or b"") + 4096  # the key and the hidden summary, roughly

    def put(self, key: Hashable, answer: bytes | None, hidden: list[tuple[str, str]]) -> None:
        size = self._size(answer)
        if size > self.max_bytes // 4:
            return
        summary = HiddenSummary.of(hidden)
        with self._lock:
            old = self._answers.pop(key, None)
            if old is not None:
                self._bytes -= self._size(old[0])
            self._answers[key] = (answer, summary)
            self._bytes += size
            while self._bytes > self.max_bytes and self._answers:
                _, (a, _h) = self._answers.popitem(last=False)
                self._bytes -= self._size(a)

    def clear(self) -> None:
        with self._lock:
            self._answers.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._answers)
