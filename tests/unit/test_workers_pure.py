"""``fleetgate run --workers N``: the argument rules, each worker's options, the metrics merge
and the supervisor's health answers (no processes: :mod:`fleetgate.workers` is pure Python)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fleetgate.cli import main
from fleetgate.workers import (
    Supervisor,
    WorkersError,
    merge_metrics,
    redact,
    render_metrics,
    resolve_workers,
    worker_options,
)

REDIS = "redis://127.0.0.1:6379/0"


# -- how many workers ------------------------------------------------------------------------

@pytest.mark.parametrize("state", [REDIS, "rediss://r.example:6380/0", "unix:///run/redis.sock"])
def test_default_is_every_usable_core_with_shared_state(state: str) -> None:
    assert resolve_workers(None, state, cores=16) == 16
    assert resolve_workers(None, state, cores=2) == 2


def test_default_is_one_with_the_embedded_state() -> None:
    assert resolve_workers(None, "", cores=16) == 1


def test_explicit_counts() -> None:
    assert resolve_workers(1, "", cores=16) == 1
    assert resolve_workers(3, REDIS, cores=2) == 3  # more than the cores: the operator's call
    with pytest.raises(WorkersError, match="at least 1"):
        resolve_workers(0, REDIS, cores=2)


def test_more_than_one_without_shared_state_is_refused_with_why_and_what_to_do() -> None:
    with pytest.raises(WorkersError) as exc:
        resolve_workers(2, "", cores=16)
    msg = str(exc.value)
    assert "SQLite" in msg and "--state redis://" in msg and "--workers 1" in msg


def test_run_refuses_workers_without_state(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--workers", "2", "--rules", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert "--workers 2 needs shared state" in err and "--state redis://" in err


def test_run_refuses_web_with_workers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--web", "--workers", "2", "--state", REDIS]) == 2
    assert "--web" in capsys.readouterr().err


def test_redact_hides_the_password() -> None:
    assert redact("redis://:s3cret@host:6379/0") == "redis://host:6379/0"
    assert redact("rediss://user:pw@host/0") == "rediss://host/0"
    assert redact(REDIS) == REDIS


# -- each worker's options -------------------------------------------------------------------

def _opts(tmp_path: Path, decision_log: str) -> list[str]:
    return [f"fleetgate_rules={tmp_path / 'rules'}", "fleetgate_metrics_listen=0.0.0.0:15020",
            "fleetgate_admin_listen=127.0.0.1:15021", f"fleetgate_decision_log={decision_log}",
            f"fleetgate_state_dir={tmp_path / 'state'}", f"fleetgate_state={REDIS}"]


def _as_dict(opts: list[str]) -> dict[str, str]:
    pairs = [o.partition("=") for o in opts]
    assert len({k for k, _, _ in pairs}) == len(pairs), f"an option twice: {opts}"
    return {k: v for k, _, v in pairs}


def test_worker_options(tmp_path: Path) -> None:
    log = str(tmp_path / "decisions.jsonl")
    w0 = _as_dict(worker_options(_opts(tmp_path, log), 0, "127.0.0.1:15021"))
    w1 = _as_dict(worker_options(_opts(tmp_path, log), 1, "127.0.0.1:15021"))
    for i, w in enumerate((w0, w1)):
        assert w["fleetgate_reuse_port"] == "true"
        assert w["server"] == "false"  # bound once the option is applied (ReusePort.running)
        assert w["fleetgate_metrics_listen"] == "127.0.0.1:0"  # internal; the supervisor serves
        assert w["fleetgate_state"] == REDIS
        assert w["fleetgate_decision_log"] == str(tmp_path / f"decisions.w{i}.jsonl")
        assert w["fleetgate_state_dir"] == str(tmp_path / "state" / f"worker-{i}")
        assert (tmp_path / "state" / f"worker-{i}").is_dir()
    assert w0["fleetgate_admin_listen"] == "127.0.0.1:15021"
    assert w1["fleetgate_admin_listen"] == ""  # the admin API runs on worker 0 only


def test_stdout_and_disabled_decision_logs_stay_as_they_are(tmp_path: Path) -> None:
    for value in ("-", ""):
        w = _as_dict(worker_options(_opts(tmp_path, value), 1, ""))
        assert w["fleetgate_decision_log"] == value


# -- the metrics merge -----------------------------------------------------------------------

def _worker_text(requests: int, latency: float, flows: float, extra: bool = False) -> str:
    r = CollectorRegistry()
    c = Counter("fleetgate_requests", "Requests decided.", ["decision"], registry=r)
    c.labels("allow").inc(requests)
    c.labels("deny").inc(1)
    h = Histogram("fleetgate_decision_seconds", "Decision time.", registry=r)
    h.observe(latency)
    Gauge("fleetgate_live_flows", "Flows in flight.", registry=r).set(flows)
    if extra:
        Gauge("fleetgate_only_here", "A family one worker has.", registry=r).set(7)
    return generate_latest(r).decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_merge_labels_every_sample_with_its_worker_and_keeps_one_family_each() -> None:
    merged = render_metrics(merge_metrics({"0": _worker_text(5, 0.002, 3),
                                           "1": _worker_text(8, 0.2, 4, extra=True)})).decode()
    types = [line for line in merged.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), "a family exposed twice"
    assert "# TYPE fleetgate_requests_total counter" in merged
    assert "# TYPE fleetgate_decision_seconds histogram" in merged
    s = _samples(merged)
    allow = {w: s[("fleetgate_requests_total", (("decision", "allow"), ("worker", w)))]
             for w in ("0", "1")}
    assert allow == {"0": 5.0, "1": 8.0}
    assert s[("fleetgate_live_flows", (("worker", "0"),))] == 3.0
    assert s[("fleetgate_live_flows", (("worker", "1"),))] == 4.0
    assert s[("fleetgate_decision_seconds_count", (("worker", "1"),))] == 1.0
    # the fast decision is in worker 0's 5 ms bucket, the slow one is not in worker 1's
    assert s[("fleetgate_decision_seconds_bucket", (("le", "0.005"), ("worker", "0")))] == 1.0
    assert s[("fleetgate_decision_seconds_bucket", (("le", "0.005"), ("worker", "1")))] == 0.0
    assert s[("fleetgate_only_here", (("worker", "1"),))] == 7.0
    assert not any(name == "fleetgate_only_here" and ("worker", "0") in labels
                   for name, labels in s)
    assert not any("worker" not in dict(labels) for _, labels in s), "a sample without worker"


def test_merge_of_nothing_is_empty() -> None:
    assert merge_metrics({}) == []


# -- the supervisor's answers with no worker running ------------------------------------------

def test_supervisor_is_unready_and_says_which_worker_when_none_runs() -> None:
    sup = Supervisor([["true"], ["true"]], "")
    status, _, body = sup.answer("/healthz/ready")
    assert status == 503
    d = json.loads(body)
    assert d["ready"] is False and d["not_ready"] == [0, 1]
    assert d["workers"][1]["reason"] == "not running"
    status, _, body = sup.answer("/metrics")
    s = _samples(body.decode())
    assert s[("fleetgate_workers", ())] == 2.0
    assert s[("fleetgate_worker_up", (("worker", "0"),))] == 0.0
    assert s[("fleetgate_worker_restarts_total", (("worker", "1"),))] == 0.0
    assert sup.answer("/healthz/live")[0] == 200
    assert sup.answer("/nope")[0] == 404
    assert sup.answer("/workers/1/usage")[0] == 503
