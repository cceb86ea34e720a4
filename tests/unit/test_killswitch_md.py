"""KILLSWITCH.md: the shipped example, every line form, the spec's own keys, located errors,
and FORBIDDEN entries as CEL that fleetgate.celexpr compiles and evaluates."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from fleetgate.celexpr import compile_expr
from fleetgate.kill.model import ScopeKind, Subject, Throttle, Verb
from fleetgate.kill.triggers import Event, Metric, TriggerEngine, TriggerSpec
from fleetgate.mcp.policy import MCP_ROOTS
from fleetgate.policy.killswitch_md import Forbidden, KillswitchDoc, parse_killswitch_md
from fleetgate.policy.parse_rules import REQUEST_ROOTS

EXAMPLE = Path(__file__).resolve().parents[2] / "rules" / "KILLSWITCH.general.md"
T, P, S = Verb.THROTTLE, Verb.PAUSE, Verb.STOP


def parse(text: str, source: str = "k.md") -> KillswitchDoc:
    return parse_killswitch_md(text, source)


def one_trigger(line: str, escalation: str = "") -> TriggerSpec:
    doc = parse(f"## TRIGGERS\n{line}\n" + (f"## ESCALATION\n{escalation}\n" if escalation else ""))
    (spec,) = doc.triggers
    return spec


def shape(s: TriggerSpec) -> tuple[Any, ...]:
    return (s.id, s.metric, s.above, s.window, s.per, s.ladder, s.min_requests)


# -- the shipped example ------------------------------------------------------------------

def test_example_file_parses_to_the_expected_specs() -> None:
    doc = parse_killswitch_md(EXAMPLE.read_text(encoding="utf-8"), str(EXAMPLE))
    assert doc.agent == "general"
    assert (doc.ladder, doc.cooldown, doc.hold, doc.throttle) == ((T, P, S), 30, 600,
                                                                  Throttle(1, 10))
    agent, session = ScopeKind.AGENT, ScopeKind.SESSION
    assert [shape(s) for s in doc.triggers] == [
        ("general.usd", Metric.USD, 5, 3600, agent, (P, S), 10),
        ("general.usd.2", Metric.USD, 20, 86400, session, (T, P, S), 10),
        ("general.tokens", Metric.TOKENS, 50000, 60, agent, (T, P, S), 10),
        ("general.requests", Metric.REQUESTS, 60, 60, agent, (T, P, S), 10),
        ("general.identical_requests", Metric.IDENTICAL_REQUESTS, 5, 60, agent, (T, P, S), 10),
        ("general.error_rate", Metric.ERROR_RATE, 0.5, 60, agent, (T, P, S), 20),
        ("general.denials", Metric.DENIALS, 10, 300, agent, (T, P, S), 10),
        ("general.message_depth", Metric.MESSAGE_DEPTH, 5, 60, agent, (S,), 10),
        ("general.delegation_fanout", Metric.DELEGATION_FANOUT, 10, 60, agent, (S,), 10),
        ("general.errors", Metric.ERRORS, 4, 60, agent, (T, P, S), 10),
    ]
    for s in doc.triggers:
        assert (s.roles, s.agents, s.cooldown, s.hold, s.throttle) == (
            frozenset({"general"}), frozenset({"general"}), 30, 600, Throttle(1, 10))
    assert [(f.kind, f.pattern) for f in doc.forbidden] == [
        ("tool", "ssh_exec_root"), ("tool", "proxmox_destroy*"), ("tool", "docker_*_prune"),
        ("tool", "git_push_force"), ("host", "*.pastebin.com"), ("host", "transfer.sh"),
        ("method", "DELETE"), ("path", "/admin/")]
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    for f in doc.forbidden:  # line numbers point at the entry
        assert f.pattern.rstrip("*").split("*")[0].lstrip("*.") in lines[f.line - 1]
    assert doc.notes == []


def test_example_triggers_drive_the_engine_for_general_agents_only() -> None:
    doc = parse_killswitch_md(EXAMPLE.read_text(encoding="utf-8"), str(EXAMPLE))
    engine = TriggerEngine(doc.triggers)
    general, cloud = Subject("gen-1", role="general"), Subject("cloud-1", role="cloud")
    loop = [engine.observe(Event.request(general, fingerprint="same"), t) for t in range(5)]
    assert [[f.trigger for f in fs] for fs in loop] == [[]] * 4 + [["general.identical_requests"]]
    assert not any(engine.observe(Event.request(cloud, fingerprint="same"), t) for t in range(9))
    deep = engine.observe(Event.request(cloud, message_depth=9), 20)
    assert deep == []
    (stop,) = engine.observe(Event.request(general, message_depth=6), 21)
    assert (stop.verb, stop.until) == (Verb.STOP, None)


# -- line forms ---------------------------------------------------------------------------

A, SS = ScopeKind.AGENT, ScopeKind.SESSION
LINES = [
    ("- spend > $5/hour -> pause", ("killswitch.usd", Metric.USD, 5, 3600, A, (P, S), 10)),
    ("- cost > 5 usd per day", ("killswitch.usd", Metric.USD, 5, 86400, A, (T, P, S), 10)),
    ("- tokens > 50000/minute", ("killswitch.tokens", Metric.TOKENS, 50000, 60, A, (T, P, S), 10)),
    ("- tokens > 50k per minute", ("killswitch.tokens", Metric.TOKENS, 50000, 60, A, (T, P, S), 10)),
    ("* tokens > 1.5M in 1h", ("killswitch.tokens", Metric.TOKENS, 1.5e6, 3600, A, (T, P, S), 10)),
    ("- tokens > 50,000 tokens in 5 minutes per session",
     ("killswitch.tokens", Metric.TOKENS, 50000, 300, SS, (T, P, S), 10)),
    ("- requests >= 100 per minute",
     ("killswitch.requests", Metric.REQUESTS, 99, 60, A, (T, P, S), 10)),
    ("1. api calls > 10 requests in 10s",
     ("killswitch.requests", Metric.REQUESTS, 10, 10, A, (T, P, S), 10)),
    ("- identical requests >= 5 in 60s",
     ("killswitch.identical_requests", Metric.IDENTICAL_REQUESTS, 5, 60, A, (T, P, S), 10)),
    ("- repeated requests > 5 within 2m",
     ("killswitch.identical_requests", Metric.IDENTICAL_REQUESTS, 6, 120, A, (T, P, S), 10)),
    ("- error rate > 50%", ("killswitch.error_rate", Metric.ERROR_RATE, 0.5, 60, A, (T, P, S), 10)),
    ("- failure rate > 0.25 over 5m, min 20 requests",
     ("killswitch.error_rate", Metric.ERROR_RATE, 0.25, 300, A, (T, P, S), 20)),
    ("- denial rate > 30% per session",
     ("killswitch.denial_rate", Metric.DENIAL_RATE, 0.3, 60, SS, (T, P, S), 10)),
    ("- errors > 3 in 1h -> throttle -> stop",
     ("killswitch.errors", Metric.ERRORS, 3, 3600, A, (T, S), 10)),
    ("- denied requests > 10 → halt", ("killswitch.denials", Metric.DENIALS, 10, 60, A, (S,), 10)),
    ("- message depth > 5 -> stop",
     ("killswitch.message_depth", Metric.MESSAGE_DEPTH, 5, 60, A, (S,), 10)),
    ("- delegation depth >= 4",
     ("killswitch.delegation_depth", Metric.DELEGATION_DEPTH, 3, 60, A, (T, P, S), 10)),
    ("- fan-out > 10 sub-agents -> pause",
     ("killswitch.delegation_fanout", Metric.DELEGATION_FANOUT, 10, 60, A, (P, S), 10)),
    ("spend > $1 in 10m  # plain line, trailing comment",
     ("killswitch.usd", Metric.USD, 1, 600, A, (T, P, S), 10)),
    # the spec's own keys
    ("cost_limit_usd: 50.00", ("killswitch.usd", Metric.USD, 50, 86400, SS, (T, P, S), 10)),
    ("cost_limit_daily_usd: $200", ("killswitch.usd", Metric.USD, 200, 86400, A, (T, P, S), 10)),
    ("tokens_per_minute: 100000",
     ("killswitch.tokens", Metric.TOKENS, 100000, 60, A, (T, P, S), 10)),
    ("api_calls_per_minute: 60",
     ("killswitch.requests", Metric.REQUESTS, 60, 60, A, (T, P, S), 10)),
    ("error_rate_threshold: 0.25     # fraction",
     ("killswitch.error_rate", Metric.ERROR_RATE, 0.25, 60, A, (T, P, S), 10)),
    ("- error_rate_threshold: 25%",
     ("killswitch.error_rate", Metric.ERROR_RATE, 0.25, 60, A, (T, P, S), 10)),
    ("consecutive_failures: 5", ("killswitch.errors", Metric.ERRORS, 4, 60, A, (T, P, S), 10)),
]


@pytest.mark.parametrize(("line", "expected"), LINES, ids=[line for line, _ in LINES])
def test_trigger_line_forms(line: str, expected: tuple[Any, ...]) -> None:
    assert shape(one_trigger(line)) == expected


def test_inclusive_spend_is_exact() -> None:
    def fires(line: str, usd: float) -> bool:
        return bool(TriggerEngine([one_trigger(line)]).observe(
            Event.response(Subject("a"), usd=usd), 0))
    assert fires("- spend >= $5/hour", 5.0)
    assert not fires("- spend >= $5/hour", math.nextafter(5.0, 0))
    assert not fires("- spend > $5/hour", 5.0)
    assert fires("- spend > $5/hour", math.nextafter(5.0, 6))


def test_one_step_starts_on_the_documents_ladder() -> None:
    assert one_trigger("- spend > $5 -> pause", "throttle -> stop").ladder == (P, S)
    assert one_trigger("- spend > $5 -> throttle", "pause -> stop").ladder == (T, P, S)
    assert one_trigger("- spend > $5", "pause -> stop").ladder == (P, S)


@pytest.mark.parametrize(("title", "agent"), [
    ("# KILLSWITCH — cloud-7", "cloud-7"), ("# KILLSWITCH: security", "security"),
    ("# KILLSWITCH.md for network", "network"), ("# killswitch (general)", "general"),
    ("# KILLSWITCH", None), ("# Safety notes", None),
])
def test_title_names_the_agent(title: str, agent: str | None) -> None:
    doc = parse(f"{title}\n\n## TRIGGERS\n- spend > $5\n")
    assert doc.agent == agent
    assert doc.triggers[0].id == f"{agent or 'killswitch'}.usd"
    assert doc.triggers[0].roles == (frozenset({agent}) if agent else frozenset())


def test_front_matter_names_the_agent() -> None:
    doc = parse("---\nrole: cloud   # matched as role or agent id\ntitle: x\n---\n"
                "# KILLSWITCH\n## TRIGGERS\n- spend > $5\n")
    assert doc.agent == "cloud"


def test_markdown_noise_is_ignored() -> None:
    doc = parse("\n".join([
        "# KILLSWITCH: ops", "> a quote with spend > $1", "Some prose about > things.",
        "<!-- a comment", "- spend > $1", "-->", "---", "## Triggers:", "```yaml",
        "# a comment in the section", "tokens_per_minute: 1000  # why", "```", "***",
        "## 2. ESCALATION", "<!-- one line -->", "- pause -> stop", "cooldown 1m",
        "hold: 1h", "throttle rate: 5 requests / minute",
    ]))
    assert [shape(s) for s in doc.triggers] == [
        ("ops.tokens", Metric.TOKENS, 1000, 60, A, (P, S), 10)]
    assert (doc.ladder, doc.cooldown, doc.hold, doc.throttle) == ((P, S), 60, 3600,
                                                                  Throttle(5, 60))


def test_spec_style_document() -> None:
    """The spec's layout (sections of YAML-style keys); what a gateway cannot see is noted."""
    lines = [
        "# KILLSWITCH", "", "> Emergency stop protocol.", "", "---", "", "## TRIGGERS",
        "cost_limit_usd: 10.00        # per session", "runtime_limit_minutes: 30",
        "consecutive_failures: 3", "", "---", "## FORBIDDEN", "files:", "  - .env",
        '  - "**/*.key"', "directories:", "  - /etc", "network:",
        "  - block_public_egress: false", "  - allowlist: []", "actions:",
        "  - drop_database           # any DROP", "  - send_bulk_email", "", "## ESCALATION",
        "level_1_throttle:", "  action: reduce_rate", "  notify: false",
        "  timeout_minutes: 5", "level_2_pause:", "  action: pause_and_notify",
        "  channels:", "    - email: ops@example.com", '    - slack: "#alerts"',
        "  timeout_minutes: 15", "level_3_shutdown:", "  action: full_stop",
        "  save_state: true", "  allow_restart: true", "", "## AUDIT", "log_file: x.log",
        "log_fields:", "  - timestamp", "## OVERRIDE", "require_human_approval: true",
        "## METADATA", "owner: me",
    ]
    doc = parse("\n".join(lines))
    at = {text: i + 1 for i, text in enumerate(lines)}
    assert doc.agent is None
    assert [shape(s) for s in doc.triggers] == [
        ("killswitch.usd", Metric.USD, 10, 86400, SS, (T, P, S), 10),
        ("killswitch.errors", Metric.ERRORS, 2, 60, A, (T, P, S), 10)]
    assert (doc.ladder, doc.cooldown) == ((T, P, S), 300)  # the shortest level timeout
    assert [(f.kind, f.pattern, f.line) for f in doc.forbidden] == [
        ("tool", "drop_database", at["  - drop_database           # any DROP"]),
        ("tool", "send_bulk_email", at["  - send_bulk_email"])]
    expected = [(at["runtime_limit_minutes: 30"], "runtime_limit_minutes"),
                (at["files:"], "FORBIDDEN files"), (at["directories:"], "FORBIDDEN directories"),
                (at["  notify: false"], "ESCALATION notify/channels"),
                (at["## AUDIT"], "AUDIT"), (at["## OVERRIDE"], "OVERRIDE")]
    assert len(doc.notes) == len(expected)
    for note, (line, start) in zip(doc.notes, expected, strict=True):
        assert note.startswith(f"k.md:{line}: {start}"), note


