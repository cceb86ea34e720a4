"""Record through a real gateway, then replay against a changed policy (issue 20, part 3).

``fleetgate_record`` (``fleetgate run --record``) writes every finished flow in mitmproxy's
format with credential headers masked; ``fleetgate replay`` reads that file with mitmproxy's
reader, judges each flow with the identity it carried under new rules, and lists exactly the
flows whose decision changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mitmproxy import http, io

from fleetgate.cli import main
from harness import Upstream, token, write_rules

NO_REPORTS = """    - id: tester.no-reports
      deny: 'request.path.startsWith("/reports")'
      reason: reports are off limits now
"""
SECRETS = {"authorization": "Bearer sk-live-agent-key-1", "x-api-key": "sk-ant-secret-2",
           "cookie": "session=cookie-secret-3"}


def test_recorded_flows_are_masked_and_replay_shows_exactly_the_changes(
        make_gateway, tmp_path: Path, upstream: Upstream,
        capsys: pytest.CaptureFixture[str]) -> None:
    # the same file name in both: an unnamed rule's id comes from its file ("rules.authorization[2]")
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = write_rules(tmp_path / "old" / "rules.yaml", [upstream.port])
    new = write_rules(tmp_path / "new" / "rules.yaml", [upstream.port], extra=NO_REPORTS)
    record = tmp_path / "flows.mitm"
    gw = make_gateway(old, fleetgate_record=str(record))
    jwt = token("agent-7", session_id="s-7")
    with gw.client(jwt) as c:
        for path in ("/docs/1", "/reports/q1", "/docs/2", "/reports/q2?x=1", "/drop-table"):
            c.get(f"{upstream.url}{path}", headers=SECRETS)
    assert len(upstream.seen) == 4  # /drop-table was denied by the seed rule
    # the live flow went upstream with the agent's credentials untouched
    assert upstream.seen[0].headers.get("x-api-key") == "sk-ant-secret-2"
    gw.stop()

    data = record.read_bytes()
    for secret in (*SECRETS.values(), "sk-live-agent-key-1", "cookie-secret-3", jwt):
        assert secret.encode() not in data, f"{secret!r} is in the recording"
    with record.open("rb") as fo:
        flows = [f for f in io.FlowReader(fo).stream() if isinstance(f, http.HTTPFlow)]
    assert [f.request.path for f in flows] == [
        "/docs/1", "/reports/q1", "/docs/2", "/reports/q2?x=1", "/drop-table"]
    assert flows[0].request.headers["x-api-key"] == "[masked by fleetgate]"
    assert flows[0].metadata["fleetgate.claims"]["sub"] == "agent-7"

    # against the decisions recorded in the flows
    assert main(["replay", str(record), "--rules", str(new), "--json", "--fail-on-change"]) == 1
    report = json.loads(capsys.readouterr().out)
    changed = [(c["method"], c["url"].rsplit(":", 1)[-1].split("/", 1)[-1], c["old"]["rule"],
                c["new"]["rule"]) for c in report["changes"]]
    assert changed == [("GET", "reports/q1", "tester.allow", "tester.no-reports"),
                       ("GET", "reports/q2?x=1", "tester.allow", "tester.no-reports")]
    assert (report["flows"], report["judged"], report["no_identity"]) == (5, 5, [])

    # against the old rules, and in words
    assert main(["replay", str(record), "--rules", str(new), "--against", str(old)]) == 0
    out = capsys.readouterr().out
    assert f"GET {upstream.url}/reports/q1: allow (tester.allow) -> deny (tester.no-reports)" in out
    assert "2 of 5 flow(s) change decision" in out
    # the same rules change nothing
    assert main(["replay", str(record), "--rules", str(old), "--fail-on-change"]) == 0
    assert "0 of 5 flow(s) change decision" in capsys.readouterr().out
