"""What each KILLSWITCH.md section's lines do: TRIGGERS, FORBIDDEN and ESCALATION.

:class:`SectionReader` holds what the lines read so far declare; the driver in
:mod:`fleetgate.policy.killswitch_md` walks the document (front matter, title, headings)
and hands every line of a section to its reader here. Problems are collected as
``(line, message)``, never raised, so one pass lists them all.
"""

from __future__ import annotations

import re

from fleetgate.durations import parse_spoken, unit_seconds
from fleetgate.kill.model import Throttle, Verb
from fleetgate.kill.triggers import Metric
from fleetgate.policy.killswitch_words import (
    AGENT,
    ARROW,
    BULLET,
    COUNTS,
    FORBIDDEN_BLOCKS,
    KEY_VALUE,
    LEVEL_KEYS,
    RATE,
    SPEC_TRIGGERS,
    UNMEASURED_TRIGGERS,
    VERBS,
    Draft,
    Forbidden,
    Level,
    check_ladder,
    normalise,
    prose_trigger,
    to_fraction,
    to_number,
    to_verb,
    unquote,
)

__all__ = ["SectionReader"]


class SectionReader:
    """The state of one KILLSWITCH.md being read, and the readers of its section lines."""

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
        self.drafts: list[Draft] = []
        self.forbidden: list[Forbidden] = []
        self.block: str | None = None
        self.ladder: tuple[Verb, ...] | None = None
        self.ladder_line = 0
        self.levels: list[Level] = []
        self.level: Level | None = None
        self.cooldown: float | None = None
        self.hold: float | None = None
        self.throttle: Throttle | None = None
        self.level_notes = False

    def problem(self, line: int, message: str) -> None:
        self.problems.append((line, message))

    def note(self, line: int, message: str) -> None:
        self.notes.append(f"{self.source}:{line}: {message}")

    def set_agent(self, name: str, line: int) -> None:
        name = unquote(name).strip("()[]")
        if not AGENT.match(name):
            self.problem(line, f"bad agent name {name!r} (an agent id or role, no spaces)")
        elif self.agent is not None and self.agent != name:
            self.problem(line, f"the file names two agents: {self.agent!r} (line "
                               f"{self.agent_line}) and {name!r}")
        else:
            self.agent, self.agent_line = name, line

    # -- TRIGGERS -----------------------------------------------------------------------

    def trigger_line(self, body: str, indent: int, no: int) -> None:
        text = BULLET.sub("", body, count=1)
        kv = KEY_VALUE.match(text)
        try:
            if kv is not None:
                self.spec_trigger(kv.group(1).lower(), kv.group(2) or "", no)
            else:
                self.drafts.append(prose_trigger(text, no))
        except ValueError as exc:
            self.problem(no, str(exc))

    def spec_trigger(self, key: str, value: str, no: int) -> None:
        if key in UNMEASURED_TRIGGERS:
            self.note(no, f"{key} is not enforced: {UNMEASURED_TRIGGERS[key]}")
            return
        if key not in SPEC_TRIGGERS:
            raise ValueError(f"unknown trigger key {key!r}: use one of "
                             f"{', '.join(sorted(SPEC_TRIGGERS))}, or a line such as "
                             "'- spend > $5/hour -> pause'")
        metric, per, window = SPEC_TRIGGERS[key]
        if not value.strip():
            raise ValueError(f"{key} needs a value")
        v, money, pct = to_number(value)
        if money and metric is not Metric.USD:
            raise ValueError(f"{key} is not an amount of money")
        if metric is Metric.ERROR_RATE:
            v = to_fraction(v, pct, key)
        elif pct:
            raise ValueError(f"{key} is not a percentage")
        draft = Draft(no, metric, v, window, per)
        if key == "consecutive_failures":
            if v < 1 or v != int(v):
                raise ValueError("consecutive_failures must be a whole number >= 1")
            draft.above = v - 1
        elif metric in COUNTS and v != int(v):
            raise ValueError(f"{key} must be a whole number")
        self.drafts.append(draft)

    # -- FORBIDDEN ----------------------------------------------------------------------

    def forbidden_line(self, body: str, indent: int, no: int) -> None:
        bulleted = BULLET.match(body) is not None
        item = BULLET.sub("", body, count=1).strip()
        m = re.match(r"^([A-Za-z_][A-Za-z_ ]*?)\s*:(?:\s+(.*))?$", item)
        name = m.group(1).strip().lower() if m else ""
        if m is not None and self.block == "network" and name in ("block_public_egress",
                                                                   "allowlist"):
            self.network(name, (m.group(2) or "").strip(), no)
            return
        if m is not None and name in FORBIDDEN_BLOCKS:
            kind, value = FORBIDDEN_BLOCKS[name], (m.group(2) or "").strip()
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
            what = FORBIDDEN_BLOCKS.get(words[0].lower()) if len(words) == 2 else None
            if what is None or what in ("files", "network"):
                self.problem(no, f"{item!r}: say what it is (tool:, host:, method:, path:) or "
                                 "put it under a block header such as 'tools:'")
                return
            self.add_forbidden(what, words[1], no)
            return
        self.add_forbidden(self.block, item, no)

    def add_forbidden(self, kind: str, value: str, no: int) -> None:
        pattern = unquote(value)
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
        v = unquote(value).lower()
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
        text = BULLET.sub("", body, count=1).strip()
        try:
            self.escalation_statement(text, indent, no)
        except ValueError as exc:
            self.problem(no, str(exc))

    def escalation_statement(self, text: str, indent: int, no: int) -> None:
        m = re.match(r"^(?:ladder|path|escalation(?:\s+path)?)\s*[:=]\s*(.+)$", text, re.I)
        if m is not None or ARROW.search(text):
            steps = m.group(1) if m else text
            verbs = tuple(to_verb(s) for s in re.split(r"\s*(?:->|→|=>|⇒|,)\s*", steps) if s)
            if self.ladder is not None:
                raise ValueError(f"the ladder is given twice (first at line {self.ladder_line})")
            check_ladder(verbs)
            self.ladder, self.ladder_line = verbs, no
            return
        m = re.match(r"^(cooldown|hold)\s*[:=]?\s*(.+)$", text, re.I)
        if m is not None:
            seconds = parse_spoken(unquote(m.group(2)))
            if m.group(1).lower() == "cooldown":
                self.cooldown = seconds
            elif seconds <= 0:
                raise ValueError("hold must be > 0")
            else:
                self.hold = seconds
            return
        m = re.match(r"^throttle(?:[ _]rate)?\s*[:=]\s*(.+)$", text, re.I)
        if m is not None:
            r = RATE.match(unquote(m.group(1)))
            if r is None:
                raise ValueError(f"bad throttle rate {m.group(1)!r}: use e.g. '1 request per 10s'")
            per = float(r.group("n") or 1) * unit_seconds(r.group("u"))
            self.throttle = Throttle(int(r.group("count")), per)
            return
        m = re.match(r"^level[ _-]?(\d+)(?:[ _-]+([A-Za-z _-]+?))?\s*:$", text, re.I)
        if m is not None:
            n = int(m.group(1))
            if any(lv.n == n for lv in self.levels):
                raise ValueError(f"level {n} is given twice")
            verb = VERBS.get(normalise(m.group(2) or ""))
            self.level = Level(no, indent, n, verb)
            self.levels.append(self.level)
            return
        raise ValueError(f"cannot read {text!r} in ESCALATION: expected a ladder "
                         "('throttle -> pause -> stop'), 'cooldown: 30s', 'hold: 10m', "
                         "'throttle: 1 request per 10s' or level_<n>_<name>: blocks")

    def level_child(self, body: str, no: int) -> None:
        level = self.level
        assert level is not None
        text = BULLET.sub("", body, count=1).strip()
        if body != text and level.channels:
            return  # a notification channel entry
        m = KEY_VALUE.match(text)
        key = m.group(1).lower() if m else ""
        if m is None or key not in LEVEL_KEYS:
            self.problem(no, f"cannot read {text!r} in level {level.n}: expected one of "
                             f"{', '.join(sorted(LEVEL_KEYS))}")
            return
        value = unquote(m.group(2) or "")
        try:
            if key == "action":
                level.verb = to_verb(value)
            elif key in ("timeout_minutes", "timeout"):
                if key == "timeout_minutes":
                    minutes, _, _ = to_number(value)
                    level.timeout = minutes * 60
                else:
                    level.timeout = parse_spoken(value)
            else:
                level.channels = level.channels or key == "channels"
                if not self.level_notes:
                    self.level_notes = True
                    self.note(no, "ESCALATION notify/channels/save_state/allow_restart are the "
                                  "agent's own; fleetgate logs and counts every firing")
        except ValueError as exc:
            self.problem(no, str(exc))
