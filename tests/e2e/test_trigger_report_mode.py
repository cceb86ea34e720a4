"""A kill-switch trigger in report mode (issue 20): it says what it would do, never does it.

The same runaway loop that ``test_killswitch.py`` throttles and stops is let through when the
trigger is ``mode: report``: every request reaches the upstream, the decision log names the
trigger and the step it would have taken, the metric counts it, and no action is in force.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import GatewayFactory

from harness import Upstream, token, wait_until, write_rules

pytestmark = pytest.mark.e2e

TRIGGERS = """
killswitch:
  triggers:
  - id: runaway-loop
    mode: report
    metric: identical_requests
    above: 3
    window: 60s
    ladder: [throttle, stop]
    throttle: {requests: 1, per: 30s}
    cooldown: 0s
"""


def test_a_report_mode_trigger_reports_the_step_it_would_take_and_acts_on_nothing(
        make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream) -> None:
    gw = make_gateway(write_rules(tmp_path / "rules.yaml", [upstream.port], top=TRIGGERS))
    with gw.client(token("looper-1", role="tester", session_id="s-loop")) as c:
        codes = [c.post(upstream.url + "/loop", json={"same": "request"}).status_code
                 for _ in range(8)]
    assert codes == [200] * 8
    assert upstream.paths().count("/loop") == 8
    assert gw.admin("/v1/status").json()["actions"] == []  # nothing in force
    assert wait_until(lambda: any(
        w["rule"] == "trigger:runaway-loop" for d in gw.decisions()
        for w in d.get("would_deny") or []), 5)
    reported = [w for d in gw.decisions() for w in d.get("would_deny") or []
                if w["rule"] == "trigger:runaway-loop"]
    assert "would throttle agent:looper-1" in reported[0]["reason"]
    assert any("would stop" in w["reason"] for w in reported)  # the ladder's next step
    assert 'fleetgate_would_deny_total{rule="trigger:runaway-loop"}' in gw.metrics()
