"""KILLSWITCH.md: an agent's emergency-stop document, read into triggers and deny rules.

KILLSWITCH.md is an open file convention (spec v1.0, March 2026: https://killswitch.md,
github.com/killswitch-md/spec): a Markdown file whose ``## TRIGGERS``, ``## FORBIDDEN`` and
``## ESCALATION`` sections (plus ``## AUDIT``, ``## OVERRIDE``, ``## METADATA``) hold
YAML-style ``key: value`` lines. The spec defines what the sections mean, not a grammar, and
it is written for the agent to obey; fleetgate enforces what it can see from the network.
So this module reads the spec's own keys, and adds a small prose form for the limits a
gateway measures. Anything else is an error (``ValueError`` with ``source:line: message``,
every problem listed): an unreadable KILLSWITCH.md is a rules error, never ignored.

Document::

    ---                              # optional front matter
    agent: general                   # the agent id or role the file is for
    ---
    # KILLSWITCH — general           # or name the agent in the title ("KILLSWITCH: x")
    > prose, blockquotes, comments (# ...), rules (---), HTML comments: ignored

    ## TRIGGERS
    - spend > $5/hour -> pause       # prose form, one trigger a line (bullets optional)
    cost_limit_daily_usd: 200.00     # the spec's keys

    ## FORBIDDEN
    tools: [ssh_exec_root]           # or a block of "- item" lines, or "- tool: x"
    actions:                         # the spec's named actions: MCP tool names
      - git_push_force

    ## ESCALATION
    throttle -> pause -> stop        # the ladder (default throttle -> pause -> stop)
    cooldown: 30s
    hold: 10m
    throttle: 1 request per 10s

**The agent.** Front matter ``agent:`` (``role:`` is a synonym) or a title
``# KILLSWITCH — <agent>`` / ``# KILLSWITCH: <agent>`` / ``# KILLSWITCH.md for <agent>``.
Its triggers watch identities whose agent id *or* role is that name (as the rules' FORBIDDEN
deny rules do); without one they watch every agent. Trigger ids are
``<agent>.<metric>`` (``.2``, ``.3`` for repeats), ``killswitch.<metric>`` without an agent.

**Prose triggers**: ``<measure> <op> <amount>[/<period>] [in|within|over|per <duration>]
[per agent|per session] [min N requests] [-> <step> [-> <step>...]]``

============================================  ==============================================
measure                                       metric (see :mod:`fleetgate.kill.triggers`)
============================================  ==============================================
spend, cost, usd                              ``usd`` (``$5``, ``5 usd``)
tokens                                        ``tokens`` (``50000``, ``50,000``, ``50k``, ``1m``)
requests, calls, api calls                    ``requests``
errors, failures                              ``errors``
denials, denied requests                      ``denials``
error rate, failure rate / denial rate        ``error_rate`` / ``denial_rate`` (``50%``, ``0.5``)
identical/repeated/duplicate requests         ``identical_requests``
message depth / delegation depth / fan-out    per-event metrics (no window)
============================================  ==============================================

``>`` is the trigger's own comparison; ``>= N`` is read exactly (``N - 1`` for counts,
``N`` for identical requests, the float just below ``N`` for spend and rates). Durations:
``60s``, ``5 minutes``, ``/hour``, ``per minute``, ``in 1h``; default window 60 s; default key:
per agent. ``-> step`` after the condition: one step starts this trigger at that step of the
document's ladder (``-> pause`` climbs pause -> stop); several give its own ladder.

**Spec keys.** TRIGGERS: ``cost_limit_usd`` (spend per session in 24 h),
``cost_limit_daily_usd`` (spend per agent in a sliding 24 h), ``tokens_per_minute``,
``api_calls_per_minute``, ``error_rate_threshold`` (0..1 or ``25%``, over 60 s, once 10
responses are in), ``consecutive_failures: N`` (read as N upstream errors within 60 s: stricter
than consecutive). ``runtime_limit_minutes`` is not measurable at the gateway: reported in
``notes``. FORBIDDEN: ``actions``/``tools`` (MCP tool names, ``*`` globs), ``hosts``,
``methods``, ``paths`` (prefixes); ``files``/``directories`` are not visible to an HTTP gateway
(``notes``); ``network: block_public_egress: true`` or a non-empty ``allowlist`` is an error
(put egress allow-lists in the rules' ``agents[].egress.hosts``). ESCALATION:
``level_<n>_<name>:`` blocks (``action: reduce_rate | pause_and_notify | full_stop``, or the
name) give the ladder in level order; the shortest ``timeout_minutes`` becomes the cooldown
(no level waits longer than it asks); ``notify``, ``channels``, ``save_state``,
``allow_restart`` are the agent's own business (``notes``). AUDIT, OVERRIDE and METADATA are
skipped (fleetgate keeps its own kill log).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Literal

from fleetgate.kill.model import ScopeKind, Throttle, Verb
from fleetgate.kill.triggers import DEFAULT_LADDER, DEFAULT_THROTTLE, Metric, TriggerSpec
from fleetgate.mcp.policy import glob_to_cel
from fleetgate.policy.netaddr import HostPattern

__all__ = ["Forbidden", "KillswitchDoc", "parse_killswitch_md"]

ForbiddenKind = Literal["tool", "host", "method", "path"]
_METHOD = re.compile(r"^[A-Z][A-Z0-9_-]*$")


@dataclass(frozen=True)
class Forbidden:
    """One FORBIDDEN entry, turned into a CEL deny expression by :meth:`cel`."""

    kind: ForbiddenKind
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
            if not _METHOD.match(p):
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


@dataclass(frozen=True)
class KillswitchDoc:
    """One parsed KILLSWITCH.md. ``notes``: what the file asks that the gateway does not
    enforce (``source:line: ...``), for the loader to log."""

    agent: str | None
    triggers: list[TriggerSpec]
    forbidden: list[Forbidden]
    ladder: tuple[Verb, ...]
    source: str = ""
    cooldown: float = 30.0
    hold: float = 600.0
    throttle: Throttle = DEFAULT_THROTTLE
    notes: list[str] = field(default_factory=list)


# -- vocabulary ---------------------------------------------------------------------------

_VERBS = {
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
_COUNTS = {Metric.REQUESTS, Metric.TOKENS, Metric.ERRORS, Metric.DENIALS,
           Metric.MESSAGE_DEPTH, Metric.DELEGATION_DEPTH, Metric.DELEGATION_FANOUT}

# the spec's TRIGGERS keys: metric, key, window
_SPEC_TRIGGERS = {
    "cost_limit_usd": (Metric.USD, ScopeKind.SESSION, 86400.0),
    "cost_limit_daily_usd": (Metric.USD, ScopeKind.AGENT, 86400.0),
    "tokens_per_minute": (Metric.TOKENS, ScopeKind.AGENT, 60.0),
    "api_calls_per_minute": (Metric.REQUESTS, ScopeKind.AGENT, 60.0),
    "error_rate_threshold": (Metric.ERROR_RATE, ScopeKind.AGENT, 60.0),
    "consecutive_failures": (Metric.ERRORS, ScopeKind.AGENT, 60.0),
}
_UNMEASURED_TRIGGERS = {"runtime_limit_minutes": "the gateway does not see an agent's runtime"}

_FORBIDDEN_BLOCKS: dict[str, str] = {
    **dict.fromkeys(("tool", "tools", "action", "actions"), "tool"),
    **dict.fromkeys(("host", "hosts", "domain", "domains"), "host"),
    **dict.fromkeys(("method", "methods"), "method"),
    **dict.fromkeys(("path", "paths"), "path"),
    **dict.fromkeys(("file", "files", "directory", "directories"), "files"),
    "network": "network",
}
_LEVEL_KEYS = {"action", "timeout_minutes", "timeout", "notify", "channels", "save_state",
               "allow_restart", "description"}
_FRONT_KEYS = {"agent", "role", "title", "description", "owner", "version", "spec",
               "spec_version", "spec_url"}
_SECTIONS: dict[str, str | None] = {"TRIGGERS": "triggers", "FORBIDDEN": "forbidden",
                                    "ESCALATION": "escalation", "AUDIT": None,
                                    "OVERRIDE": None, "METADATA": None}

_ARROW = re.compile(r"\s*(?:->|→|=>|⇒)\s*")
_BULLET = re.compile(r"^(?:[-*+]|\d+[.)])\s+")
_KEY_VALUE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:(?:\s+(.*))?$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_RULE = re.compile(r"^(?:-{3,}|\*{3,}|_{3,})$")
_TITLE = re.compile(r"^KILLSWITCH(?:\.md)?\b\s*(?:[:\u2014\u2013-]+|\bfor\b)?\s*(?P<agent>.*)$", re.I)
_AGENT = re.compile(r"^[A-Za-z0-9_.@:/-]+$")
_COND = re.compile(r"^(?P<metric>[^<>=≥]+?)\s*(?P<op>>=|≥|>)\s*(?P<rest>.+)$")
_QTY = re.compile(r"^(?P<dollar>\$)?\s*(?P<num>\d[\d,]*(?:\.\d+)?|\.\d+)"
                  r"(?:\s*(?P<mult>[kKmM])(?![A-Za-z]))?\s*(?P<pct>%)?"
                  r"\s*(?P<usd>usd\b|dollars?\b)?", re.I)
_DUR = (r"(?P<n>\d+(?:\.\d+)?)?\s*(?P<u>seconds?|secs?|s|minutes?|mins?|m|hours?|hrs?|h|"
        r"days?|d)\b")
_UNIT_WORD = re.compile(r"^(?:tokens?|requests?|calls?|api calls?|errors?|failures?|denials?|"
                        r"levels?|hops?|sub-?agents?)\b", re.I)
_SCOPE = re.compile(r"^(?:per|for each|each)\s+(?P<per>agent|session)\b", re.I)
_WINDOW = re.compile(r"^(?:/|(?:in|within|over|per|every|each|a|an)\b)\s*(?:the\s+)?(?:last\s+)?"
                     + _DUR, re.I)
_MIN = re.compile(r"^(?:with\s+)?(?:at\s+least|min(?:imum)?)\s+(?P<n>\d+)\s+"
                  r"(?:requests?|responses?|calls?)\b", re.I)
_SEP = re.compile(r"^(?:[,;]|and\b)", re.I)
_RATE = re.compile(r"^(?P<count>\d+)\s*(?:requests?|req|calls?)?\s*(?:/|per\b|every\b)\s*" + _DUR
                   + r"$", re.I)
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _norm(text: str) -> str:
    text = text.strip().strip("*_`\"'.:").lower()
    return re.sub(r"[\s_-]+", " ", text).strip()


def _verb(text: str) -> Verb:
    v = _VERBS.get(_norm(text))
    if v is None:
        raise ValueError(f"unknown escalation step {text.strip()!r}: use throttle, pause or stop")
    return v


def _duration(text: str) -> float:
    m = re.fullmatch(r"\s*" + _DUR + r"\s*", text, re.I)
    if m is None:
        raise ValueError(f"bad duration {text.strip()!r}: use e.g. 30s, 5m, 1h, 10 minutes")
    n = float(m.group("n") or 1)
    return n * _UNITS[m.group("u")[0].lower()]


def _unquote(text: str) -> str:
    t = text.strip().rstrip(",").strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'`":
        return t[1:-1]
    return t


def _number(text: str) -> tuple[float, bool, bool]:
    """``$5`` / ``50,000`` / ``50k`` / ``25%`` -> (value, is_money, is_percent)."""
    t = _unquote(text)
    m = _QTY.fullmatch(t.strip())
    if m is None:
        raise ValueError(f"expected a number, got {text.strip()!r}")
    return _qty_value(m), bool(m.group("dollar") or m.group("usd")), bool(m.group("pct"))


def _qty_value(m: re.Match[str]) -> float:
    v = float(m.group("num").replace(",", ""))
    mult = (m.group("mult") or "").lower()
    return v * {"": 1.0, "k": 1e3, "m": 1e6}[mult]


def _strip_comment(text: str) -> str:
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
class _Draft:
    line: int
    metric: Metric
    above: float
    window: float = 60.0
    per: ScopeKind = ScopeKind.AGENT
    steps: list[Verb] = field(default_factory=list)
    min_requests: int = 10


@dataclass
class _Level:
    line: int
    indent: int
    n: int
    verb: Verb | None
    timeout: float | None = None
    channels: bool = False


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[tuple[int, str]] = []
        self.notes: list[str] = []
        self.agent: str | None = None
        self.agent_line = 0
        self.title_seen = False
        self.section: str | None = None
        self.section_name = ""
        self.sections_seen: dict[str, int] = {}
        self.drafts: list[_Draft] = []
        self.forbidden: list[Forbidden] = []
        self.block: str | None = None
        self.ladder: tuple[Verb, ...] | None = None
        self.ladder_line = 0
        self.levels: list[_Level] = []
        self.level: _Level | None = None
        self.cooldown: float | None = None
        self.hold: float | None = None
        self.throttle: Throttle | None = None
        self.level_notes = False

    def problem(self, line: int, message: str) -> None:
        self.problems.append((line, message))

    def note(self, line: int, message: str) -> None:
        self.notes.append(f"{self.source}:{line}: {message}")

    def set_agent(self, name: str, line: int) -> None:
        name = _unquote(name).strip("()[]")
        if not _AGENT.match(name):
            self.problem(line, f"bad agent name {name!r} (an agent id or role, no spaces)")
        elif self.agent is not None and self.agent != name:
            self.problem(line, f"the file names two agents: {self.agent!r} (line "
                               f"{self.agent_line}) and {name!r}")
        else:
            self.agent, self.agent_line = name, line

    # -- driver -------------------------------------------------------------------------

    def run(self, text: str) -> None:
        lines = text.splitlines()
        start = self.front_matter(lines)
        in_html = False
        for no in range(start + 1, len(lines) + 1):
            raw = lines[no - 1].expandtabs(4)
            stripped = raw.strip()
            if in_html:
                in_html = "-->" not in stripped
                continue
            if stripped.startswith("<!--"):
                in_html = "-->" not in stripped
                continue
            if (not stripped or stripped.startswith(("```", "~~~", ">"))
                    or _RULE.match(stripped)):
                continue
            h = _HEADING.match(stripped)
            if h and len(h.group(1)) >= 2:
                self.heading(len(h.group(1)), h.group(2), no)
                continue
            if stripped.startswith("#"):
                if h and self.section is None and not self.title_seen:
                    self.title(h.group(2), no)
                continue  # a comment (or prose heading before the sections)
            if self.section is None:
                continue  # preamble prose
            body = _strip_comment(stripped)
            if not body:
                continue
            indent = len(raw) - len(raw.lstrip(" "))
            handler = {"triggers": self.trigger_line, "forbidden": self.forbidden_line,
                       "escalation": self.escalation_line}.get(self.section)
            if handler is not None:
                handler(body, indent, no)
        if not self.sections_seen.keys() & {"TRIGGERS", "FORBIDDEN", "ESCALATION"}:
            self.problem(1, "no TRIGGERS, FORBIDDEN or ESCALATION section: is this a "
                            "KILLSWITCH.md?")

    def front_matter(self, lines: list[str]) -> int:
        """Parse ``---`` front matter at the top; return the last line it used (0: none)."""
        if not lines or lines[0].strip() != "---":
            return 0
        for end in range(1, len(lines)):
            if lines[end].strip() in ("---", "..."):
                break
        else:
            self.problem(1, "front matter is not closed by '---'")
            return len(lines)
        for i in range(1, end):
            body = _strip_comment(lines[i].strip())
            if not body or body.startswith("#"):
                continue
            m = _KEY_VALUE.match(body)
            key = m.group(1).lower() if m else ""
            if m is None or key not in _FRONT_KEYS:
                self.problem(i + 1, f"front matter: expected one of {', '.join(sorted(_FRONT_KEYS))}"
                                    f" as 'key: value', got {body!r}")
            elif key in ("agent", "role"):
                self.set_agent(m.group(2) or "", i + 1)
        return end + 1

    def title(self, text: str, no: int) -> None:
        m = _TITLE.match(text.strip())
        if m is None:
            return
        self.title_seen = True
        agent = m.group("agent").strip()
        if agent:
            self.set_agent(agent, no)

    def heading(self, level: int, text: str, no: int) -> None:
        name = re.sub(r"^\d+[.)]\s*", "", text.strip().strip("*_`").rstrip(":")).strip().upper()
        if level >= 3 and self.section == "forbidden":
            self.forbidden_line(f"{text.strip().rstrip(':')}:", 0, no)
            return
        self.level = None
        self.block = None
        if name not in _SECTIONS:
            self.problem(no, f"unknown section {text.strip()!r}: KILLSWITCH.md sections are "
                             f"{', '.join(_SECTIONS)}")
            self.section, self.section_name = "unknown", name
            return
        if name in self.sections_seen:
            self.problem(no, f"section {name} appears twice (first at line "
                             f"{self.sections_seen[name]})")
        self.sections_seen.setdefault(name, no)
        self.section, self.section_name = _SECTIONS[name] or "skip", name
        if _SECTIONS[name] is None and name != "METADATA":
            self.note(no, f"{name} is not enforced by the gateway (fleetgate keeps its own "
                          "kill log and decision log)")

    # -- TRIGGERS -----------------------------------------------------------------------

    def trigger_line(self, body: str, indent: int, no: int) -> None:
        text = _BULLET.sub("", body, count=1)
        kv = _KEY_VALUE.match(text)
        try:
            if kv is not None:
                self.spec_trigger(kv.group(1).lower(), kv.group(2) or "", no)
            else:
                self.drafts.append(_prose_trigger(text, no))
        except ValueError as exc:
            self.problem(no, str(exc))

    def spec_trigger(self, key: str, value: str, no: int) -> None:
        if key in _UNMEASURED_TRIGGERS:
            self.note(no, f"{key} is not enforced: {_UNMEASURED_TRIGGERS[key]}")
            return
        if key not in _SPEC_TRIGGERS:
            raise ValueError(f"unknown trigger key {key!r}: use one of "
                             f"{', '.join(sorted(_SPEC_TRIGGERS))}, or a line such as "
                             "'- spend > $5/hour -> pause'")
        metric, per, window = _SPEC_TRIGGERS[key]
        if not value.strip():
            raise ValueError(f"{key} needs a value")
        v, money, pct = _number(value)
        if money and metric is not Metric.USD:
            raise ValueError(f"{key} is not an amount of money")
        if metric is Metric.ERROR_RATE:
            v = _fraction(v, pct, key)
        elif pct:
            raise ValueError(f"{key} is not a percentage")
        draft = _Draft(no, metric, v, window, per)
        if key == "consecutive_failures":
            if v < 1 or v != int(v):
                raise ValueError("consecutive_failures must be a whole number >= 1")
            draft.above = v - 1
        elif metric in _COUNTS and v != int(v):
            raise ValueError(f"{key} must be a whole number")
        self.drafts.append(draft)

    # -- FORBIDDEN ----------------------------------------------------------------------

    def forbidden_line(self, body: str, indent: int, no: int) -> None:
        bulleted = _BULLET.match(body) is not None
        item = _BULLET.sub("", body, count=1).strip()
        m = re.match(r"^([A-Za-z_][A-Za-z_ ]*?)\s*:(?:\s+(.*))?$", item)
        name = m.group(1).strip().lower() if m else ""
        if m is not None and self.block == "network" and name in ("block_public_egress",
                                                                   "allowlist"):
            self.network(name, (m.group(2) or "").strip(), no)
            return
        if m is not None and name in _FORBIDDEN_BLOCKS:
            kind, value = _FORBIDDEN_BLOCKS[name], (m.group(2) or "").strip()
            if not value:
                self.block = kind
                if kind == "files":
                    self.note(no, f"FORBIDDEN {name}: files are not visible to an HTTP gateway; "
                                  "not enforced")
                return
            values = ([v for v in value[1:-1].split(",") if v.strip()]
                      if value.startswith("[") and value.endswith("]") else [value])
            for v in values:
                self.add_forbidden(kind, v, no)
            return
        if not bulleted:
            self.problem(no, f"cannot read {body!r} in FORBIDDEN: use a block header "
                             "(tools:, actions:, hosts:, methods:, paths:) and '- item' lines")
            return
        if self.block is None:
            words = item.split(None, 1)
            what = _FORBIDDEN_BLOCKS.get(words[0].lower()) if len(words) == 2 else None
            if what is None or what in ("files", "network"):
                self.problem(no, f"{item!r}: say what it is (tool:, host:, method:, path:) or "
                                 "put it under a block header such as 'tools:'")
                return
            self.add_forbidden(what, words[1], no)
            return
        self.add_forbidden(self.block, item, no)

    def add_forbidden(self, kind: str, value: str, no: int) -> None:
        pattern = _unquote(value)
        if kind == "files":
            return  # noted once at the block header
        if kind == "network":
            self.problem(no, "network: expected 'block_public_egress: true|false' or "
                             "'allowlist: [...]'")
            return
        try:
            self.forbidden.append(Forbidden(kind, pattern, no))  # type: ignore[arg-type]
        except ValueError as exc:
            self.problem(no, str(exc))

    def network(self, key: str, value: str, no: int) -> None:
        v = _unquote(value).lower()
        if key == "block_public_egress":
            if v == "true":
                self.problem(no, "block_public_egress: true is not enforced from KILLSWITCH.md; "
                                 "list the agent's hosts in the rules (agents[].egress.hosts)")
            elif v != "false":
                self.problem(no, "block_public_egress must be true or false")
        elif v not in ("[]", ""):
            self.problem(no, "a network allowlist is not enforced from KILLSWITCH.md; put it in "
                             "the rules (agents[].egress.hosts)")

    # -- ESCALATION ---------------------------------------------------------------------

    def escalation_line(self, body: str, indent: int, no: int) -> None:
        if self.level is not None:
            if indent > self.level.indent:
                self.level_child(body, no)
                return
            self.level = None
        text = _BULLET.sub("", body, count=1).strip()
        try:
            self.escalation_statement(text, indent, no)
        except ValueError as exc:
            self.problem(no, str(exc))

    def escalation_statement(self, text: str, indent: int, no: int) -> None:
        m = re.match(r"^(?:ladder|path|escalation(?:\s+path)?)\s*[:=]\s*(.+)$", text, re.I)
        if m is not None or _ARROW.search(text):
            steps = m.group(1) if m else text
            verbs = tuple(_verb(s) for s in re.split(r"\s*(?:->|→|=>|⇒|,)\s*", steps) if s)
            if self.ladder is not None:
                raise ValueError(f"the ladder is given twice (first at line {self.ladder_line})")
            _check_ladder(verbs)
            self.ladder, self.ladder_line = verbs, no
            return
        m = re.match(r"^(cooldown|hold)\s*[:=]?\s*(.+)$", text, re.I)
        if m is not None:
            seconds = _duration(_unquote(m.group(2)))
            if m.group(1).lower() == "cooldown":
                self.cooldown = seconds
            elif seconds <= 0:
                raise ValueError("hold must be > 0")
            else:
                self.hold = seconds
            return
        m = re.match(r"^throttle(?:[ _]rate)?\s*[:=]\s*(.+)$", text, re.I)
        if m is not None:
            r = _RATE.match(_unquote(m.group(1)))
            if r is None:
                raise ValueError(f"bad throttle rate {m.group(1)!r}: use e.g. '1 request per 10s'")
            per = float(r.group("n") or 1) * _UNITS[r.group("u")[0].lower()]
            self.throttle = Throttle(int(r.group("count")), per)
            return
        m = re.match(r"^level[ _-]?(\d+)(?:[ _-]+([A-Za-z _-]+?))?\s*:$", text, re.I)
        if m is not None:
            n = int(m.group(1))
            if any(lv.n == n for lv in self.levels):
                raise ValueError(f"level {n} is given twice")
            verb = _VERBS.get(_norm(m.group(2) or ""))
            self.level = _Level(no, indent, n, verb)
            self.levels.append(self.level)
            return
        raise ValueError(f"cannot read {text!r} in ESCALATION: expected a ladder "
                         "('throttle -> pause -> stop'), 'cooldown: 30s', 'hold: 10m', "
                         "'throttle: 1 request per 10s' or level_<n>_<name>: blocks")

    def level_child(self, body: str, no: int) -> None:
        level = self.level
        assert level is not None
        text = _BULLET.sub("", body, count=1).strip()
        if body != text and level.channels:
            return  # a notification channel entry
        m = _KEY_VALUE.match(text)
        key = m.group(1).lower() if m else ""
        if m is None or key not in _LEVEL_KEYS:
            self.problem(no, f"cannot read {text!r} in level {level.n}: expected one of "
                             f"{', '.join(sorted(_LEVEL_KEYS))}")
            return
        value = _unquote(m.group(2) or "")
        try:
            if key == "action":
                level.verb = _verb(value)
            elif key in ("timeout_minutes", "timeout"):
                if key == "timeout_minutes":
                    minutes, _, _ = _number(value)
                    level.timeout = minutes * 60
                else:
                    level.timeout = _duration(value)
            else:
                level.channels = level.channels or key == "channels"
                if not self.level_notes:
                    self.level_notes = True
                    self.note(no, "ESCALATION notify/channels/save_state/allow_restart are the "
                                  "agent's own; fleetgate logs and counts every firing")
        except ValueError as exc:
            self.problem(no, str(exc))

    # -- result -------------------------------------------------------------------------

    def doc_ladder(self) -> tuple[Verb, ...]:
        if self.levels:
            if self.ladder is not None:
                self.problem(self.levels[0].line, f"the ladder is given twice (first at line "
                                                  f"{self.ladder_line})")
            levels = sorted(self.levels, key=lambda lv: lv.n)
            for lv in levels:
                if lv.verb is None:
                    self.problem(lv.line, f"level {lv.n}: name its step (level_{lv.n}_throttle, "
                                          "_pause, _shutdown) or give 'action:'")
            verbs = tuple(lv.verb for lv in levels if lv.verb is not None)
            try:
                _check_ladder(verbs)
            except ValueError as exc:
                self.problem(levels[0].line, str(exc))
                return DEFAULT_LADDER
            timeouts = [lv.timeout for lv in levels if lv.timeout is not None]
            if timeouts and self.cooldown is None:
                self.cooldown = min(timeouts)
            return verbs
        return self.ladder or DEFAULT_LADDER

    def build(self) -> KillswitchDoc:
        ladder = self.doc_ladder()
        prefix = self.agent or "killswitch"
        who = frozenset({self.agent}) if self.agent else frozenset()
        cooldown = 30.0 if self.cooldown is None else self.cooldown
        hold = 600.0 if self.hold is None else self.hold
        throttle = self.throttle or DEFAULT_THROTTLE
        triggers: list[TriggerSpec] = []
        counts: dict[Metric, int] = {}
        for d in self.drafts:
            counts[d.metric] = counts.get(d.metric, 0) + 1
            tid = f"{prefix}.{d.metric.value}" + (f".{counts[d.metric]}"
                                                   if counts[d.metric] > 1 else "")
            if len(d.steps) == 1:
                steps = (d.steps[0], *(v for v in ladder if v.strength > d.steps[0].strength))
            else:
                steps = tuple(d.steps) or ladder
            try:
                triggers.append(TriggerSpec(
                    id=tid, metric=d.metric, above=d.above, window=d.window, per=d.per,
                    roles=who, agents=who, ladder=steps, throttle=throttle, hold=hold,
                    cooldown=cooldown, min_requests=d.min_requests))
            except ValueError as exc:
                self.problem(d.line, str(exc))
        if self.problems:
            raise ValueError("\n".join(f"{self.source}:{line}: {msg}"
                                       for line, msg in sorted(self.problems)))
        return KillswitchDoc(agent=self.agent, triggers=triggers, forbidden=self.forbidden,
                             ladder=ladder, source=self.source, cooldown=cooldown, hold=hold,
                             throttle=throttle, notes=self.notes)


def _check_ladder(verbs: tuple[Verb, ...]) -> None:
    if not verbs:
        raise ValueError("the ladder needs at least one step")
    if any(b.strength <= a.strength for a, b in itertools.pairwise(verbs)):
        raise ValueError("ladder steps must grow in strength (throttle -> pause -> stop), got "
                         + " -> ".join(v.value for v in verbs))


def _fraction(v: float, pct: bool, what: str) -> float:
    if pct:
        v /= 100
    elif v > 1:
        raise ValueError(f"{what}: write a rate as a percentage (50%) or a fraction (0.5)")
    if not 0 <= v < 1:
        raise ValueError(f"{what}: a rate limit must be below 100%")
    return v


def _prose_trigger(text: str, no: int) -> _Draft:
    parts = _ARROW.split(text.strip())
    m = _COND.match(parts[0].strip())
    if m is None:
        raise ValueError(f"cannot read trigger {text.strip()!r}: write e.g. "
                         "'- spend > $5/hour -> pause' or '- identical requests >= 5 in 60s'")
    metric = _METRICS.get(_norm(m.group("metric")))
    if metric is None:
        raise ValueError(f"unknown measure {m.group('metric').strip()!r}: use spend, tokens, "
                         "requests, errors, denials, error rate, denial rate, identical "
                         "requests, message depth, delegation depth or delegation fanout")
    rest = m.group("rest").strip()
    q = _QTY.match(rest)
    if q is None or not q.group("num"):
        raise ValueError(f"expected an amount after {m.group('op')!r}, got {rest!r}")
    value, money, pct = _qty_value(q), bool(q.group("dollar") or q.group("usd")), bool(q.group("pct"))
    draft = _Draft(no, metric, value, steps=[_verb(p) for p in parts[1:]])
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
            window = float(s.group("n") or 1) * _UNITS[s.group("u")[0].lower()]
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
        value = _fraction(value, pct, metric.value.replace("_", " "))
    elif pct:
        raise ValueError(f"{metric.value} is not a percentage")
    inclusive = m.group("op") in (">=", "≥")
    if metric is Metric.IDENTICAL_REQUESTS:
        if value != int(value):
            raise ValueError("identical requests are counted in whole numbers")
        draft.above = value if inclusive else value + 1
    elif metric in _COUNTS:
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


def parse_killswitch_md(text: str, source: str) -> KillswitchDoc:
    """Read one KILLSWITCH.md (see the module docstring for the grammar).

    Raises ``ValueError`` listing every problem as ``source:line: message``.
    """
    parser = _Parser(source)
    parser.run(text)
    return parser.build()
