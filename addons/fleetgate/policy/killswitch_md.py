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

The vocabulary and the prose-trigger grammar are in :mod:`fleetgate.policy.killswitch_words`,
what each section's lines do in :mod:`fleetgate.policy.killswitch_sections`; this module
walks the document and builds the result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fleetgate.kill.model import Throttle, Verb
from fleetgate.kill.triggers import DEFAULT_LADDER, DEFAULT_THROTTLE, Metric, TriggerSpec
from fleetgate.policy.killswitch_sections import SectionReader
from fleetgate.policy.killswitch_words import (
    FRONT_KEYS,
    HEADING,
    KEY_VALUE,
    RULE,
    SECTIONS,
    TITLE,
    Forbidden,
    check_ladder,
    strip_comment,
)

__all__ = ["Forbidden", "KillswitchDoc", "parse_killswitch_md"]


@dataclass(frozen=True)
class KillswitchDoc:
    """One parsed KILLSWITCH.md. ``notes``: what the file asks that the gateway does not
    enforce (``source:line: ...``); the loader reports them as warnings."""

    agent: str | None
    triggers: list[TriggerSpec]
    forbidden: list[Forbidden]
    ladder: tuple[Verb, ...]
    source: str = ""
    cooldown: float = 30.0
    hold: float = 600.0
    throttle: Throttle = DEFAULT_THROTTLE
    notes: list[str] = field(default_factory=list)


class _Parser(SectionReader):
    """Walks one document: front matter, title, headings; each section line to its reader."""

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
                    or RULE.match(stripped)):
                continue
            h = HEADING.match(stripped)
            if h and len(h.group(1)) >= 2:
                self.heading(len(h.group(1)), h.group(2), no)
                continue
            if stripped.startswith("#"):
                if h and self.section is None and not self.title_seen:
                    self.title(h.group(2), no)
                continue  # a comment (or prose heading before the sections)
            if self.section is None:
                continue  # preamble prose
            body = strip_comment(stripped)
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
            body = strip_comment(lines[i].strip())
            if not body or body.startswith("#"):
                continue
            m = KEY_VALUE.match(body)
            key = m.group(1).lower() if m else ""
            if m is None or key not in FRONT_KEYS:
                self.problem(i + 1, f"front matter: expected one of {', '.join(sorted(FRONT_KEYS))}"
                                    f" as 'key: value', got {body!r}")
            elif key in ("agent", "role"):
                self.set_agent(m.group(2) or "", i + 1)
        return end + 1

    def title(self, text: str, no: int) -> None:
        m = TITLE.match(text.strip())
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
        if name not in SECTIONS:
            self.problem(no, f"unknown section {text.strip()!r}: KILLSWITCH.md sections are "
                             f"{', '.join(SECTIONS)}")
            self.section, self.section_name = "unknown", name
            return
        if name in self.sections_seen:
            self.problem(no, f"section {name} appears twice (first at line "
                             f"{self.sections_seen[name]})")
        self.sections_seen.setdefault(name, no)
        self.section, self.section_name = SECTIONS[name] or "skip", name
        if SECTIONS[name] is None and name != "METADATA":
            self.note(no, f"{name} is not enforced by the gateway (fleetgate keeps its own "
                          "kill log and decision log)")

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
                check_ladder(verbs)
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


def parse_killswitch_md(text: str, source: str) -> KillswitchDoc:
    """Read one KILLSWITCH.md (see the module docstring for the grammar).

    Raises ``ValueError`` listing every problem as ``source:line: message``.
    """
    parser = _Parser(source)
    parser.run(text)
    return parser.build()
