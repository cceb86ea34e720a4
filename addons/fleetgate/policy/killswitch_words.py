"""The words of KILLSWITCH.md: its vocabulary, FORBIDDEN entries, the prose-trigger grammar.

Read by :mod:`fleetgate.policy.killswitch_md` (see its docstring for the document format):
the tables say which words mean which step, measure or section; :func:`prose_trigger`
reads one ``<measure> <op> <amount>[/<period>] ...`` line into a :class:`Draft`, which the
parser turns into a :class:`~fleetgate.kill.triggers.TriggerSpec` once the ladder is known.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Literal

from fleetgate.durations import SPOKEN, unit_seconds
from fleetgate.kill.model import ScopeKind, Verb
from fleetgate.kill.triggers import Metric
from fleetgate.mcp.policy import glob_to_cel
from fleetgate.netaddr import HostPattern

__all__ = ["AGENT", "ARROW", "BULLET", "COUNTS", "FORBIDDEN_BLOCKS", "FRONT_KEYS", "HEADING",
           "KEY_VALUE", "LEVEL_KEYS", "RATE", "RULE", "SECTIONS", "SPEC_TRIGGERS", "TITLE",
           "UNMEASURED_TRIGGERS", "VERBS", "Draft", "Forbidden", "Level", "check_ladder",
           "normalise", "prose_trigger", "strip_comment", "to_fraction", "to_number", "to_verb",
           "unquote"]

_ForbiddenKind = Literal["tool", "host", "method", "path"]

_METHOD_NAME = re.compile(r"^[A-Z][A-Z0-9_-]*$")


@dataclass(frozen=True)
class Forbidden:
    """One FORBIDDEN entry, turned into a CEL deny expression by :meth:`cel`."""

    kind: _ForbiddenKind
    pattern: str
    line: int

    def __post_init__(self) -> None:
        p = self.pattern.strip()
        if not p or any(c in p for c in "\r\n\0"):
            raise ValueError(f"bad {self.kind} pattern {self.pattern!r}")
        if self.kind == "tool":
            glob_to_cel(p)  # validates
        elif self.kind == "host":
            hp = HostPattern(p)
            if hp.host == "*":
                raise ValueError("forbidding every host ('*') is not a FORBIDDEN entry: "
                                 "list the hosts the agent may reach in the rules' egress")
            p = hp.host + (f":{hp.port}" if hp.port is not None else "")
        elif self.kind == "method":
            p = p.upper()
            if not _METHOD_NAME.match(p):
                raise ValueError(f"bad HTTP method {self.pattern!r}")
        elif self.kind == "path":
            if not p.startswith("/"):
                raise ValueError(f"a forbidden path starts with '/' (got {self.pattern!r})")
            if p.endswith("*"):
                p = p.rstrip("*")
            if "*" in p or "?" in p:
                raise ValueError(f"a forbidden path is a prefix; only a trailing '*' is "
                                 f"allowed (got {self.pattern!r})")
        else:
            raise ValueError(f"unknown forbidden kind {self.kind!r}")
        object.__setattr__(self, "pattern", p)

    def cel(self) -> str:
        """A CEL expression over ``mcp`` (tools) or ``request`` that is true when this entry
        forbids the message. Strings are JSON-quoted (valid CEL string literals)."""
        lit = json.dumps
        if self.kind == "tool":
            return glob_to_cel(self.pattern)
        if self.kind == "method":
            return f"request.method == {lit(self.pattern)}"
        if self.kind == "path":
            return f"request.path.startsWith({lit(self.pattern)})"
        hp = HostPattern(self.pattern)
        expr = (f"request.host.endsWith({lit(hp.host[1:])})" if hp.host.startswith("*.")
                else f"request.host == {lit(hp.host)}")
        return expr if hp.port is None else f"{expr} && request.port == {hp.port}"



# -- vocabulary ---------------------------------------------------------------------------

VERBS = {
    "throttle": Verb.THROTTLE, "slow": Verb.THROTTLE, "slow down": Verb.THROTTLE,
    "reduce rate": Verb.THROTTLE, "rate limit": Verb.THROTTLE,
    "pause": Verb.PAUSE, "pause and notify": Verb.PAUSE, "suspend": Verb.PAUSE,
    "stop": Verb.STOP, "full stop": Verb.STOP, "shutdown": Verb.STOP, "shut down": Verb.STOP,
    "halt": Verb.STOP, "kill": Verb.STOP, "terminate": Verb.STOP,
}

_METRICS = {
    **dict.fromkeys(("spend", "spending", "cost", "costs", "usd", "dollars", "llm spend",
                     "llm cost"), Metric.USD),
    **dict.fromkeys(("tokens", "llm tokens", "token usage"), Metric.TOKENS),
    **dict.fromkeys(("requests", "calls", "api calls", "http requests"), Metric.REQUESTS),
    **dict.fromkeys(("errors", "upstream errors", "failures", "failed requests",
                     "failed calls"), Metric.ERRORS),
    **dict.fromkeys(("denials", "denied requests", "denied calls"), Metric.DENIALS),
    **dict.fromkeys(("error rate", "failure rate"), Metric.ERROR_RATE),
    **dict.fromkeys(("denial rate", "deny rate"), Metric.DENIAL_RATE),
    **dict.fromkeys(("identical requests", "repeated requests", "duplicate requests",
                     "identical calls", "repeated calls"), Metric.IDENTICAL_REQUESTS),
    **dict.fromkeys(("message depth", "depth"), Metric.MESSAGE_DEPTH),
    **dict.fromkeys(("delegation depth", "sub agent depth"), Metric.DELEGATION_DEPTH),
    **dict.fromkeys(("delegation fanout", "delegation fan out", "fanout", "fan out",
                     "sub agents", "subagents"), Metric.DELEGATION_FANOUT),
}
COUNTS = {Metric.REQUESTS, Metric.TOKENS, Metric.ERRORS, Metric.DENIALS,
           Metric.MESSAGE_DEPTH, Metric.DELEGATION_DEPTH, Metric.DELEGATION_FANOUT}

# the spec's TRIGGERS keys: metric, key, window
SPEC_TRIGGERS = {
    "cost_limit_usd": (Metric.USD, ScopeKind.SESSION, 86400.0),
    "cost_limit_daily_usd": (Metric.USD, ScopeKind.AGENT, 86400.0),
    "tokens_per_minute": (Metric.TOKENS, ScopeKind.AGENT, 60.0),
    "api_calls_per_minute": (Metric.REQUESTS, ScopeKind.AGENT, 60.0),
    "error_rate_threshold": (Metric.ERROR_RATE, ScopeKind.AGENT, 60.0),
    "consecutive_failures": (Metric.ERRORS, ScopeKind.AGENT, 60.0),
}
UNMEASURED_TRIGGERS = {"runtime_limit_minutes": "the gateway does not see an agent's runtime"}

FORBIDDEN_BLOCKS: dict[str, str] = {
    **dict.fromkeys(("tool", "tools", "action", "actions"), "tool"),
    **dict.fromkeys(("host", "hosts", "domain", "domains"), "host"),
    **dict.fromkeys(("method", "methods"), "method"),
    **dict.fromkeys(("path", "paths"), "path"),
    **dict.fromkeys(("file", "files", "directory", "directories"), "files"),
    "network": "network",
}
LEVEL_KEYS = {"action", "timeout_minutes", "timeout", "notify", "channels", "save_state",
               "allow_restart", "description"}
FRONT_KEYS = {"agent", "role", "title", "description", "owner", "version", "spec",
               "spec_version", "spec_url"}
SECTIONS: dict[str, str | None] = {"TRIGGERS": "triggers", "FORBIDDEN": "forbidden",
                                    "ESCALATION": "escalation", "AUDIT": None,
                                    "OVERRIDE": None, "METADATA": None}

ARROW = re.compile(r"\s*(?:->|→|=>|⇒)\s*")
BULLET = re.compile(r"^(?:[-*+]|\d+[.)])\s+")
KEY_VALUE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:(?:\s+(.*))?$")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
RULE = re.compile(r"^(?:-{3,}|\*{3,}|_{3,})$")
TITLE = re.compile(r"^KILLSWITCH(?:\.md)?\b\s*(?:[:\u2014\u2013-]+|\bfor\b)?\s*(?P<agent>.*)$", re.I)
AGENT = re.compile(r"^[A-Za-z0-9_.@:/-]+$")
_COND = re.compile(r"^(?P<metric>[^<>=≥]+?)\s*(?P<op>>=|≥|>)\s*(?P<rest>.+)$")
_QTY = re.compile(r"^(?P<dollar>\$)?\s*(?P<num>\d[\d,]*(?:\.\d+)?|\.\d+)"
                  r"(?:\s*(?P<mult>[kKmM])(?![A-Za-z]))?\s*(?P<pct>%)?"
                  r"\s*(?P<usd>usd\b|dollars?\b)?", re.I)
_UNIT_WORD = re.compile(r"^(?:tokens?|requests?|calls?|api calls?|errors?|failures?|denials?|"
                        r"levels?|hops?|sub-?agents?)\b", re.I)
_SCOPE = re.compile(r"^(?:per|for each|each)\s+(?P<per>agent|session)\b", re.I)
_WINDOW = re.compile(r"^(?:/|(?:in|within|over|per|every|each|a|an)\b)\s*(?:the\s+)?(?:last\s+)?"
                     + SPOKEN, re.I)
_MIN = re.compile(r"^(?:with\s+)?(?:at\s+least|min(?:imum)?)\s+(?P<n>\d+)\s+"
                  r"(?:requests?|responses?|calls?)\b", re.I)
_SEP = re.compile(r"^(?:[,;]|and\b)", re.I)
RATE = re.compile(r"^(?P<count>\d+)\s*(?:requests?|req|calls?)?\s*(?:/|per\b|every\b)\s*" + SPOKEN
                   + r"$", re.I)


def normalise(text: str) -> str:
    text = text.strip().strip("*_`\"'.:").lower()
    return re.sub(r"[\s_-]+", " ", text).strip()


def to_verb(text: str) -> Verb:
    v = VERBS.get(normalise(text))
    if v is None:
        raise ValueError(f"unknown escalation step {text.strip()!r}: use throttle, pause or stop")
    return v


def unquote(text: str) -> str:
    t = text.strip().rstrip(",").strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'`":
        return t[1:-1]
    return t


def to_number(text: str) -> tuple[float, bool, bool]:
    """``$5`` / ``50,000`` / ``50k`` / ``25%`` -> (value, is_money, is_percent)."""
    t = unquote(text)
    m = _QTY.fullmatch(t.strip())
    if m is None:
        raise ValueError(f"expected a number, got {text.strip()!r}")
    return _qty_value(m), bool(m.group("dollar") or m.group("usd")), bool(m.group("pct"))


def _qty_value(m: re.Match[str]) -> float:
    v = float(m.group("num").replace(",", ""))
    mult = (m.group("mult") or "").lower()
    return v * {"": 1.0, "k": 1e3, "m": 1e6}[mult]


def strip_comment(text: str) -> str:
    """Drop a ``# comment`` that follows whitespace, outside quotes."""
    quote = ""
    for i, c in enumerate(text):
        if quote:
            if c == quote:
                quote = ""
        elif c in "\"'`" and (i == 0 or text[i - 1] in " \t[,:("):
            quote = c
        elif c == "#" and i > 0 and text[i - 1] in " \t":
            return text[:i].rstrip()
    return text.rstrip()


