"""The call tree of a session family, from decision records: labels, order, nesting, totals,
the text picture and its JSON; and reading it back from decision log files (``--log``)."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from fleetgate.cli_trace import cmd_trace, read_family
from fleetgate.telemetry.tree import (
    build,
    call_label,
    family_of,
    human_cost,
    human_duration,
    render_text,
    to_json,
)

_ids = iter(range(10**6))


def rec(session: str, start: float, dur: float, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "ts": start + dur, "start_ts": start, "decision_id": f"d{next(_ids)}", "result": "allow",
        "rule": "fleet.allow", "reason": "", "agent": "coord-1", "role": "coordinator",
        "session": session, "method": "POST", "host": "tools.local", "port": 8443,
        "path": "/mcp", "status": 200, "latency_ms": dur * 1000}
    base.update(kw)
    return base


def mcp(method: str, target: str | None = None) -> dict[str, Any]:
    return {"server": "tools", "transport": "streamable-http", "session": "m1",
            "calls": [{"method": method, "target": target, "allow": True, "rule": "r"}],
            "hidden": [], "hidden_count": 0}


def llm(model: str, inp: int, out: int, cost: float | None, **kw: Any) -> dict[str, Any]:
    return {"provider": "openai", "operation": "chat", "model": model, "response_model": None,
            "tokens": {"input": inp, "output": out, "cache_read": 0, "cache_write": 0,
                       "reasoning": 0, "estimated": False},
            "cost_usd": cost, "estimated": False, "priced": cost is not None, "outcome": "ok",
            "ttft_ms": None, **kw}


def child(session: str, parent: str, role: str, start: float, dur: float,
          **kw: Any) -> dict[str, Any]:
    return rec(session, start, dur, agent=f"coord-1/{role}", role=role, parent_session=parent,
               root_session="s1", **kw)


DELEGATE = {"host": "fleetgate.internal", "port": 443, "path": "/v1/delegate",
            "rule": "delegation"}
OPENAI = {"host": "api.openai.com", "port": 443, "path": "/v1/chat/completions"}


def family() -> list[dict[str, Any]]:
    """The seed's task, with a denial and two levels of sub-agents (records out of order)."""
    return [
        rec("s1", 104.3, 3.1, llm=llm("gpt-4o", 10_000, 2_000, 0.35), **OPENAI),
        rec("s1", 100.0, 0.012, mcp=mcp("initialize")),
        rec("s1", 100.03, 4.2, mcp=mcp("tools/call", "nmap_scan")),
        rec("s1", 100.02, 0.008, mcp=mcp("tools/list")),
        rec("s1", 107.5, 0.003, result="deny", rule="no-deletes", reason="deletes need a human",
            status=403, method="GET", path="/delete-all"),
        rec("s1", 107.6, 0.005, **DELEGATE),
        child("c1", "s1", "security", 107.7, 0.9, llm=llm("gpt-4o", 800, 47, 0.03), **OPENAI),
        child("c1", "s1", "security", 108.7, 0.005, **DELEGATE),
        child("g1", "c1", "triage", 108.8, 0.3, method="GET", host="example.com", port=443,
              path="/x"),
        rec("other", 100.0, 1.0, agent="someone-else"),  # not of the family
        {**rec("s1", 99.0, 0.0), "phase": "request"},  # an audit pre-line: not a call
    ]


def test_labels_follow_the_seed() -> None:
    assert call_label(rec("s", 0, 0, mcp=mcp("initialize"))) == "initialize"
    assert call_label(rec("s", 0, 0, mcp=mcp("tools/list"))) == "list_tools"
    assert call_label(rec("s", 0, 0, mcp=mcp("tools/call", "nmap"))) == "call_tool(nmap)"
    assert call_label(rec("s", 0, 0, mcp=mcp("resources/list"))) == "resources/list"
    assert call_label(rec("s", 0, 0, mcp=mcp("prompts/get", "p1"))) == "prompts/get(p1)"
    assert call_label(rec("s", 0, 0, llm=llm("claude-opus-4-5", 1, 1, None))) == \
        "llm_call(claude-opus-4-5)"
    assert call_label(rec("s", 0, 0, llm={**llm("", 1, 1, None), "model": None,
                                          "response_model": "gpt-4o-2024-08-06"})) == \
        "llm_call(gpt-4o-2024-08-06)"
    assert call_label(rec("s", 0, 0, **DELEGATE), child_role="security") == "delegate(security)"
    assert call_label(rec("s", 0, 0, **DELEGATE)) == "delegate"
    # /v1/delegate on some upstream, answered by its rules, is not a delegation
    assert call_label(rec("s", 0, 0, host="evil.com", port=443, path="/v1/delegate")) == \
        "POST evil.com/v1/delegate"
    assert call_label(rec("s", 0, 0, method="GET", host="h", port=8080, path="/p")) == \
        "GET h:8080/p"
    batch = {**mcp("tools/list"), "calls": [{"method": "tools/list"},
                                            {"method": "tools/call", "target": "kubectl"}]}
    assert call_label(rec("s", 0, 0, mcp=batch)) == "batch[list_tools, call_tool(kubectl)]"


