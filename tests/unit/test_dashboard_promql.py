"""The PromQL reader behind the Grafana dashboard check (``scripts/deploy_check.py``).

The dashboard check is only as good as this reader: one that took ``rate`` or ``agent`` for a
series would fail every dashboard, and one that missed a series (inside ``topk``, after
``or``, in a subquery) would let a dead panel through. Each case below would catch a reader
that guesses by regular expression, and the label cases one that does not follow which
series a ``by (...)`` applies to.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import deploy_check as dc  # scripts/ (pytest pythonpath): the check make deploy-check runs
import pytest

SERIES = dc.gateway_series()


def labels_of(name: str) -> frozenset[str] | None:
    have = SERIES.get(name)
    return None if have is None else have | dc.SCRAPE_LABELS


@pytest.mark.parametrize(("expr", "metrics"), [
    # the brief's case: a function, an aggregation, a label in by() and one in a matcher
    ('sum by (agent) (rate(fleetgate_requests_total{decision="deny"}[5m]))',
     {"fleetgate_requests_total"}),
    # by() after the arguments, upper-case keywords (PromQL's are case-insensitive)
    ("SUM(rate(fleetgate_requests_total[5m])) BY (agent, role)", {"fleetgate_requests_total"}),
    # a histogram: the _bucket series, le in by(), the quantile a number
    ("histogram_quantile(0.95, sum by (le, gen_ai_request_model) "
     "(rate(gen_ai_server_time_to_first_token_seconds_bucket[$__rate_interval])))",
     {"gen_ai_server_time_to_first_token_seconds_bucket"}),
    # both sides of a binary operator, vector matching keywords and their label lists
    ("sum by (agent) (rate(a_total[5m])) / on (agent) group_left (role) sum by (agent, role) (b)",
     {"a_total", "b"}),
    ("x > bool 0 and on () y unless ignoring (job) z or w", {"x", "y", "z", "w"}),
    # parameters of aggregations are numbers or strings, not series
    ('topk(10, x) + bottomk(3, y) + quantile(0.9, z) + count_values("value", w)', {"x", "y", "z", "w"}),
    # offset, @, subqueries, durations with several units, number forms
    ("max_over_time(rate(x[5m])[1h30m:1m]) offset 1d + y @ end() + 1e3 * 0x1f - Inf + NaN",
     {"x", "y"}),
    # names that merely start like keywords or functions are series
    ("offset_seconds + bool_total + rate_limit + by_agent", {"offset_seconds", "bool_total",
                                                            "rate_limit", "by_agent"}),
    # recording-rule names (colons), and a label named like a function
    ("sum by (rate, sum) (job:fleetgate_requests:rate5m)", {"job:fleetgate_requests:rate5m"}),
    # strings hold label values, never series, even when they look like PromQL
    ('x{rule="rate(y[5m])", agent!~"fleetgate_requests_total"}', {"x"}),
    ('label_replace(x, "dst", "$1", "fleetgate_requests_total", "(.*)")', {"x"}),
    # the name in braces; a selector by labels only selects no named series
    ('{__name__="fleetgate_policy_loaded", job="gw"} + {job="gw"}', {"fleetgate_policy_loaded"}),
    # functions without series
    ("vector(1) + time() + scalar(x)", {"x"}),
    # a comment is not a series
    ("x # y_total", {"x"}),
    # Grafana variables in ranges and strings
    ('increase(x{agent=~"$agent", role=~"${role:regex}"}[$__range])', {"x"}),
])
def test_extracts_exactly_the_series(expr: str, metrics: set[str]) -> None:
    assert dc.promql_metrics(expr) == metrics


def test_collects_grafana_variables_but_not_regex_groups() -> None:
    refs = dc.promql_refs('label_replace(rate(x{agent=~"$agent", role=~"${role}"}[$__rate_interval]), '
                          '"a", "$1", "b", "(.*)") offset $__range')
    assert refs.variables == {"agent", "role", "__rate_interval", "__range"}


@pytest.mark.parametrize("expr", [
    "rate(",                    # unbalanced
    "rat(x[5m])",               # not a function: a typo would be a dead panel
    "sum by agent (x)",         # by needs a list
    "x{agent=1}",               # label values are strings
    "x{agent}",                 # a matcher needs an operator
    "sum(x, y)",                # sum takes one argument
    "x +",                      # a dangling operator
    "label_values(x, agent)",   # Grafana's, not PromQL: only in templating queries
])
def test_refuses_what_is_not_promql(expr: str) -> None:
    with pytest.raises(dc.PromQLError):
        dc.promql_refs(expr)


def test_reads_grafana_label_values_in_templating_queries() -> None:
    refs = dc.promql_refs('label_values(fleetgate_requests_total{role=~"$role"}, agent)', labels_of,
                          grafana=True)
    assert refs.metrics == {"fleetgate_requests_total"} and refs.variables == {"role"}
    assert refs.problems == []
    assert dc.promql_refs("label_values(agent)", grafana=True).metrics == set()
    bad = dc.promql_refs("label_values(fleetgate_mcp_messages_total, role)", labels_of, grafana=True)
    assert bad.problems and "'role'" in bad.problems[0]


@pytest.mark.parametrize(("expr", "label"), [
    # a matcher on a label the series does not have (MCP messages carry no role)
    ('fleetgate_mcp_messages_total{role="x"}', "role"),
    # by() over a label of a different series
    ("sum by (model) (rate(fleetgate_gen_ai_cost_usd_total[5m]))", "model"),
    # by() outside an aggregation that already dropped the label
    ("sum by (agent) (sum by (role) (fleetgate_requests_total))", "agent"),
    # histogram_quantile without le: the buckets were summed away
    ("histogram_quantile(0.9, sum(rate(fleetgate_decision_seconds_bucket[5m])))", "le"),
    # le on a counter, which has no buckets
    ("sum by (le) (rate(fleetgate_requests_total[5m]))", "le"),
    # on() with a label one side lacks
    ("fleetgate_requests_total / on (server) fleetgate_gen_ai_calls_total", "server"),
    # without() keeps the rest: rule is gone after it
    ("sum by (rule) (sum without (rule) (fleetgate_requests_total))", "rule"),
])
def test_reports_labels_the_series_does_not_carry(expr: str, label: str) -> None:
    problems = dc.promql_refs(expr, labels_of).problems
    assert problems and all(f"label {label!r}" in p for p in problems), problems


@pytest.mark.parametrize("expr", [
    'sum by (agent, role) (rate(fleetgate_requests_total{decision="deny"}[5m]))',
    "sum by (instance) (fleetgate_policy_loaded)",   # scrape labels are on every series
    "histogram_quantile(0.5, sum by (le) (rate(gen_ai_client_operation_duration_seconds_bucket[5m])))",
    "topk(5, sum by (agent) (fleetgate_requests_total)) / on (agent) "
    "sum by (agent) (fleetgate_gen_ai_calls_total)",
    "sum without (rule, decision) (fleetgate_requests_total) / ignoring (role) "
    "sum by (agent) (fleetgate_requests_total)",
    'sum by (x) (label_replace(fleetgate_requests_total, "x", "$1", "agent", "(.*)"))',
    "sum by (agent) (absent(nothing_total))",        # absent: labels unknown, nothing to check
])
def test_accepts_labels_the_series_carry(expr: str) -> None:
    assert dc.promql_refs(expr, labels_of).problems == []


def test_series_forms_follow_the_text_exposition() -> None:
    got = dc.series_by_family([("c", "counter", ["a"]), ("h", "histogram", []), ("g", "gauge", ["b"])])
    assert got == {"c_total": {"a"}, "c_created": {"a"}, "h_bucket": {"le"}, "h_sum": set(),
                   "h_count": set(), "h_created": set(), "g": {"b"}}
    text = ("# HELP x_total X.\n# TYPE x_total counter\n# HELP d_seconds D.\n"
            "# TYPE d_seconds histogram\nd_seconds_bucket{le=\"+Inf\"} 0.0\n# TYPE up gauge\nup 1\n")
    assert dc.exposition_series(text) == {"x_total", "x_created", "d_seconds_bucket", "d_seconds_sum",
                                          "d_seconds_count", "d_seconds_created", "up"}


def test_gateway_series_come_from_the_gateways_collectors() -> None:
    assert SERIES["fleetgate_requests_total"] == {"agent", "role", "decision", "rule"}
    assert "le" in SERIES["gen_ai_server_time_to_first_token_seconds_bucket"]
    assert "fleetgate_requests" not in SERIES and "fleetgate_policy_loaded" in SERIES


# -- check_dashboard on the shipped dashboard and on broken copies ----------------------------------


def shipped() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(dc.DASHBOARD.read_text())
    return data


def first_target(dash: dict[str, Any], metric: str) -> dict[str, Any]:
    for p in dc.dashboard_panels(dash):
        for t in p.get("targets") or []:
            if metric in t["expr"]:
                target: dict[str, Any] = t
                return target
    raise AssertionError(f"no target uses {metric}")


def test_shipped_dashboard_uses_only_the_gateways_metrics() -> None:
    assert dc.check_dashboard(shipped(), SERIES) == []


def test_check_reports_a_series_nobody_exports() -> None:
    dash = copy.deepcopy(shipped())
    t = first_target(dash, "fleetgate_requests_total")
    t["expr"] = t["expr"].replace("fleetgate_requests_total", "fleetgate_request_total", 1)
    problems = dc.check_dashboard(dash, SERIES)
    assert any("fleetgate_request_total is not exported" in p for p in problems), problems


def test_check_reports_shape_problems() -> None:
    dash = copy.deepcopy(shipped())
    panels = dc.dashboard_panels(dash)
    panels[2]["id"] = panels[1]["id"]
    first_target(dash, "fleetgate_gen_ai_cost_usd_total")["datasource"] = {"type": "prometheus",
                                                                           "uid": "P1809F7CD0C75ACF3"}
    t = first_target(dash, "fleetgate_mcp_messages_total")
    t["expr"] = t["expr"].replace("$agent", "$agnet")
    dash["templating"]["list"] = [v for v in dash["templating"]["list"] if v["name"] != "role"]
    problems = "\n".join(dc.check_dashboard(dash, SERIES))
    assert f"panel id {panels[1]['id']} is used by 2 panels" in problems
    assert "'P1809F7CD0C75ACF3', not ${datasource}" in problems
    assert "$agnet is not a variable" in problems
    assert "no `role` variable" in problems and "$role is not a variable" in problems
