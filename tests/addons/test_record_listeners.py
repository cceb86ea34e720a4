"""A decision-record listener (traces, the recent-sessions store) that raises loses neither the
decision nor the other listeners' records: it is counted in fleetgate_observer_errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chain import basic, request_flow, respond, run_request, running_chain, tok
from test_chain import RULES

from fleetgate.addons.decisions import DecisionLog


def test_a_raising_listener_is_counted_and_the_others_still_get_the_record(tmp_path: Path) -> None:
    with running_chain(tmp_path, RULES) as (_, addons):
        log = next(a for a in addons if isinstance(a, DecisionLog))
        got: list[dict[str, Any]] = []

        def broken(rec: dict[str, Any], flow: Any) -> None:
            raise RuntimeError("observer bug")

        log.listeners[:0] = [broken]
        log.listeners.append(lambda rec, flow: got.append(rec))
        flow = request_flow(auth=basic(tok()))
        run_request(addons, flow)
        assert flow.response is None  # allowed: forwarded
        respond(addons, flow, b"{}", {"Content-Type": "application/json"})
        assert flow.response.status_code == 200
        assert [r["result"] for r in got] == ["allow"]
        errors = log.metrics.observer_errors.labels(
            observer=broken.__qualname__)._value.get()
        assert errors == 1