def test_calls_are_in_time_order_and_children_nest_under_their_delegation() -> None:
    trace = build(family(), "s1")
    assert trace is not None
    root = trace.root
    assert [c.label for c in root.calls] == [
        "initialize", "list_tools", "call_tool(nmap_scan)", "llm_call(gpt-4o)",
        "GET tools.local:8443/delete-all", "delegate(security)"]
    [c1] = root.children
    assert (c1.session, c1.role, c1.parent_session) == ("c1", "security", "s1")
    assert c1.delegated_by == root.calls[-1].decision_id
    assert [c.label for c in c1.calls] == ["llm_call(gpt-4o)", "delegate(triage)"]
    [g1] = c1.children
    assert (g1.session, g1.role) == ("g1", "triage")
    assert [c.label for c in g1.calls] == ["GET example.com/x"]
    denied = root.calls[4]
    assert (denied.result, denied.outcome, denied.rule, denied.status) == \
        ("deny", "denied", "no-deletes", 403)


def test_totals_per_session_and_for_the_family() -> None:
    trace = build(family(), "s1")
    assert trace is not None
    own, fam = trace.root.totals, trace.root.family
    assert (own.calls, own.denied, own.tokens, own.sessions) == (6, 1, 12_000, 1)
    assert own.cost_usd == pytest.approx(0.35)
    assert (fam.calls, fam.denied, fam.tokens, fam.sessions) == (9, 1, 12_847, 3)
    assert fam.cost_usd == pytest.approx(0.38)
    assert fam.duration == pytest.approx(109.1 - 100.0)  # first start to last end, not a sum
    assert trace.root.children[0].family.tokens == 847


def test_a_child_asked_for_is_its_own_tree_or_shown_in_its_parents_context() -> None:
    alone = build(family(), "c1")
    assert alone is not None and alone.root.session == "c1"
    assert [k.session for k in alone.root.children] == ["g1"]
    ctx = build(family(), "g1", context=True)
    assert ctx is not None and ctx.root.session == "s1" and ctx.focus == "g1"
    assert "<- asked" in render_text(ctx)
    assert build(family(), "nobody") is None


def test_unmatched_children_and_unpriced_calls_are_said_so() -> None:
    records = [rec("p", 10.0, 1.0, llm=llm("local-llama", 5, 5, None), **OPENAI),
               child("k", "p", "security", 12.0, 0.5)]  # its delegation is not in the records
    trace = build(records, "p")
    assert trace is not None and trace.root.children[0].delegated_by is None
    text = render_text(trace)
    assert "(its delegation is not in these records)" in text
    assert "unpriced" in text and "(+1 unpriced)" in text


def test_a_child_started_before_any_delegation_ended_is_not_matched_to_it() -> None:
    records = [rec("p", 10.0, 5.0, **DELEGATE), child("k", "p", "security", 11.0, 0.5)]
    trace = build(records, "p")
    assert trace is not None
    assert trace.root.children[0].delegated_by is None
    assert trace.root.calls[0].label == "delegate"


def test_rotated_and_live_files_overlapping_count_each_call_once() -> None:
    records = family()
    trace = build(records + records, "s1")
    assert trace is not None and trace.root.family.calls == 9


