"""What the operator CLI prints: ``fleetgate status`` / ``killlog`` / ``sessions tree`` over the
admin API's JSON (payloads captured from a running gateway), and the mitmweb argv of
``fleetgate run --web``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fleetgate import cli
from fleetgate.cli_kill import format_log_row, format_status, format_tree, span, table

NOW = 1796578560.0

# GET /v1/status of a gateway with a trigger's throttle, an operator's 10-minute pause and a
# cascading stop in force (trimmed from a real answer)
STATUS: dict[str, Any] = {
    "actions": [
        {"verb": "throttle", "scope": {"kind": "agent", "value": "loop-st", "cascade": False},
         "reason": "trigger runaway-loop: 5 identical requests within 60s (limit 5)",
         "by": "runaway-loop", "source": "trigger:runaway-loop", "at": 1796578552.62,
         "until": 1796579152.62, "throttle": {"requests": 1, "per": 30.0},
         "id": "a8e9805d3aa9", "remaining": 592.62},
        {"verb": "pause", "scope": {"kind": "role", "value": "cloud", "cascade": False},
         "reason": "maintenance", "by": "alice", "source": "operator", "at": 1796578552.76,
         "until": 1796579152.76, "throttle": None, "id": "6ac1857035ea", "remaining": 592.76},
        {"verb": "stop", "scope": {"kind": "session", "value": "s-cut", "cascade": True},
         "reason": "runaway", "by": "bob", "source": "operator", "at": 1796578553.51,
         "until": None, "throttle": None, "id": "3b73a2b2ba6f", "remaining": None},
    ],
    "sessions": 2, "live_flows": 0, "bound_tunnels": 1,
    "triggers": [
        {"trigger": "runaway-loop", "metric": "identical_requests", "per": "agent",
         "key": "cut-1", "step": None, "verb": None, "since": None, "value": 1.0, "above": 5.0},
        {"trigger": "runaway-loop", "metric": "identical_requests", "per": "agent",
         "key": "loop-st", "step": 0, "verb": "throttle", "since": 1796578552.62,
         "value": 5.0, "above": 5.0},
    ],
}

# GET /v1/log rows of the same gateway: an action, a cut LLM stream, a cut tunnel
ACTION_ROW = {"seq": 3, "at": 1796578553.51, "event": "action", "action": "3b73a2b2ba6f",
              "verb": "stop", "scope": {"kind": "session", "value": "s-cut", "cascade": True},
              "reason": "runaway", "by": "bob", "source": "operator", "until": None,
              "throttle": None, "id": "3b73a2b2ba6f", "sessions": ["s-cut"], "descendants": []}
LLM_CUT_ROW = {
    "seq": 5, "at": 1796578553.51, "event": "cut", "action": "3b73a2b2ba6f",
    "rule": "killswitch.stop", "flow": "0e079b5f", "agent": "cut-1", "session": "s-cut",
    "role": "security", "method": "POST", "host": "up34837.fleetgate.test",
    "path": "/v1/chat/completions", "mcp_tools": [], "status": 200, "bytes_sent": 127,
    "bytes_received": 1188, "phase": "streaming the response", "started": 1796578552.83,
    "elapsed_s": 0.682,
    "llm": {"provider": "openai", "model": "gpt-4o", "response_model": "gpt-4o-2024-08-06",
            "outcome": "cut", "operation": "chat", "ttft_ms": 447.44,
            "tokens": {"input": 3, "output": 10, "cache_read": 0, "cache_write": 0,
                       "reasoning": 0, "estimated": True},
            "cost_usd": 0.000108, "priced": True, "estimated": True}}
TUNNEL_CUT_ROW = {"seq": 6, "at": 1796578553.51, "event": "cut", "action": "3b73a2b2ba6f",
                  "rule": "killswitch.stop", "tunnel": "1ab7052a", "agent": "cut-1",
                  "session": "s-cut", "phase": "tunnel closed"}


def test_status_is_a_table_of_actions_and_triggers() -> None:
    lines = format_status(STATUS, NOW)
    assert lines[0] == ("3 action(s) in force; 2 session(s) known; 0 flow(s) in flight; "
                        "1 tunnel(s) bound")
    text = "\n".join(lines)
    assert "{" not in text and "'" not in text  # no dict reprs left
    i = lines.index("ACTIONS IN FORCE")
    header, *rows = lines[i + 1:i + 5]
    assert header.split() == ["ID", "ACTION", "SCOPE", "BY", "SOURCE", "SINCE", "EXPIRES",
                              "REASON"]
    # aligned: every column starts where its header does
    assert {r.index("session:s-cut") for r in rows if "s-cut" in r} == {header.index("SCOPE")}
    assert rows[0].split()[:5] == ["a8e9805d3aa9", "throttle", "1/30s", "agent:loop-st",
                                   "runaway-loop"]
    assert "in 9m53s" in rows[0] and rows[0].endswith("(limit 5)")
    assert "2026-12-06 17:35:52Z (7s ago)" in rows[1] and "in 9m53s" in rows[1]
    assert "session:s-cut+descendants" in rows[2] and " never " in rows[2]
    assert rows[2].endswith("runaway")
    t = lines.index("TRIGGERS")
    assert lines[t + 1].split() == ["TRIGGER", "METRIC", "PER", "KEY", "STATE", "VALUE",
                                    "ABOVE", "SINCE"]
    assert lines[t + 2].split() == ["runaway-loop", "identical_requests", "agent", "cut-1",
                                    "watching", "1", "5", "-"]
    assert lines[t + 3].split() == ["runaway-loop", "identical_requests", "agent", "loop-st",
                                    "throttle", "(step", "1)", "5", "5", "7s", "ago"]


def test_status_with_nothing_in_force_is_one_line() -> None:
    assert format_status({"actions": [], "sessions": 0, "live_flows": 0, "bound_tunnels": 0,
                          "triggers": []}, NOW) == [
        "0 action(s) in force; 0 session(s) known; 0 flow(s) in flight; 0 tunnel(s) bound"]


def test_status_shows_fields_it_does_not_know_yet() -> None:
    lines = format_status({**STATUS, "store": {"ok": False, "error": "locked"},
                           "replica": "gw-2"}, NOW)
    assert lines[-2:] == ['replica: gw-2', 'store: {"ok": false, "error": "locked"}']


def test_killlog_cut_row_shows_the_llm_usage_so_far() -> None:
    line = format_log_row(LLM_CUT_ROW)
    assert line.startswith("2026-12-06 17:35:53Z  cut     3b73a2b2ba6f  cut-1  POST "
                           "up34837.fleetgate.test/v1/chat/completions  streaming the response")
    assert line.endswith("openai gpt-4o: 3 in / 10 out tokens (estimated), $0.000108")
    assert format_log_row({**LLM_CUT_ROW, "llm": None}).endswith("received 1188 B")


def test_killlog_rows_of_every_event_read_as_text() -> None:
    assert format_log_row(ACTION_ROW) == (
        "2026-12-06 17:35:53Z  action  3b73a2b2ba6f  stop session:s-cut+descendants by bob "
        "(operator): runaway; sessions ['s-cut'] + []")
    assert format_log_row(TUNNEL_CUT_ROW).endswith("cut-1  tunnel 1ab7052a  tunnel closed")
    lift = {"seq": 8, "at": NOW, "event": "lift", "action": "3b73a2b2ba6f", "verb": "stop",
            "scope": {"kind": "session", "value": "s-cut", "cascade": True}, "by": "e2e",
            "reason": "", "source": "operator"}
    assert "lift    3b73a2b2ba6f  stop session:s-cut+descendants by e2e" in format_log_row(lift)
    delegate = {"seq": 9, "at": NOW, "event": "delegate", "action": None,
                "parent_agent": "coord-1", "parent_session": "s-coord",
                "child_agent": "coord-1/security-1", "child_session": "s-c1",
                "role": "security", "depth": 1, "exp": NOW + 600, "jti": "j"}
    assert format_log_row(delegate).endswith(
        "coord-1 (s-coord) -> coord-1/security-1 (s-c1) as security, depth 1, "
        "expires 2026-12-06 17:46:00Z")
    assert format_log_row({"seq": 1, "at": NOW, "event": "new", "action": None, "x": 1}
                          ).endswith('new     -             {"x": 1}')


def test_session_tree_indents_children() -> None:
    tree = [{"session": "s-1", "agent": "a", "role": "coordinator", "state": "stopped",
             "action": "abc", "children": [
                 {"session": "s-2", "agent": "a/b", "role": None, "state": "live",
                  "action": None, "children": []}]}]
    assert format_tree(tree) == ["s-1  a (coordinator) [stopped abc]", "  s-2  a/b (-)"]


def test_table_and_span() -> None:
    assert table(["A", "BB", "C"], [["xxx", None, "free text"]]) == [
        "A    BB  C", "xxx  -   free text"]
    assert [span(x) for x in (0, 59.6, 61, 3599, 3600 * 2 + 180, 86400 * 3 + 3600 * 4)] == [
        "0s", "1m00s", "1m01s", "59m59s", "2h03m", "3d04h"]


def test_output_piped_into_head_ends_without_a_traceback() -> None:
    code = ("from fleetgate.cli_kill import emit\n"
            "emit(f'line {i}' for i in range(200000))\n")
    out = subprocess.run(f"{sys.executable} -c \"{code}\" | head -1", shell=True,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout == "line 0\n"
    assert out.stderr == "", out.stderr


# -- fleetgate run --web --------------------------------------------------------------------


def run_argv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *extra: str) -> list[str]:
    seen: list[list[str]] = []
    monkeypatch.setattr(cli.os, "execv", lambda exe, argv: seen.append(list(argv)))
    cli.main(["run", "--web", "--confdir", str(tmp_path), "--state-dir", "", *extra])
    assert len(seen) == 1
    return seen[0]


def web_columns(argv: list[str]) -> list[str]:
    sets = [a.removeprefix("--set=") if a.startswith("--set=") else argv[i + 1]
            for i, a in enumerate(argv) if a == "--set" or a.startswith("--set=")]
    return [s.partition("=")[2] for s in sets if s.startswith("web_columns=")]


def test_run_web_shows_mitmwebs_columns_and_the_comment(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    from mitmproxy.tools.web.webaddons import WebAddon

    class Loader:
        defaults: dict[str, Any] = {}

        def add_option(self, name: str, typespec: Any, default: Any, *a: Any,
                       **kw: Any) -> None:
            self.defaults[name] = default

    loader = Loader()
    WebAddon().load(loader)
    assert list(cli.WEB_COLUMNS) == [*loader.defaults["web_columns"], "comment"]
    argv = run_argv(monkeypatch, tmp_path)
    assert Path(argv[0]).name == "mitmweb"
    assert web_columns(argv) == list(cli.WEB_COLUMNS)


@pytest.mark.parametrize("extra", [["--", "--set", "web_columns=path"],
                                   ["--", "--set=web_columns=path"]])
def test_run_web_keeps_the_operators_columns(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             extra: list[str]) -> None:
    assert web_columns(run_argv(monkeypatch, tmp_path, *extra)) == ["path"]


def test_run_web_keeps_columns_from_the_confdir_config(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("web_columns: [path, comment]\n")
    assert web_columns(run_argv(monkeypatch, tmp_path)) == []