def test_level_blocks_take_their_step_from_the_name() -> None:
    doc = parse("## ESCALATION\nlevel_1_pause:\n  timeout: 2m\nlevel_2_shutdown:\n")
    assert (doc.ladder, doc.cooldown) == ((P, S), 120)


@pytest.mark.parametrize(("text", "expected"), [
    ("## FORBIDDEN\n- tool: rm_*\n- host: Evil.Example.COM.\n- method delete\n- path: /x/*",
     [("tool", "rm_*"), ("host", "evil.example.com"), ("method", "DELETE"), ("path", "/x/")]),
    ("## FORBIDDEN\ntools: [a, 'b*']\nhosts: [\"*.x.io:8443\"]",
     [("tool", "a"), ("tool", "b*"), ("host", "*.x.io:8443")]),
    ("## FORBIDDEN\n### Tools\n- a\n### Methods\n- put", [("tool", "a"), ("method", "PUT")]),
])
def test_forbidden_forms(text: str, expected: list[tuple[str, str]]) -> None:
    assert [(f.kind, f.pattern) for f in parse(text).forbidden] == expected


# -- errors -------------------------------------------------------------------------------

ERRORS = [
    ("## TRIGGERS\n- spend > $5\n## LIMITS\n- x", 3, "unknown section"),
    ("## TRIGGERS\n\n- spend is too high", 3, "cannot read trigger"),
    ("## TRIGGERS\n- karma > 5", 2, "unknown measure 'karma'"),
    ("## TRIGGERS\ncost_limit_eur: 5", 2, "unknown trigger key 'cost_limit_eur'"),
    ("## TRIGGERS\n- tokens > 50%", 2, "not a percentage"),
    ("## TRIGGERS\n- requests > $5", 2, "not an amount of money"),
    ("## TRIGGERS\n- error rate > 50", 2, "percentage (50%) or a fraction"),
    ("## TRIGGERS\n- message depth > 5 in 60s", 2, "takes no window"),
    ("## TRIGGERS\n- spend > $5 in 5 fortnights", 2, "cannot read"),
    ("## TRIGGERS\n- spend > $5 -> explode", 2, "unknown escalation step 'explode'"),
    ("## TRIGGERS\n- spend > $5 -> stop -> throttle", 2, "grow in strength"),
    ("## TRIGGERS\n- tokens > 1.5 in 1m -> stop", 2, "whole numbers"),
    ("## TRIGGERS\n- requests >= 0", 2, "always true"),
    ("## TRIGGERS\n- error rate > 50% min 5 requests\n- tokens > 5 min 5 requests", 3,
     "error rate and denial rate only"),
    ("## ESCALATION\nstop -> throttle", 2, "grow in strength"),
    ("## ESCALATION\nthrottle -> stop\n\npause -> stop", 4, "ladder is given twice"),
    ("## ESCALATION\ncooldown: soon", 2, "bad duration"),
    ("## ESCALATION\nthrottle: fast", 2, "bad throttle rate"),
    ("## ESCALATION\nwhen in doubt, stop", 2, "cannot read"),
    ("## ESCALATION\nlevel_1:\n  notify: true", 2, "name its step"),
    ("## ESCALATION\nlevel_1_throttle:\n  action: dance", 3, "unknown escalation step"),
    ("## ESCALATION\nlevel_1_throttle:\n  colour: red", 3, "cannot read"),
    ("## FORBIDDEN\n- rm_rf", 2, "say what it is"),
    ("## FORBIDDEN\nrm_rf everything", 2, "cannot read"),
    ("## FORBIDDEN\nhosts:\n  - '*'", 3, "every host"),
    ("## FORBIDDEN\nhosts:\n  - evil.com:99999", 3, "port"),
    ("## FORBIDDEN\nmethods:\n  - GET POST", 3, "bad HTTP method"),
    ("## FORBIDDEN\npaths:\n  - admin", 3, "starts with '/'"),
    ("## FORBIDDEN\npaths:\n  - /a/*/b", 3, "prefix"),
    ("## FORBIDDEN\nnetwork:\n  - block_public_egress: true", 3, "agents[].egress.hosts"),
    ("## FORBIDDEN\nnetwork:\n  - allowlist: [a.com]", 3, "agents[].egress.hosts"),
    ("---\nagent: a\n## TRIGGERS\n- spend > $5", 1, "front matter is not closed"),
    ("---\nagent: a\nteam: b\n---\n## TRIGGERS\n- spend > $5", 3, "front matter"),
    ("---\nagent: a\n---\n# KILLSWITCH: b\n## TRIGGERS\n- spend > $5", 4, "two agents"),
    ("# KILLSWITCH: my agent\n## TRIGGERS\n- spend > $5", 1, "bad agent name"),
    ("# KILLSWITCH\nJust be careful out there.", 1, "no TRIGGERS, FORBIDDEN or ESCALATION"),
    ("## TRIGGERS\n- spend > $5\n## Triggers\n- tokens > 5", 3, "appears twice"),
]