def test_text_is_aligned_boxed_and_has_an_ascii_form() -> None:
    trace = build(family(), "s1")
    assert trace is not None
    text = render_text(trace)
    lines = text.splitlines()
    assert lines[0].startswith("┌─ Trace: s1 ") and lines[-1].startswith("└")
    assert len({len(line) for line in lines}) == 1  # a closed box
    assert "DENIED no-deletes (403)" in text
    assert "Total (3 sessions): 9.1s | Calls: 9 (1 denied) | Tokens: 12,847 | Cost: $0.38" in text
    assert "└─ coord-1/security, role security, session c1" in text
    # durations in one column: each call row's duration ends at the same column
    rows = [line for line in lines if line.lstrip("│ ").startswith("+")]
    ends = {line.index(dur) + len(dur) for line, dur in zip(rows, (
        "12ms", "8.0ms", "4.2s", "3.1s", "3.0ms", "5.0ms", "900ms", "5.0ms", "300ms"),
        strict=True)}
    assert len(ends) == 1
    ascii_text = render_text(trace, ascii_only=True)
    assert ascii_text.isascii() and "`- coord-1/security" in ascii_text


def test_json_has_the_tree_and_the_totals() -> None:
    trace = build(family(), "s1")
    assert trace is not None
    out = json.loads(json.dumps(to_json(trace)))
    assert out["focus"] == "s1" and out["totals"]["tokens"]["total"] == 12_847
    assert out["totals"]["calls"] == 9 and out["totals"]["sessions"] == 3
    root = out["root"]
    assert root["calls"][4]["rule"] == "no-deletes" and root["calls"][4]["outcome"] == "denied"
    assert root["calls"][3]["tokens"] == {"input": 10_000, "output": 2_000, "total": 12_000,
                                          "estimated": False}
    assert root["children"][0]["children"][0]["session"] == "g1"


@pytest.mark.parametrize(("seconds", "text"), [
    (0.0004, "0.4ms"), (0.012, "12ms"), (0.9994, "999ms"), (4.2, "4.2s"), (59.9, "59.9s"),
    (125, "2m05s"), (3725, "1h02m")])
def test_human_durations(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


@pytest.mark.parametrize(("usd", "text"), [
    (0.0, "$0.00"), (0.38, "$0.38"), (1234.5, "$1,234.50"), (0.000115, "$0.00012"),
    (0.0012, "$0.0012")])
def test_human_costs_never_round_a_cheap_call_to_free(usd: float, text: str) -> None:
    assert human_cost(usd) == text


def test_family_of_walks_down_and_optionally_up() -> None:
    parents = {"c1": "s1", "g1": "c1", "c2": "s1", "x": "other"}
    assert family_of(parents, "s1") == {"s1", "c1", "g1", "c2"}
    assert family_of(parents, "c1") == {"c1", "g1"}
    assert family_of(parents, "g1", ancestors=True) == {"g1", "c1", "s1"}
    assert family_of({"a": "b", "b": "a"}, "a", ancestors=True) == {"a", "b"}  # no loop


def _args(**kw: Any) -> argparse.Namespace:
    base = {"session": "s1", "json": False, "ascii": True, "ancestors": False, "log": None,
            "admin": "http://127.0.0.1:9", "token_file": None}
    base.update(kw)
    return argparse.Namespace(**base)


def test_log_files_with_rotated_siblings_and_junk_lines(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    records = family()
    log = tmp_path / "decisions.log"
    lines = [json.dumps(r) for r in records]
    (tmp_path / "decisions.log.2").write_text("\n".join(lines[:3]) + "\nnot json\n")
    with gzip.open(tmp_path / "decisions.log.1.gz", "wt") as f:
        f.write("\n".join(lines[3:6]) + '\n{"no": "decision"}\n')
    log.write_text("\n".join(lines[6:]) + "\n")
    got, skipped = read_family([str(log)], "s1")
    assert skipped.lines == 2
    assert {r["session"] for r in got} == {"s1", "c1", "g1"}
    assert cmd_trace(_args(log=[str(log)])) == 0
    out, err = capsys.readouterr()
    assert "skipped 2 of" in err
    assert "Tokens: 12,847" in out and "delegate(security)" in out
    assert cmd_trace(_args(session="nobody", log=[str(log)])) == 1
    assert "no decision records of session 'nobody'" in capsys.readouterr().err
    assert cmd_trace(_args(log=[str(log)], json=True)) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["tokens"]["total"] == 12_847
    with pytest.raises(SystemExit, match="no such decision log file"):
        cmd_trace(_args(log=[str(tmp_path / "missing.log")]))
