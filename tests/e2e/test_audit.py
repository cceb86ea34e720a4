"""End to end: audit that can be required, rotation, reopen (issue 16 item 4), real mitmdump.

The decision log path is a symlink the test re-points (atomically) while the gateway runs: at
a regular file, at ``/dev/full`` (every write fails with ENOSPC, root or not: chmod does not
stop root), and back. The gateway notices the path now names another file (``WatchedFileHandler``
semantics), reopens it, and its writes fail or succeed for real.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from harness import Gateway, Upstream, token, wait_until

pytestmark = pytest.mark.e2e


def point(link: Path, target: str) -> None:
    """Make ``link`` name ``target``, atomically (rename over the old link)."""
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x] if path.exists() else []


def write_errors(gw: Gateway) -> float:
    m = re.search(r"^fleetgate_audit_write_errors_total ([0-9.e+]+)$", gw.metrics(), re.M)
    assert m, "fleetgate_audit_write_errors_total missing"
    return float(m.group(1))


def log_state(gw: Gateway) -> dict:
    return gw.ready().json()["state"]["decision_log"]


def audited_gateway(make_gateway, rules_file: Path, tmp_path: Path, required: bool
                    ) -> tuple[Gateway, Path]:
    link = tmp_path / "audit.log"
    point(link, str(tmp_path / "first.log"))
    (tmp_path / "first.log").touch()
    gw = make_gateway(rules_file, fleetgate_decision_log=str(link),
                      fleetgate_audit_required="true" if required else "false")
    return gw, link


def test_required_audit_refuses_when_the_log_cannot_be_written_and_recovers(
        make_gateway, rules_file: Path, upstream: Upstream, tmp_path: Path) -> None:
    gw, link = audited_gateway(make_gateway, rules_file, tmp_path, required=True)
    with gw.client(token("agent-1")) as c:
        ok = c.get(upstream.url + "/before")
        assert ok.status_code == 200
        did = ok.headers["x-fleetgate-decision-id"]
        # the request line was written before the upstream saw the call, the final one after
        wait_until(lambda: len([d for d in lines(tmp_path / "first.log")
                                if d["decision_id"] == did]) == 2)
        phases = [d.get("phase") for d in lines(tmp_path / "first.log")
                  if d["decision_id"] == did]
        assert phases == ["request", None]
        assert log_state(gw)["ok"] is True

        point(link, "/dev/full")
        refused = [c.get(upstream.url + f"/lost-{i}") for i in range(3)]
        for r in refused:
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["fleetgate"]["rule"] == "audit.unavailable"
            assert "No space left on device" in body["error"]["message"]
            assert body["error"]["type"] == "overloaded_error"  # the SDKs' 503 shape
        assert not [p for p in upstream.paths() if p.startswith("/lost")], \
            "an unaudited call reached the upstream"
        state = log_state(gw)
        assert state["ok"] is False and "No space left" in state["error"]
        assert gw.ready().json()["degraded"] is True
        assert write_errors(gw) >= 3
        gw.wait_for_output("the decision log cannot be written")

        point(link, str(tmp_path / "second.log"))  # the operator freed the disk: no restart
        back = c.get(upstream.url + "/after")
        assert back.status_code == 200
        assert "/after" in upstream.paths()
        assert log_state(gw)["ok"] is True
        did = back.headers["x-fleetgate-decision-id"]
        wait_until(lambda: any(d["decision_id"] == did and d.get("phase") is None
                               for d in lines(tmp_path / "second.log")))
    assert "fleetgate_audit_log_ok 1.0" in gw.metrics()


def test_without_required_audit_calls_are_forwarded_and_the_fault_is_visible(
        make_gateway, rules_file: Path, upstream: Upstream, tmp_path: Path) -> None:
    gw, link = audited_gateway(make_gateway, rules_file, tmp_path, required=False)
    with gw.client(token("agent-1")) as c:
        assert c.get(upstream.url + "/before").status_code == 200
        assert wait_until(lambda: len(lines(tmp_path / "first.log")) == 1)
        assert "phase" not in lines(tmp_path / "first.log")[0]  # one line per flow, as before
        point(link, "/dev/full")
        for i in range(3):
            assert c.get(upstream.url + f"/unlogged-{i}").status_code == 200
        assert [p for p in upstream.paths() if p.startswith("/unlogged")] == [
            "/unlogged-0", "/unlogged-1", "/unlogged-2"]
        assert wait_until(lambda: write_errors(gw) >= 3)
        assert log_state(gw)["ok"] is False
        assert "fleetgate_audit_log_ok 0.0" in gw.metrics()
        point(link, str(tmp_path / "second.log"))
        assert c.get(upstream.url + "/after").status_code == 200
        assert wait_until(lambda: len(lines(tmp_path / "second.log")) == 1)
        assert log_state(gw)["ok"] is True


def test_rotation_by_size_keeps_the_configured_backups(
        make_gateway, rules_file: Path, upstream: Upstream, tmp_path: Path) -> None:
    log = tmp_path / "rot.log"
    gw = make_gateway(rules_file, fleetgate_decision_log=str(log),
                      fleetgate_decision_log_max_bytes="2000", fleetgate_decision_log_backups="2")
    ids = []
    with gw.client(token("agent-1")) as c:
        for i in range(30):
            ids.append(c.get(upstream.url + f"/r{i}").headers["x-fleetgate-decision-id"])
    files = [log, Path(f"{log}.1"), Path(f"{log}.2")]
    assert wait_until(lambda: ids[-1] in {d["decision_id"] for d in lines(log)})
    assert all(f.exists() for f in files)
    assert not Path(f"{log}.3").exists(), "more backups than fleetgate_decision_log_backups"
    for f in files:
        assert 0 < f.stat().st_size <= 2000, f
    kept = [d["decision_id"] for f in reversed(files) for d in lines(f)]
    assert kept == ids[-len(kept):], "the kept lines are the newest, in order, none torn"
    assert len(kept) < len(ids)  # the oldest were rotated away


def test_a_moved_log_gets_a_new_file_and_sighup_is_handled(
        make_gateway, rules_file: Path, upstream: Upstream, tmp_path: Path) -> None:
    log = tmp_path / "moved.log"
    gw = make_gateway(rules_file, fleetgate_decision_log=str(log))
    with gw.client(token("agent-1")) as c:
        first = c.get(upstream.url + "/one").headers["x-fleetgate-decision-id"]
        assert wait_until(lambda: len(lines(log)) == 1)
        os.rename(log, tmp_path / "moved.log.rotated")  # logrotate, no copytruncate
        second = c.get(upstream.url + "/two").headers["x-fleetgate-decision-id"]
        assert wait_until(lambda: len(lines(log)) == 1)
        assert [d["decision_id"] for d in lines(log)] == [second]
        assert [d["decision_id"] for d in lines(tmp_path / "moved.log.rotated")] == [first]

        assert gw.proc is not None
        os.kill(gw.proc.pid, signal.SIGHUP)  # the default action would end the process
        gw.wait_for_output("SIGHUP")
        time.sleep(0.2)
        assert gw.proc.poll() is None
        third = c.get(upstream.url + "/three").headers["x-fleetgate-decision-id"]
        assert wait_until(lambda: [d["decision_id"] for d in lines(log)] == [second, third])