@pytest.mark.parametrize(("text", "line", "message"), ERRORS, ids=[m for _, _, m in ERRORS])
def test_errors_carry_the_line(text: str, line: int, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse(text, "rules/KILLSWITCH.general.md")
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"rules/KILLSWITCH.general.md:{line}: ")
    assert message in str(info.value)


def test_every_problem_is_listed() -> None:
    with pytest.raises(ValueError) as info:
        parse("## TRIGGERS\n- karma > 1\n- spend > $1\n- tokens > 5%\n## FORBIDDEN\n- x\n")
    assert [ln.split(": ")[0] for ln in str(info.value).splitlines()] == [
        "k.md:2", "k.md:4", "k.md:6"]


# -- FORBIDDEN as CEL ---------------------------------------------------------------------

def activation(tool: str = "", host: str = "api.example.com", port: int = 443,
               method: str = "POST", path: str = "/mcp") -> dict[str, Any]:
    return {
        "jwt": {"sub": "gen-1", "agent_role": "general"},
        "request": {"method": method, "scheme": "https", "host": host, "port": port,
                    "path": path, "raw_path": path, "query": {}, "headers": {}},
        "llm": {"is_llm": False},
        "mcp": {"method": "tools/call", "listing": False,
                "tool": {"name": tool, "arguments": {}}, "prompt": {"name": "", "arguments": {}},
                "resource": {"uri": ""}, "server": {"host": host, "path": path, "name": host},
                "session_id": ""},
    }


