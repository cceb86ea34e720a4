"""A worst-case cost bound for a CEL expression, computed from its text at load time.

Why: the CEL engine (``common-expression-language``, a Rust extension) neither exposes its
syntax tree nor lets anything interrupt an evaluation, and it holds the GIL while it runs
(measured: a 1 ms ticker thread ticked once during a 0.37 s evaluation). One rule such as
five nested comprehensions over 20-element lists (``[0..19].all(a, [0..19].all(b, ...))``:
3.2 million iterations, ~0.4-2 s per evaluation) therefore freezes every agent's requests,
not only the ones it judges. The only place to stop that is before the rule ever runs.

So this module parses CEL text itself (the grammar of the CEL spec; the engine has already
accepted the text, this parser only needs its shape) and bounds the number of evaluation
steps: every node costs 1, a comprehension (``all``, ``exists``, ``exists_one``, ``map``,
``filter``) costs its range plus ``size(range) * (1 + cost(body))``. A list's size is known
for a literal (``[1, 2, 3]``: 3; ``l.map(..)``/``l.filter(..)``: at most ``size(l)``; ``a + b``:
the sum) and otherwise, for lists and maps that come from the request or the token
(``jwt.groups``, ``request.path.split("/")``, ``mcp.tool.arguments``), counted as
:data:`UNKNOWN_SIZE`. An expression is refused when the bound exceeds :data:`MAX_COST` or
its comprehensions nest deeper than :data:`MAX_NESTING`.

The bound is a guard, not a profiler: string functions on long strings (``matches``,
``split``) cost more than one step each. The timed trial at load (:data:`TRIAL_BUDGET`) and
the per-evaluation budget (:data:`RUNTIME_BUDGET`), both applied in :mod:`fleetgate.celexpr`,
catch what the bound does not model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fleetgate.errors import ConfigError

__all__ = ["MAX_COST", "MAX_NESTING", "RUNTIME_BUDGET", "TRIAL_BUDGET", "UNKNOWN_SIZE", "Cost",
           "CostError", "analyse", "check", "synthetic_activation"]

# Measured on the reference 2-core machine: ~40-60 ns per step, so 100,000 steps is ~4-6 ms.
MAX_COST = 100_000
# Comprehensions inside comprehensions inside comprehensions: nothing a gateway rule needs.
MAX_NESTING = 3
# The size assumed for a list or map whose length the rules file does not fix (claims,
# headers, query, path segments, tool arguments). Two such nested comprehensions cost
# ~100 * 100 * body steps: still under MAX_COST for a small body.
UNKNOWN_SIZE = 100
# A rule whose one trial evaluation against synthetic facts takes longer is refused at load.
TRIAL_BUDGET = 0.050
# An evaluation that took longer at runtime is treated as an error (the request is denied).
RUNTIME_BUDGET = 0.100

_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})


class CostError(ConfigError):
    """An expression's worst-case evaluation cost is over a limit; ``str()`` says which."""


@dataclass(frozen=True)
class Cost:
    """What :func:`analyse` found: ``steps`` (the bound) and ``nesting`` (deepest
    comprehension nesting)."""

    steps: int
    nesting: int