@dataclass
class Draft:
    line: int
    metric: Metric
    above: float
    window: float = 60.0
    per: ScopeKind = ScopeKind.AGENT
    steps: list[Verb] = field(default_factory=list)
    min_requests: int = 10


@dataclass
class Level:
    line: int
    indent: int
    n: int
    verb: Verb | None
    timeout: float | None = None
    channels: bool = False


def check_ladder(verbs: tuple[Verb, ...]) -> None:
    if not verbs:
        raise ValueError("the ladder needs at least one step")
    if any(b.strength <= a.strength for a, b in itertools.pairwise(verbs)):
        raise ValueError("ladder steps must grow in strength (throttle -> pause -> stop), got "
                         + " -> ".join(v.value for v in verbs))


def to_fraction(v: float, pct: bool, what: str) -> float:
    if pct:
        v /= 100
    elif v > 1:
        raise ValueError(f"{what}: write a rate as a percentage (50%) or a fraction (0.5)")
    if not 0 <= v < 1:
        raise ValueError(f"{what}: a rate limit must be below 100%")
    return v


def prose_trigger(text: str, no: int) -> Draft:
    parts = ARROW.split(text.strip())
    m = _COND.match(parts[0].strip())
    if m is None:
        raise ValueError(f"cannot read trigger {text.strip()!r}: write e.g. "
                         "'- spend > $5/hour -> pause' or '- identical requests >= 5 in 60s'")
    metric = _METRICS.get(normalise(m.group("metric")))
    if metric is None:
        raise ValueError(f"unknown measure {m.group('metric').strip()!r}: use spend, tokens, "
                         "requests, errors, denials, error rate, denial rate, identical "
                         "requests, message depth, delegation depth or delegation fanout")
    rest = m.group("rest").strip()
    q = _QTY.match(rest)
    if q is None or not q.group("num"):
        raise ValueError(f"expected an amount after {m.group('op')!r}, got {rest!r}")
    value, money, pct = _qty_value(q), bool(q.group("dollar") or q.group("usd")), bool(q.group("pct"))
    draft = Draft(no, metric, value, steps=[to_verb(p) for p in parts[1:]])
    window: float | None = None
    rest = rest[q.end():].strip()
    u = _UNIT_WORD.match(rest)
    if u is not None:
        rest = rest[u.end():].strip()
    while rest:
        if (s := _SEP.match(rest)) is not None:
            rest = rest[s.end():].strip()
        elif (s := _SCOPE.match(rest)) is not None:
            draft.per = ScopeKind(s.group("per").lower())
            rest = rest[s.end():].strip()
        elif (s := _MIN.match(rest)) is not None:
            if not metric.is_rate:
                raise ValueError("'min N requests' applies to error rate and denial rate only")
            draft.min_requests = int(s.group("n"))
            rest = rest[s.end():].strip()
        elif (s := _WINDOW.match(rest)) is not None:
            if window is not None:
                raise ValueError("the window is given twice")
            window = float(s.group("n") or 1) * unit_seconds(s.group("u"))
            rest = rest[s.end():].strip()
        else:
            raise ValueError(f"cannot read {rest!r} in trigger {text.strip()!r}")
    if metric.per_event and window is not None:
        raise ValueError(f"{metric.value.replace('_', ' ')} is judged per request: it takes "
                         "no window")
    if window is not None:
        if window <= 0:
            raise ValueError("the window must be longer than 0s")
        draft.window = window
    if money and metric is not Metric.USD:
        raise ValueError(f"{metric.value} is not an amount of money")
    if metric.is_rate:
        value = to_fraction(value, pct, metric.value.replace("_", " "))
    elif pct:
        raise ValueError(f"{metric.value} is not a percentage")
    inclusive = m.group("op") in (">=", "≥")
    if metric is Metric.IDENTICAL_REQUESTS:
        if value != int(value):
            raise ValueError("identical requests are counted in whole numbers")
        draft.above = value if inclusive else value + 1
    elif metric in COUNTS:
        if value != int(value):
            raise ValueError(f"{metric.value} are counted in whole numbers")
        if inclusive and value < 1:
            raise ValueError("'>= 0' is always true: use a limit of at least 1")
        draft.above = value - 1 if inclusive else value
    else:
        if inclusive and value <= 0:
            raise ValueError("'>= 0' is always true: use '> 0'")
        draft.above = math.nextafter(value, -math.inf) if inclusive else value
    return draft

