"""The replay diff: flows whose decision changes, against OLD rules or the recorded decision."""

from __future__ import annotations

import json
from pathlib import Path

from fleetgate.offline.evaluate import OfflineRequest
from fleetgate.offline.replay import Recorded, replay
from fleetgate.policy.loader import load_policy
from fleetgate.policy.model import Policy

BASE = """apiVersion: fleetgate/v1
agents:
- name: w
  match: 'has(jwt.agent_role) && jwt.agent_role == "w"'
  egress: {{hosts: [example.com]}}
  authorization:
    rules:
    - {{id: w.all, allow: 'true'}}
{extra}"""


def _policy(tmp_path: Path, name: str, extra: str = "") -> Policy:
    d = tmp_path / name
    d.mkdir()
    (d / "rules.yaml").write_text(BASE.format(extra=extra))
    return load_policy(d)


def _rec(i: int, path: str, claims: dict[str, str] | None = None,
         decision: dict[str, object] | None = None) -> Recorded:
    return Recorded(str(i), OfflineRequest.from_url("GET", f"https://example.com{path}"),
                    claims if claims is not None else {"sub": "a", "agent_role": "w"},
                    timestamp=1000.0 + i, decision=decision)


def test_lists_exactly_the_flows_whose_decision_changes(tmp_path: Path) -> None:
    old = _policy(tmp_path, "old")
    new = _policy(tmp_path, "new", "    - {id: w.no-admin, deny: 'request.path.startsWith(\"/admin\")'}\n")
    flows = [_rec(1, "/a"), _rec(2, "/admin/x"), _rec(3, "/b"), _rec(4, "/admin")]
    report = replay(flows, new, old)
    assert [(c.flow.id, c.old_rule, c.new.rule) for c in report.changes] == [
        ("2", "w.all", "w.no-admin"), ("4", "w.all", "w.no-admin")]
    assert report.judged == 4
    assert replay(flows, old, old).changes == ()


def test_recorded_decisions_are_the_baseline_and_missing_identity_is_reported(
        tmp_path: Path) -> None:
    new = _policy(tmp_path, "new")
    allowed = {"allow": True, "rule": "w.all"}
    flows = [_rec(1, "/a", decision=allowed),
             _rec(2, "/b", decision={"allow": False, "rule": "w.old-deny"}),
             Recorded("3", OfflineRequest.from_url("GET", "https://example.com/"), None),
             _rec(4, "/c")]
    report = replay(flows, new)
    assert [(c.flow.id, c.old_allow, c.new.allow) for c in report.changes] == [("2", False, True)]
    assert [r.id for r in report.no_identity] == ["3"]
    assert [r.id for r in report.no_baseline] == ["4"]
    assert report.changes[0].line() == "GET https://example.com/b: deny (w.old-deny) -> allow (w.all)"


MCP = """mcp:
  servers:
  - name: tools
    hosts: [example.com]
    mcpAuthorization:
      rules:
      - {{id: tools.w, allow: 'jwt.agent_role == "w"'}}
{extra}"""


def _call(i: int, tool: str, namespace: str, decision: dict[str, object],
          calls: tuple[dict[str, object], ...]) -> Recorded:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": tool, "arguments": {"namespace": namespace}}}).encode()
    req = OfflineRequest.from_url("POST", "https://example.com/mcp", {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream"}, body)
    return Recorded(str(i), req, {"sub": "a", "agent_role": "w"}, timestamp=1000.0 + i,
                    decision=decision, mcp_calls=calls)


def test_an_allowed_mcp_call_is_named_by_its_mcp_rule_on_both_sides(tmp_path: Path) -> None:
    """The gateway's decision names the HTTP rule of an allowed MCP request; its messages'
    rules are recorded beside it. The diff names the MCP rule on the old side as on the new,
    so a change reads 'allow (tools.w) -> deny (tools.no-prod)' against recorded decisions
    exactly as against the old rules."""
    deny = "      - {id: tools.no-prod, deny: 'mcp.tool.arguments.namespace == \"prod\"'}\n"
    old = _policy(tmp_path, "old", MCP.format(extra=""))
    new = _policy(tmp_path, "new", MCP.format(extra=deny))
    http = {"allow": True, "rule": "w.all"}
    flows = [_call(i, "kubectl", ns, http, ({"method": "tools/call", "target": "kubectl",
                                             "allow": True, "rule": "tools.w"},))
             for i, ns in enumerate(("staging", "prod"), start=1)]
    for report in (replay(flows, new), replay(flows, new, old)):
        assert [c.line() for c in report.changes] == [
            "POST https://example.com/mcp: allow (tools.w) -> deny (tools.no-prod)"]
    assert replay(flows, old).changes == ()
    # recorded without its messages (an older recording): the HTTP rule names it too
    bare = [Recorded(r.id, r.request, r.claims, r.timestamp, r.decision) for r in flows]
    assert replay(bare, old).changes == ()
    assert [c.old_rule for c in replay(bare, new).changes] == ["w.all"]


LIMITED = """  policies:
    localRateLimit:
    - {{id: w.burst, maxTokens: 2, tokensPerFill: 2, fillInterval: 1h{mode}}}
"""


def test_report_mode_limits_never_refuse_offline_as_they_never_refuse_live(
        tmp_path: Path) -> None:
    """A rate limit rolled out with ``mode: report`` lets every request through at the
    gateway: replayed against those rules, the recorded traffic is allowed too, and the
    limit switched to enforce shows the requests it will refuse."""
    report = _policy(tmp_path, "report", LIMITED.format(mode=", mode: report"))
    enforce = _policy(tmp_path, "enforce", LIMITED.format(mode=""))
    flows = [_rec(i, f"/n{i}", decision={"allow": True, "rule": "w.all"}) for i in range(4)]
    assert replay(flows, report).changes == ()
    assert [(c.flow.id, c.new.rule, c.new.status) for c in replay(flows, enforce, report)
            .changes] == [("2", "w.burst", 429), ("3", "w.burst", 429)]


BUDGETED = """llm:
  providers:
  - {{name: openai, api: openai, hosts: [example.com]}}
budgets:
- {{id: w.cap, per: agent, period: day, tokens: {{hard: 60}}{mode}}}
"""


def test_report_mode_budgets_never_refuse_offline(tmp_path: Path) -> None:
    from fleetgate.offline.evaluate import Evaluator, json_body

    call = OfflineRequest.from_url(
        "POST", "https://example.com/v1/chat/completions", {"Content-Type": "application/json"},
        json_body({"model": "gpt-4o", "max_tokens": 20,
                   "messages": [{"role": "user", "content": "hi"}]}))
    claims = {"sub": "a", "agent_role": "w"}
    verdicts = {}
    for mode in ("", ", mode: report"):
        ev = Evaluator(_policy(tmp_path, f"b{len(verdicts)}", BUDGETED.format(mode=mode)))
        verdicts[mode] = [(v.allow, v.rule) for v in (ev.evaluate(claims, call)
                                                      for _ in range(4))]
    assert (False, "w.cap") in verdicts[""]
    assert verdicts[", mode: report"] == [(True, "w.all")] * 4
