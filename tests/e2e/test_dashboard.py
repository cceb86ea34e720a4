"""The shipped Grafana dashboard against what a running gateway really exports.

A panel whose query names a series the gateway does not export (a renamed metric, a counter
without ``_total``, a histogram queried without ``_bucket``) or groups by a label that series
does not carry draws "No data" forever, and nobody notices until the incident it was made
for. So a real mitmdump serves some traffic (allowed, denied, unauthenticated, LLM calls with
and without streaming), and every query of ``deploy/grafana/fleetgate-dashboard.json`` (panel
targets and templating) must select only series on its ``/metrics`` page and name only labels
those series carry. The label names come from ``fleetgate.metrics.GatewayMetrics`` (complete
even for series with no sample yet), checked here against the labels on the live samples.
The reader of the queries is ``deploy_check.check_dashboard``, which ``make deploy-check``
also runs offline; its cases are in ``tests/unit/test_dashboard_promql.py``.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import deploy_check as dc  # scripts/ (pytest pythonpath)
import httpx
import pytest
from conftest import GatewayFactory
from llm_upstream import install, llm_rules_extra
from prometheus_client.parser import text_string_to_metric_families

from harness import Gateway, Upstream, token, write_rules

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(dc.DASHBOARD.read_text())
    return data


@pytest.fixture
def busy_gateway(make_gateway: GatewayFactory, tmp_path: Path, upstream: Upstream) -> Gateway:
    """A gateway that has judged plain requests (allowed and denied), refused a forged
    token, and metered two LLM calls (one streamed), so that its main
    families have samples whose labels can be compared with the code's."""
    install(upstream)
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(REPO / "rules" / "pricing.yaml", rules / "pricing.yaml")
    write_rules(rules / "fleet.yaml", [upstream.port], top=llm_rules_extra(upstream.port))
    gw = make_gateway(rules)
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}
    with gw.client(token("dash-agent")) as c:
        assert c.get(upstream.url + "/ok").status_code == 200
        assert c.get(upstream.url + "/delete").status_code == 403
        assert c.post(upstream.url + "/v1/chat/completions", json=chat).status_code == 200
        with c.stream("POST", upstream.url + "/v1/chat/completions",
                      json={**chat, "stream": True}) as r:
            assert r.status_code == 200
            r.read()
    # a forged token: refused at CONNECT (407), counted as an identity failure
    with gw.client("not-a-jwt") as c, pytest.raises(httpx.ProxyError, match="407"):
        c.get(upstream.url + "/ok")
    gw.wait_for_decision(lambda d: d["agent"] == "dash-agent" and d.get("llm", {}).get("outcome") == "ok"
                         and d["path"] == "/v1/chat/completions", timeout=10)
    return gw


def live_series(gw: Gateway) -> tuple[str, dict[str, frozenset[str] | None]]:
    """The /metrics page, and every series it declares with its label names from the code
    (None for a series the code does not define, whose labels are then not checked)."""
    text = gw.metrics()
    code = dc.gateway_series()
    return text, {name: code.get(name) for name in dc.exposition_series(text)}


def test_every_dashboard_query_uses_what_the_gateway_exports(busy_gateway: Gateway) -> None:
    text, series = live_series(busy_gateway)
    code = dc.gateway_series()
    # the code's collectors are what the gateway serves: the label source below is the right one
    assert set(code) <= set(series), sorted(set(code) - set(series))
    sampled: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sampled.setdefault(sample.name, set()).update(sample.labels)
    for name, labels in sampled.items():
        if name in code:
            assert labels <= code[name], f"{name} is served with labels {sorted(labels - code[name])} " \
                                         "that fleetgate.metrics does not declare"
    # the traffic reached the families the main panels draw
    for name in ("fleetgate_requests_total", "fleetgate_identity_failures_total",
                 "fleetgate_gen_ai_client_token_usage_total", "fleetgate_gen_ai_cost_usd_total",
                 "gen_ai_client_operation_duration_seconds_bucket",
                 "gen_ai_server_time_to_first_token_seconds_bucket", "fleetgate_decision_seconds_bucket"):
        assert name in sampled, f"no {name} sample after the traffic"
    assert {"agent", "role", "decision", "rule"} <= sampled["fleetgate_requests_total"]

    dash = dashboard()
    queries = dc.dashboard_queries(dash)
    used = set().union(*(dc.promql_refs(q, grafana=t).metrics for _, q, t in queries))
    # every family the brief's panels are about is on the dashboard
    for name in ("fleetgate_requests_total", "fleetgate_gen_ai_cost_usd_total",
                 "fleetgate_budget_remaining_usd", "fleetgate_budget_remaining_tokens",
                 "fleetgate_ratelimit_rejections_total", "fleetgate_kill_actions_in_force",
                 "fleetgate_kill_cut_seconds_bucket", "fleetgate_delegations_total",
                 "fleetgate_mcp_list_entries_hidden_total", "fleetgate_mcp_tools_pending_approval",
                 "gen_ai_server_time_to_first_token_seconds_bucket", "fleetgate_policy_last_reload_ok",
                 "fleetgate_policy_revision_info", "fleetgate_audit_log_ok", "fleetgate_state_ok",
                 "fleetgate_upstream_failures_total"):
        assert name in used, f"the dashboard has no panel on {name}"
    assert dc.check_dashboard(dash, series) == []