CEL_CASES = [
    (Forbidden("tool", "ssh_exec_root", 1), 'mcp.tool.name == "ssh_exec_root"',
     [({"tool": "ssh_exec_root"}, True), ({"tool": "ssh_exec"}, False)]),
    (Forbidden("tool", "proxmox_destroy*", 1), 'mcp.tool.name.startsWith("proxmox_destroy")',
     [({"tool": "proxmox_destroy_vm"}, True), ({"tool": "proxmox_list"}, False)]),
    (Forbidden("tool", "docker_*_prune", 1), 'mcp.tool.name.matches("^docker_.*_prune$")',
     [({"tool": "docker_image_prune"}, True), ({"tool": "docker_prune_all"}, False)]),
    (Forbidden("host", "*.Pastebin.com", 1), 'request.host.endsWith(".pastebin.com")',
     [({"host": "x.pastebin.com"}, True), ({"host": "pastebin.com"}, False),
      ({"host": "pastebin.com.evil.net"}, False)]),
    (Forbidden("host", "transfer.sh", 1), 'request.host == "transfer.sh"',
     [({"host": "transfer.sh"}, True), ({"host": "transfer.sh.evil.net"}, False)]),
    (Forbidden("host", "internal.example.com:8443", 1),
     'request.host == "internal.example.com" && request.port == 8443',
     [({"host": "internal.example.com", "port": 8443}, True),
      ({"host": "internal.example.com", "port": 443}, False)]),
    (Forbidden("method", "delete", 1), 'request.method == "DELETE"',
     [({"method": "DELETE"}, True), ({"method": "GET"}, False)]),
    (Forbidden("path", "/admin/", 1), 'request.path.startsWith("/admin/")',
     [({"path": "/admin/users"}, True), ({"path": "/administrator"}, False)]),
]