# --- tokens ---------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|//[^\n]*)
  | (?P<str>(?:[bB][rR]?|[rR][bB]?)?(?:'''(?:\\.|[^\\])*?'''|\"\"\"(?:\\.|[^\\])*?\"\"\"
            |'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*"))
  | (?P<num>0[xX][0-9a-fA-F]+[uU]?|(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?[uU]?)
  | (?P<id>[A-Za-z_]\w*|`[^`]*`)
  | (?P<op>==|!=|<=|>=|&&|\|\||\.\?|[-+*/%!<>?:.,()\[\]{}])
    """,
    re.X | re.S,
)


def _tokens(source: str) -> list[str]:
    out: list[str] = []
    pos = 0
    while pos < len(source):
        m = _TOKEN.match(source, pos)
        if m is None:
            raise CostError(f"cannot analyse the expression at column {pos + 1}")
        if m.lastgroup == "str":
            out.append('"')  # a literal; its text does not matter
        elif m.lastgroup == "num":
            out.append("0")
        elif m.lastgroup != "ws":
            out.append(m.group(0))
        pos = m.end()
    return out


# --- syntax tree ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Node:
    kind: str  # lit, ident, list, map, select, index, call, op
    name: str = ""
    args: tuple[_Node, ...] = ()
    target: _Node | None = None


class _Parser:
    """Recursive descent over the CEL grammar (spec ``langdef.md``)."""

    def __init__(self, tokens: list[str]) -> None:
        self.toks = tokens
        self.i = 0

    def peek(self) -> str:
        return self.toks[self.i] if self.i < len(self.toks) else ""

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if not tok or (expected is not None and tok != expected):
            raise CostError(f"cannot analyse the expression: expected {expected or 'more'}, "
                            f"got {tok or 'the end'}")
        self.i += 1
        return tok

    def parse(self) -> _Node:
        node = self.expr()
        if self.peek():
            raise CostError(f"cannot analyse the expression: unexpected {self.peek()}")
        return node

    def expr(self) -> _Node:
        cond = self.binary(0)
        if self.peek() == "?":
            self.take()
            then = self.binary(0)
            self.take(":")
            other = self.expr()
            return _Node("op", "?:", (cond, then, other))
        return cond

    _LEVELS: tuple[frozenset[str], ...] = (
        frozenset({"||"}), frozenset({"&&"}),
        frozenset({"<", "<=", ">", ">=", "==", "!=", "in"}),
        frozenset({"+", "-"}), frozenset({"*", "/", "%"}),
    )

    def binary(self, level: int) -> _Node:
        if level == len(self._LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        while self.peek() in self._LEVELS[level]:
            op = self.take()
            left = _Node("op", op, (left, self.binary(level + 1)))
        return left

    def unary(self) -> _Node:
        if self.peek() in ("!", "-"):
            op = self.take()
            return _Node("op", op, (self.unary(),))
        return self.member()

    def member(self) -> _Node:
        node = self.primary()
        while True:
            tok = self.peek()
            if tok in (".", ".?"):
                self.take()
                name = self.take()
                if self.peek() == "(":
                    node = _Node("call", name, self.args(")"), node)
                else:
                    node = _Node("select", name, (), node)
            elif tok == "[":
                self.take()
                if self.peek() == "?":  # an optional index: m[?k]
                    self.take()
                index = self.expr()
                self.take("]")
                node = _Node("index", "", (index,), node)
            elif tok == "{" and node.kind in ("ident", "select"):  # a message literal
                node = _Node("map", "", self.entries(), None)
            else:
                return node

    def args(self, close: str) -> tuple[_Node, ...]:
        self.take()  # the opening bracket
        items: list[_Node] = []
        while self.peek() != close:
            if self.peek() == "?":  # an optional list entry: [?x]
                self.take()
            items.append(self.expr())
            if self.peek() != ",":
                break
            self.take()
        self.take(close)
        return tuple(items)

    def entries(self) -> tuple[_Node, ...]:
        self.take("{")
        items: list[_Node] = []
        while self.peek() != "}":
            if self.peek() == "?":
                self.take()
            items.append(self.expr())
            self.take(":")
            items.append(self.expr())
            if self.peek() != ",":
                break
            self.take()
        self.take("}")
        return tuple(items)

    def primary(self) -> _Node:
        tok = self.peek()
        if tok == ".":  # a fully qualified name: .a.b
            self.take()
            tok = self.peek()
        if tok == "(":
            self.take()
            node = self.expr()
            self.take(")")
            return node
        if tok == "[":
            return _Node("list", "", self.args("]"))
        if tok == "{":
            return _Node("map", "", self.entries())
        if tok in ('"', "0"):
            self.take()
            return _Node("lit")
        if tok and (tok[0].isalpha() or tok[0] in "_`"):
            self.take()
            if self.peek() == "(":
                return _Node("call", tok, self.args(")"))
            if tok in ("true", "false", "null"):
                return _Node("lit")
            return _Node("ident", tok)
        raise CostError(f"cannot analyse the expression: unexpected {tok or 'end'}")


# --- the bound ------------------------------------------------------------------------------

def _size(node: _Node) -> int:
    """An upper bound on the length of the list or map ``node`` evaluates to."""
    if node.kind in ("list",):
        return len(node.args)
    if node.kind == "map":
        return len(node.args) // 2
    if node.kind == "call" and node.target is not None and node.name in ("map", "filter"):
        return _size(node.target)
    if node.kind == "op" and node.name == "+":
        return sum(_size(a) for a in node.args)
    if node.kind == "op" and node.name == "?:":
        return max(_size(node.args[1]), _size(node.args[2]))
    if node.kind == "call" and node.target is None and node.name == "dyn" and node.args:
        return _size(node.args[0])
    return UNKNOWN_SIZE


def _walk(node: _Node) -> Cost:
    """The step bound and comprehension nesting of ``node``."""
    children = [*([node.target] if node.target is not None else []), *node.args]
    if node.kind == "call" and node.name in _MACROS and node.target is not None \
            and len(node.args) in (2, 3):
        rng = _walk(node.target)
        body = [_walk(a) for a in node.args[1:]]
        per_item = 1 + sum(c.steps for c in body)
        return Cost(rng.steps + _size(node.target) * per_item,
                    max(rng.nesting, 1 + max(c.nesting for c in body)))
    costs = [_walk(c) for c in children]
    steps = 1 + sum(c.steps for c in costs)
    if node.kind == "op" and node.name == "in":  # a linear search of the right side
        steps += _size(node.args[1])
    return Cost(steps, max((c.nesting for c in costs), default=0))


_COMPREHENSION = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(")
_IN = re.compile(r"\bin\b")


def analyse(source: str) -> Cost:
    """The worst-case :class:`Cost` of ``source``; :class:`CostError` when the text cannot
    be analysed (refused: a rule whose cost is unknown may be the one that freezes).

    Without a comprehension every node is evaluated at most once, so the text bounds the
    cost: at most one node per character, plus a linear search per ``in`` of a list no
    longer than :data:`UNKNOWN_SIZE` or the text's commas (a literal list has fewer
    entries). That answer costs ~2 µs instead of a parse (~80 µs): a policy of 5,000 simple
    rules loads as fast as before (measured: ~1.0 s either way).
    """
    if not _COMPREHENSION.search(source):
        ins = len(_IN.findall(source))
        return Cost(len(source) + ins * max(source.count(",") + 1, UNKNOWN_SIZE), 0)
    return _walk(_Parser(_tokens(source)).parse())


def check(source: str, *, max_cost: int = MAX_COST, max_nesting: int = MAX_NESTING) -> Cost:
    """:func:`analyse`, raising :class:`CostError` when a limit is exceeded."""
    cost = analyse(source)
    if cost.nesting > max_nesting:
        raise CostError(f"comprehensions nest {cost.nesting} deep (at most {max_nesting}): "
                        "one evaluation could freeze the gateway")
    if cost.steps > max_cost:
        raise CostError(f"worst-case cost {cost.steps:,} steps exceeds the limit of "
                        f"{max_cost:,} (nested comprehensions multiply their list sizes; "
                        f"a list from request data counts as {UNKNOWN_SIZE})")
    return cost


def synthetic_activation(roots: Iterable[str]) -> dict[str, Any]:
    """Representative facts for a trial evaluation: every root a rule may read, with the
    fields the gateway fills in (and lists of plausible length)."""
    groups = [f"group-{i}" for i in range(10)]
    headers = {f"x-header-{i}": f"value-{i}" for i in range(10)}
    known: dict[str, Any] = {
        "jwt": {"sub": "agent-trial", "agent_id": "agent-trial", "agent_role": "worker",
                "session_id": "s-trial", "team": "trial", "groups": groups,
                "scope": "read write", "scopes": ["read", "write"], "iss": "trial",
                "aud": "fleetgate", "jti": "j-trial", "exp": 0, "iat": 0},
        "request": {"method": "POST", "scheme": "https", "host": "api.example.com",
                    "port": 443, "path": "/v1/trial/path/with/segments",
                    "raw_path": "/v1/trial/path/with/segments?q=1",
                    "query": {"q": "1", "page": "2"}, "headers": headers},
        "llm": {"is_llm": True, "provider": "openai", "api": "chat", "operation": "chat",
                "model": "gpt-trial", "streaming": False, "max_tokens": 1000,
                "has_max_tokens": True, "tools": ["search", "fetch"],
                "estimated_input_tokens": 1000},
        "a2a": {"is_a2a": True, "method": "message/send", "rpc_method": "SendMessage",
                "target": "trial-target", "sender": "agent-trial", "context_id": "c-trial",
                "task_id": "t-trial", "message_id": "m-trial", "role": "user",
                "parts": ["text", "file", "data"], "depth": 2, "counted_depth": 2,
                "claimed_depth": 1, "streaming": False},
        "mcp": {"method": "tools/call", "server": "trial",
                "tool": {"name": "trial_tool", "arguments": {"query": "trial", "limit": 10}}},
    }
    return {root: known.get(root, {}) for root in roots}
