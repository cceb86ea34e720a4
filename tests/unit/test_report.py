"""fleetgate.policy.report: one reporter for every rules parser, problems located by file,
line and key path; and every domain parser has the same shape."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import textwrap

import yaml

import fleetgate.policy
from fleetgate.policy.parse_limits import parse_rate_limit
from fleetgate.policy.report import Ids, LineMap, Problem, Reporter, as_list, check_keys, str_list

DOC = textwrap.dedent("""\
    agents:
    - name: a
      egress:
        hosts:
        - x.example.com
        - y.example.com
    policies:
      localRateLimit:
      - maxTokens: 0
        tokensPerFill: 1
        fillInterval: 1m
    """)


def reporter(text: str = DOC, file: str = "/rules/fleet.yaml") -> Reporter:
    return Reporter(file, LineMap(yaml.compose(text)))


def test_line_map_finds_keys_items_and_falls_back_to_the_nearest_ancestor() -> None:
    lines = LineMap(yaml.compose(DOC))
    assert lines.at("agents") == 1
    assert lines.at("agents[0]") == 2
    assert lines.at("agents[0].egress.hosts[1]") == 6
    assert lines.at("policies.localRateLimit[0].fillInterval") == 11
    assert lines.at("agents[0].egress.hosts[1].nothing.here") == 6
    assert lines.at("nowhere") == 1


def test_line_map_records_duplicate_keys() -> None:
    lines = LineMap(yaml.compose("a: 1\nb:\n  c: 1\n  c: 2\n"))
    assert lines.duplicates == [("b.c", 4)]


def test_errors_are_located_in_the_current_document() -> None:
    report = reporter()
    report.error("agents[0].egress.hosts[1]", "bad host")
    report.document("/rules/other.yaml", LineMap(yaml.compose("x: 1\ny: 2\n")))
    report.error("y", "bad y")
    report.error_at("/rules/third.yaml", None, "", "cannot read")
    assert report.problems == [
        Problem("/rules/fleet.yaml", 6, "agents[0].egress.hosts[1]", "bad host"),
        Problem("/rules/other.yaml", 2, "y", "bad y"),
        Problem("/rules/third.yaml", None, "", "cannot read"),
    ]
    assert [str(p) for p in report.problems] == [
        "/rules/fleet.yaml:6 at agents[0].egress.hosts[1]: bad host",
        "/rules/other.yaml:2 at y: bad y",
        "/rules/third.yaml: cannot read",
    ]


def test_warnings_do_not_count_as_problems() -> None:
    report = reporter()
    report.warn("policies", "not enforced")
    assert report.problems == []
    assert report.warnings == [Problem("/rules/fleet.yaml", 7, "policies", "not enforced")]


def test_source_is_file_name_and_line() -> None:
    report = reporter()
    assert report.source("agents[0]") == "fleet.yaml:2"
    assert Reporter("/rules/x.yaml").source("anything") == "x.yaml"


def test_check_keys_reports_unknown_and_misplaced_keys() -> None:
    report = Reporter("r.yaml")
    check_keys({"rules": [], "rulez": 1, "localRateLimit": []}, "authorization", {"rules"}, report)
    assert [(p.path, p.message) for p in report.problems] == [
        ("authorization.rulez",
         "unknown key 'rulez'; expected one of ['rules']; did you mean 'rules'?"),
        ("authorization.localRateLimit",
         "localRateLimit goes under 'policies:' (policies: {localRateLimit: [...]})"),
    ]


def test_list_helpers() -> None:
    report = Reporter("r.yaml")
    assert as_list(None, "a", report) == []
    assert as_list("x", "b", report) == []
    assert str_list([" x ", 7, "", True, None], "c", report) == ["x", "7"]
    assert [(p.path, p.message) for p in report.problems] == [
        ("b", "must be a list"), ("c[2]", "must be a non-empty string"),
        ("c[3]", "must be a non-empty string"), ("c[4]", "must be a non-empty string"),
    ]


def test_ids_remember_where_each_was_first_declared() -> None:
    ids = Ids()
    assert ids.claim("r1", "a.yaml:3") is None
    assert ids.claim("r1", "b.yaml:9") == "a.yaml:3"
    assert "r1" in ids and "r2" not in ids
    assert ids.first == {"r1": "a.yaml:3"}


def test_a_domain_parser_reports_through_the_reporter_with_the_yaml_line() -> None:
    report = reporter()
    node = yaml.safe_load(DOC)["policies"]["localRateLimit"][0]
    limit = parse_rate_limit(node, "policies.localRateLimit[0]", report,
                             default_id="fleet.localRateLimit[0]", ids=Ids())
    assert limit is None
    assert [str(p) for p in report.problems] == [
        "/rules/fleet.yaml:9 at policies.localRateLimit[0].maxTokens: "
        "maxTokens must be a positive integer"]


def test_every_domain_parser_has_the_same_shape() -> None:
    parsers = []
    for info in pkgutil.iter_modules(fleetgate.policy.__path__):
        if not info.name.startswith("parse_"):
            continue
        module = importlib.import_module(f"fleetgate.policy.{info.name}")
        for name in module.__all__:
            fn = getattr(module, name)
            if name.startswith("parse_") and inspect.isfunction(fn):
                parsers.append(fn)
                params = list(inspect.signature(fn).parameters.values())
                assert [p.name for p in params[:3]] == ["node", "where", "report"], name
                assert all(p.kind is p.KEYWORD_ONLY for p in params[3:]), name
    assert len(parsers) >= 15