@pytest.mark.parametrize(("item", "source", "cases"), CEL_CASES,
                         ids=[f"{i.kind}:{i.pattern}" for i, _, _ in CEL_CASES])
def test_forbidden_cel_compiles_and_judges(item: Forbidden, source: str,
                                           cases: list[tuple[dict[str, Any], bool]]) -> None:
    assert item.cel() == source
    roots = MCP_ROOTS if item.kind == "tool" else REQUEST_ROOTS
    expr = compile_expr(item.cel(), roots)
    # the loader scopes it to the file's agent (agent id or role) the same way
    who = '(jwt.sub == "general" || jwt.agent_role == "general")'
    scoped = compile_expr(f"{who} && ({item.cel()})", roots)
    for facts, expected in cases:
        assert expr.evaluate(activation(**facts)) is expected, facts
        assert scoped.evaluate(activation(**facts)) is expected, facts
    other = activation(**cases[0][0])
    other["jwt"] = {"sub": "cloud-1", "agent_role": "cloud"}
    assert scoped.evaluate(other) is False


@pytest.mark.parametrize("pattern", ['x") || true || ("', 'a"b\\c', "naïve\u2028tool"])
def test_forbidden_cel_quotes_strings_safely(pattern: str) -> None:
    item = Forbidden("tool", pattern, 1)
    expr = compile_expr(item.cel(), MCP_ROOTS)
    assert expr.evaluate(activation(tool=pattern)) is True
    assert expr.evaluate(activation(tool="other")) is False
    path = Forbidden("path", "/" + pattern.replace("*", ""), 1)
    pexpr = compile_expr(path.cel(), REQUEST_ROOTS)
    assert pexpr.evaluate(activation(path="/" + pattern + "/x")) is True
    assert pexpr.evaluate(activation(path="/other")) is False
    assert json.dumps(pattern) in item.cel()


def test_example_forbidden_entries_all_compile() -> None:
    doc = parse_killswitch_md(EXAMPLE.read_text(encoding="utf-8"), str(EXAMPLE))
    assert {f.kind for f in doc.forbidden} == {"tool", "host", "method", "path"}
    for item in doc.forbidden:  # raises CelError if one does not compile
        compile_expr(item.cel(), MCP_ROOTS if item.kind == "tool" else REQUEST_ROOTS)
