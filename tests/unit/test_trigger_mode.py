"""``mode: report`` on a kill-switch trigger: parsed, carried to its firings, refused when wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetgate.kill.model import Subject
from fleetgate.kill.triggers import Event, TriggerEngine
from fleetgate.policy.loader import PolicyError, load_policy
from fleetgate.rule import Mode

RULES = """apiVersion: fleetgate/v1
killswitch:
  triggers:
  - {{id: loop, metric: identical_requests, above: 2, ladder: [stop]{mode}}}
"""


def test_a_report_mode_trigger_fires_as_a_report(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(RULES.format(mode=", mode: report"))
    [spec] = load_policy(path).kill_triggers
    assert spec.mode is Mode.REPORT
    engine = TriggerEngine([spec])
    subject = Subject.from_identity({"agent": "a-1", "role": "r", "session": "s-1"})
    firings = []
    for i in range(4):
        firings += engine.observe(Event.request(subject, fingerprint="same"), 100.0 + i)
    assert firings and all(f.report for f in firings)
    path.write_text(RULES.format(mode=""))
    [spec] = load_policy(path).kill_triggers
    assert spec.mode is Mode.ENFORCE


def test_a_bad_trigger_mode_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(RULES.format(mode=", mode: shadow"))
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    assert "mode must be 'enforce' or 'report'" in str(exc.value)
    assert "triggers[0].mode" in str(exc.value)
