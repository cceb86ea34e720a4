"""The one place fleetgate touches a CEL engine.

We use ``common-expression-language`` (import ``cel``, a Rust engine): measured on the
reference machine at ~10 µs per evaluation against ~600 µs for ``cel-python`` on the same
expression, and rules run on every request. Keeping the engine behind this module means a
switch of engine touches one file.

Two properties matter for a gateway and are enforced here, not left to the engine:

* **Everything is checked at load time.** The engine compiles unknown functions and
  variables happily and only fails when they are evaluated. :func:`compile_expr` rejects an
  expression that references a variable outside the declared roots or a function the engine
  cannot call, so a typo in a rule fails the reload instead of every request.
* **Evaluation is total.** :meth:`Expr.evaluate` never raises an engine exception; it returns
  ``True``/``False`` or raises :class:`CelError` with the reason. A missing field
  (``jwt.agent_role`` on a token without the claim) is an error, not ``false``: callers decide
  what an error means (for a gateway: deny). It is raised as :class:`MissingField`, the one
  error a caller may tell apart: a profile selector that reads a claim the token lacks does
  not select, where a rule that cannot be evaluated denies.
* **Evaluation cost is bounded.** The engine cannot be interrupted and holds the GIL while it
  evaluates, so one expensive rule stalls every request. :func:`compile_expr` refuses an
  expression whose worst-case cost (:mod:`fleetgate.celcost`) is over the limit or whose one
  trial evaluation against synthetic facts takes longer than ``TRIAL_BUDGET``; at runtime an
  evaluation that took longer than ``RUNTIME_BUDGET`` raises :class:`TooSlow` (the caller
  denies) and is counted (:func:`over_budget_count`). That cannot pre-empt the evaluation
  already running: the load-time checks are what prevent the freeze.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import re
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fleetgate import celcost
from fleetgate.errors import FleetgateError


def _import_engine() -> types.ModuleType:
    """Import ``cel`` without its command-line tool.

    The package's ``__init__`` imports ``cel.cli`` (typer, rich, prompt_toolkit): 1.2 s of a
    gateway's start-up here, for a REPL the gateway never runs (measured with ``-X importtime``:
    1.19-1.41 s with it, 0.04-0.05 s without). A placeholder stands in for ``cel.cli`` while the
    package initialises and is removed afterwards, so ``import cel.cli`` still works later.
    """
    if "cel" in sys.modules:
        return sys.modules["cel"]
    placeholder = "cel.cli" not in sys.modules
    if placeholder:
        sys.modules["cel.cli"] = types.ModuleType("cel.cli")
    try:
        import cel as engine
    finally:
        if placeholder:
            sys.modules.pop("cel.cli", None)
    if placeholder and isinstance(getattr(engine, "cli", None), types.ModuleType) \
            and not getattr(engine.cli, "__file__", None):
        del engine.cli
    return engine


cel = _import_engine()
from cel import stdlib as _cel_stdlib  # noqa: E402  (after the engine, on purpose)

__all__ = ["Activation", "CelError", "Expr", "MissingField", "TooSlow", "compile_expr",
           "field_reads", "has_unguarded_access", "over_budget_count", "rename_fields",
           "string_literals"]

log = logging.getLogger("fleetgate.rules")

# Functions the Rust engine implements natively (core spec + macros + operators).
_NATIVE_FUNCTIONS = frozenset(
    {
        "size", "contains", "startsWith", "endsWith", "matches", "has", "all", "exists",
        "exists_one", "map", "filter", "int", "uint", "double", "string", "bytes",
        "timestamp", "duration", "dyn", "type", "bool",
        "getFullYear", "getMonth", "getDate", "getDayOfMonth", "getDayOfWeek",
        "getDayOfYear", "getHours", "getMinutes", "getSeconds", "getMilliseconds",
    }
)


def _stdlib_functions() -> dict[str, Callable[..., Any]]:
    """cel-go compatible string/list/math helpers (``lowerAscii``, ``split``...)."""
    ctx = cel.Context()
    _cel_stdlib.add_stdlib_to_context(ctx)
    return dict(ctx.functions)


_EXTRA_FUNCTIONS: dict[str, Callable[..., Any]] = _stdlib_functions()
_KNOWN_FUNCTIONS = _NATIVE_FUNCTIONS | frozenset(_EXTRA_FUNCTIONS)


class CelError(FleetgateError):
    """A CEL expression failed to compile or to evaluate; ``str()`` says why."""


class MissingField(CelError):
    """Evaluation read a map key or field that is not there (CEL's "no such key").

    The engine reports it as ``KeyError``, whichever map it was (``jwt.x``, ``a.b.c``,
    ``request.headers["x"]``); every other engine failure (a type mismatch, a bad
    conversion, an index out of range) stays a plain :class:`CelError`.
    """


class TooSlow(CelError):
    """An evaluation took longer than :data:`fleetgate.celcost.RUNTIME_BUDGET`: its result
    is discarded and the caller treats it as any evaluation error (deny)."""


class _OverBudget:
    """How many evaluations went over the runtime budget, process-wide (a metric reads it)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.count += 1


_OVER_BUDGET = _OverBudget()


def over_budget_count() -> int:
    """Evaluations that took longer than the runtime budget since the process started."""
    return _OVER_BUDGET.count


class Activation:
    """The variables one evaluation sees, converted for the engine once.

    Converting nested request data into the engine costs ~20 µs; evaluating a compiled
    expression against an already converted context costs well under 1 µs. So a request
    builds one ``Activation`` and every rule evaluates against it.
    """

    __slots__ = ("_ctx", "data")

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = dict(data)
        self._ctx = cel.Context(self.data, _EXTRA_FUNCTIONS)

    def set(self, name: str, value: Any) -> None:
        """Replace one root variable in place: judging 1,000 list entries converts only
        ``mcp`` per entry (~12 µs) instead of the whole request each time (~37 µs)."""
        self.data[name] = value
        self._ctx.add_variable(name, value)


@dataclass(frozen=True)
class Expr:
    """A compiled CEL expression that evaluates to a boolean."""

    source: str
    _program: Any = field(repr=False, compare=False)
    variables: frozenset[str] = frozenset()

    def evaluate(self, activation: Activation | Mapping[str, Any]) -> bool:
        """Evaluate against ``activation`` (root name -> plain Python data).

        Raises :class:`CelError` for any engine failure or a non-boolean result.
        """
        result = self.value(activation)
        if not isinstance(result, bool):
            raise CelError(f"expression returned {type(result).__name__}, not bool")
        return result

    def value(self, activation: Activation | Mapping[str, Any]) -> Any:
        """The expression's value, whatever its type (a rate limit's ``key``: a string).

        Raises :class:`CelError` for any engine failure."""
        if not isinstance(activation, Activation):
            activation = Activation(activation)
        start = time.perf_counter()
        try:
            result = self._program.execute(activation._ctx)
        except KeyError as exc:
            self._check_time(start)
            raise MissingField(f"no such field {exc}") from None
        except Exception as exc:  # the engine raises ValueError/TypeError/RuntimeError
            self._check_time(start)
            raise CelError(_first_line(str(exc)) or type(exc).__name__) from None
        self._check_time(start)
        return result

    def _check_time(self, start: float) -> None:
        """Raise :class:`TooSlow` when the evaluation that began at ``start`` overran the
        budget. It has already run to completion (the engine cannot be interrupted): this
        denies the request and says so, it does not give the time back."""
        took = time.perf_counter() - start
        if took <= celcost.RUNTIME_BUDGET:
            return
        _OVER_BUDGET.add()
        log.error("rule expression took %.1f ms, over the %g ms budget: request denied; "
                  "expression: %s", took * 1000, celcost.RUNTIME_BUDGET * 1000, self.source)
        raise TooSlow(f"evaluation took {took * 1000:.0f} ms, over the "
                      f"{celcost.RUNTIME_BUDGET * 1000:g} ms budget; denied")


def compile_expr(source: str, roots: Iterable[str]) -> Expr:
    """Compile ``source``, allowing only the variable names in ``roots``.

    Raises :class:`CelError` with the engine's message (syntax errors carry a column).
    """
    if not isinstance(source, str) or not source.strip():
        raise CelError("expression is empty")
    try:
        program = cel.compile(source)
        refs = program.references()
    except Exception as exc:
        raise CelError(_clean(str(exc))) from None
    allowed = set(roots)
    # Comprehension macros bind their own names (``x`` in ``l.all(x, ...)``); only the
    # first identifier in the source text that is not a bound name is a real root, so we
    # accept bound names when they appear as a macro's first argument.
    bound = _macro_bound_names(source)
    unknown_vars = sorted(v for v in refs["variables"]
                          if v not in allowed and v not in bound and v not in _TYPE_NAMES)
    if unknown_vars:
        raise CelError(
            f"unknown variable {', '.join(unknown_vars)}; available: {', '.join(sorted(allowed))}"
            + _suggest(unknown_vars[0], allowed)
        )
    unknown_fns = sorted(
        f for f in refs["functions"]
        if not (f.startswith("_") or f.startswith("@") or f.startswith("!"))
        and f not in _KNOWN_FUNCTIONS
    )
    if unknown_fns:
        raise CelError(f"unknown function {', '.join(unknown_fns)}"
                       + _suggest(unknown_fns[0], _KNOWN_FUNCTIONS))
    try:
        celcost.check(source)
    except celcost.CostError as exc:
        raise CelError(str(exc)) from None
    _trial(program, tuple(sorted(allowed)))
    return Expr(source=source, _program=program, variables=frozenset(refs["variables"]))


def _suggest(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean startsWith?"``: the choice equal to ``word`` but for case (CEL is
    camelCase: ``startswith``), else the closest by spelling; ``""`` when none is close."""
    choices = sorted(choices)
    folded = [c for c in choices if c.lower() == word.lower()]
    close = folded or difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


_TRIAL_CONTEXTS: dict[tuple[str, ...], Any] = {}


def _trial(program: Any, roots: tuple[str, ...]) -> None:
    """Evaluate ``program`` against synthetic facts and refuse it when that takes longer than
    the trial budget. Its result and errors do not matter, only its time. A slow first run is
    retried twice and the fastest counts, so a scheduling hiccup on a busy machine does not
    refuse a good rules file. The loader runs in a thread, but the engine holds the GIL: the
    static bound (checked first) is what keeps a trial itself short."""
    ctx = _TRIAL_CONTEXTS.get(roots)
    if ctx is None:
        ctx = _TRIAL_CONTEXTS[roots] = cel.Context(celcost.synthetic_activation(roots),
                                                   _EXTRA_FUNCTIONS)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        with contextlib.suppress(Exception):  # only the time of the trial matters
            program.execute(ctx)
        best = min(best, time.perf_counter() - start)
        if best <= celcost.TRIAL_BUDGET:
            return
    raise CelError(f"a trial evaluation against synthetic facts took {best * 1000:.0f} ms "
                   f"(at most {celcost.TRIAL_BUDGET * 1000:g} ms): it would stall the gateway")


# CEL type denotations (``type(x) == string``): the engine reports them as variables.
_TYPE_NAMES = frozenset({"string", "int", "uint", "double", "bool", "bytes", "list", "map",
                         "null_type", "type"})


def _macro_bound_names(source: str) -> set[str]:
    return set(
        re.findall(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,", source)
    )


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _clean(text: str) -> str:
    """Keep the engine's message compact: one line plus the caret diagram if present."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " ".join(lines[:1]) if lines else "invalid expression"


# A CEL string literal: raw or not, single/double quoted, triple quoted, with escapes.
_TRIPLE_1 = "'" * 3
_TRIPLE_2 = '"' * 3
_CEL_STRING = re.compile(
    r"[rR]?(?:"
    + _TRIPLE_1 + r"(?:\\.|[^\\])*?" + _TRIPLE_1 + "|"
    + _TRIPLE_2 + r"(?:\\.|[^\\])*?" + _TRIPLE_2 + "|"
    + r"'(?:\\.|[^'\\\n])*'" + "|"
    + r'"(?:\\.|[^"\\\n])*"'
    + ")", re.S)


def rename_fields(source: str, renames: Mapping[str, str],
                  forbidden: re.Pattern[str] | None = None) -> str | None:
    """``source`` with each dotted field path in ``renames`` (``mcp.tool.name``) replaced by
    a plain variable (``__tool_name``), outside string literals; ``None`` when the result
    would not mean the same (``forbidden`` still matches the code, e.g. another way to reach
    the renamed field).

    Used to judge 1,000 list entries cheaply: converting a map for the engine costs ~3.7 µs
    per entry, a string ~2 µs, so the entry's name travels alone.
    """
    out: list[str] = []
    pos = 0
    patterns = [(re.compile(r"(?<![\w.])" + r"\s*\.\s*".join(map(re.escape, path.split(".")))
                            + r"(?!\w)"), var) for path, var in renames.items()]

    def code(segment: str) -> str | None:
        for rx, var in patterns:
            segment = rx.sub(var, segment)
        if forbidden is not None and forbidden.search(segment):
            return None
        return segment

    for m in _CEL_STRING.finditer(source):
        seg = code(source[pos:m.start()])
        if seg is None:
            return None
        out.append(seg)
        out.append(m.group(0))
        pos = m.end()
    seg = code(source[pos:])
    if seg is None:
        return None
    out.append(seg)
    return "".join(out)


_PLACEHOLDER = re.compile(r"__S(\d+)__")


def string_literals(source: str) -> tuple[str, list[str]]:
    """``source`` with each string literal replaced by ``__S<i>__``, and the literals' values
    (quotes and raw prefix removed; escapes kept as written). What the textual checks below
    and the rules lint (:mod:`fleetgate.policy.lint`) read, so a ``jwt.x`` inside a string
    is never taken for code."""
    literals: list[str] = []

    def stash(m: re.Match[str]) -> str:
        text = m.group(0)
        text = text[1:] if text[:1] in "rR" else text
        quote = 3 if text[:3] in (_TRIPLE_1, _TRIPLE_2) else 1
        literals.append(text[quote:-quote])
        return f"__S{len(literals) - 1}__"

    return _CEL_STRING.sub(stash, source), literals


def field_reads(source: str, root: str = "jwt") -> list[str]:
    """The top-level fields of ``root`` that ``source`` names (``jwt.team``,
    ``jwt["team"]``, also inside ``has()``), in order of first appearance. Textual: for
    warnings only, never for a decision."""
    code, literals = string_literals(source)
    return _field_reads(code, literals, root)


def _field_reads(code: str, literals: list[str], root: str) -> list[str]:
    r = re.escape(root)
    reads: list[str] = []
    for m in re.finditer(rf"(?<![\w.]){r}\s*(?:\.\s*([A-Za-z_]\w*)|\[\s*__S(\d+)__\s*\])", code):
        name = m.group(1) if m.group(1) is not None else literals[int(m.group(2))]
        if name not in reads:
            reads.append(name)
    return reads


def has_unguarded_access(source: str, root: str = "jwt") -> list[str]:
    """The top-level fields of ``root`` that ``source`` reads without a presence test.

    A read of ``jwt.team`` (or ``jwt["team"]``) counts as guarded when the same expression
    also says ``has(jwt.team)`` or ``"team" in jwt``. Used by ``fleetgate rules check`` to
    warn about profile selectors: an unguarded read of a claim the token lacks makes the
    selector not select, which is right for ``jwt.agent_role == "x"`` but surprising for
    ``jwt.team != "x"`` (a token without ``team`` is *not* selected). A textual check, for a
    warning only: it never decides a request.
    """
    code, literals = string_literals(source)
    r = re.escape(root)
    reads = _field_reads(code, literals, root)
    guarded = set(re.findall(rf"(?<![\w.])has\s*\(\s*{r}\s*\.\s*([A-Za-z_]\w*)\s*\)", code))
    guarded.update(literals[int(i)] for i in
                   re.findall(rf"__S(\d+)__\s+in\s+{r}(?![\w.\[])", code))
    return [name for name in reads if name not in guarded]