def test_the_check_catches_a_wrong_name_and_a_wrong_label(busy_gateway: Gateway) -> None:
    """The same check on mutated copies of the dashboard: it must be able to fail."""
    _, series = live_series(busy_gateway)
    dash = copy.deepcopy(dashboard())
    targets = [t for p in dc.dashboard_panels(dash) for t in p.get("targets") or []]
    ttft = next(t for t in targets if "gen_ai_server_time_to_first_token_seconds_bucket" in t["expr"])
    # the OpenTelemetry name with fleetgate's prefix: a plausible slip the gateway never exports
    ttft["expr"] = ttft["expr"].replace("gen_ai_server_time_to_first_token_seconds_bucket",
                                        "fleetgate_gen_ai_server_time_to_first_token_seconds_bucket")
    by_agent = next(t for t in targets if "sum by (agent) (rate(fleetgate_gen_ai_cost_usd_total" in t["expr"])
    by_agent["expr"] = by_agent["expr"].replace("sum by (agent)", "sum by (agent_id)")
    problems = dc.check_dashboard(dash, series)
    assert any("fleetgate_gen_ai_server_time_to_first_token_seconds_bucket is not exported" in p
               for p in problems), problems
    assert any("label 'agent_id' (sum by())" in p for p in problems), problems
    assert len(problems) == 2, problems


def test_component_ships_the_dashboard_as_a_sidecar_configmap() -> None:
    """Every overlay that uses components/grafana-dashboard renders one ConfigMap that the
    Grafana sidecar picks up (label grafana_dashboard: "1"), under a fixed name (an edit
    updates it in place), holding the dashboard file byte for byte."""
    component = dc.DASHBOARD_COMPONENT
    assert (component / "kustomization.yaml").is_file()
    builds, components = dc.kustomization_dirs()
    assert component in components
    users = [d for d in builds if component.resolve() in dc.components_used(d)]
    assert users, "no overlay uses components/grafana-dashboard, so nothing renders it"
    text = dc.DASHBOARD.read_text()
    for d in users:
        try:
            docs = dc.render(d)
        except dc.CheckError as e:
            pytest.fail(str(e))
        maps = dc.dashboard_configmaps(docs)
        assert len(maps) == 1, f"{dc.rel(d)}: {len(maps)} sidecar ConfigMaps"
        assert maps[0]["metadata"]["name"] == "fleetgate-grafana-dashboard"
        assert maps[0]["data"] == {dc.DASHBOARD.name: text}


def test_dashboard_without_a_gateway_is_well_formed() -> None:
    """Valid JSON, unique panel ids, small enough for `kubectl apply` (its last-applied
    annotation is limited to 256 KiB)."""
    raw = dc.DASHBOARD.read_bytes()
    assert len(raw) < dc.DASHBOARD_MAX_BYTES
    dash = json.loads(raw)
    ids = [p["id"] for p in dc.dashboard_panels(dash)]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    assert dash["schemaVersion"] >= 39 and dash["uid"]
    assert httpx.URL(f"http://x/d/{dash['uid']}").path == f"/d/{dash['uid']}"  # url-safe uid
