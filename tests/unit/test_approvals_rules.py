"""The ``approvals:`` section of the rules, read through the loader: tiers in file order, and
every mistake refused with its file, line and key path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from fleetgate.policy.loader import PolicyError, load_policy
from fleetgate.policy.parse_approvals import MAX_HOLD

HEADER = "apiVersion: fleetgate/v1\nkind: Policy\n"

FIVE = """\
approvals:
- id: read-only
  approvers: 0
  when: request.method in ["GET", "HEAD"]
- id: internal-comms
  approvers: 0
  when: a2a.is_a2a
- id: external-comms
  approvedBy: [group:comms]
  escalateTo: [group:oncall]
  window: 24h
  hold: 60s
  reason: external communications go out only after a human read them
  when: mcp.method == "tools/call" && mcp.tool.name == "send_email"
- id: financial
  approvers: 1
  approvedBy: [group:finance, carol]
  window: 86400
  hold: 0
  when: request.host == "api.stripe.com"
- id: infrastructure
  approvers: 2
  approvedBy: [group:oncall]
  secondary: [group:security]
  escalateTo: [group:leads]
  window: 48h
  hold: 10m
  reason: infrastructure changes need a human and a secondary review
  when: jwt.agent_role == "ops" && request.method == "POST"
"""


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "approvals.yaml"
    path.write_text(HEADER + textwrap.dedent(body), encoding="utf-8")
    return path


def problems(tmp_path: Path, body: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy(write(tmp_path, body))
    return [str(p) for p in info.value.problems]


def test_five_tiers_load_in_file_order(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, FIVE))
    tiers = policy.approvals
    assert [t.id for t in tiers] == ["read-only", "internal-comms", "external-comms",
                                      "financial", "infrastructure"]
    ro, internal, ext, fin, infra = tiers
    assert (ro.approvers, internal.approvers) == (0, 0)
    assert ro.window == 86400.0 and ro.hold == 30.0  # defaults
    assert ext.approvers == 1  # default
    assert ext.approved_by == ("group:comms",) and ext.escalate_to == ("group:oncall",)
    assert (ext.window, ext.hold) == (86400.0, 60.0)
    assert ext.reason == "external communications go out only after a human read them"
    assert fin.approved_by == ("group:finance", "carol") and fin.hold == 0.0
    assert fin.secondary == () and fin.escalate_to == ()
    assert infra.approvers == 2 and infra.secondary == ("group:security",)
    assert infra.escalate_to == ("group:leads",)
    assert (infra.window, infra.hold) == (48 * 3600.0, 600.0)
    assert infra.source == "approvals.yaml:23"  # where people find the tier
    assert infra.when.evaluate({"jwt": {"agent_role": "ops"},
                                "request": {"method": "POST"}}) is True


def test_no_approvals_section_means_no_tiers(tmp_path: Path) -> None:
    assert load_policy(write(tmp_path, "authorization:\n  rules: []\n")).approvals == ()


BASE = "approvals:\n- id: t\n  when: 'true'\n"


@pytest.mark.parametrize(("body", "line", "path", "message"), [
    ("approvals:\n- when: 'true'\n", 4, "approvals[0].id", "every approval tier needs an id"),
    ("approvals:\n- id: ''\n  when: 'true'\n", 4, "approvals[0].id", "needs an id"),
    (BASE + "- id: t\n  when: 'false'\n", 6, "approvals[1].id",
     "duplicate approval tier id 't' (first at approvals.yaml:4)"),
    ("approvals:\n- id: t\n", 4, "approvals[0].when", "when must be a CEL expression"),
    ("approvals:\n- id: t\n  when: 'request.method =='\n", 5, "approvals[0].when", "CEL:"),
    ("approvals:\n- id: t\n  when: 'secrets.x == 1'\n", 5, "approvals[0].when", "CEL:"),
    (BASE + "  approvers: 3\n", 6, "approvals[0].approvers", "approvers must be 0"),
    (BASE + "  approvers: true\n", 6, "approvals[0].approvers", "approvers must be 0"),
    (BASE + "  approvers: '1'\n", 6, "approvals[0].approvers", "approvers must be 0"),
    (BASE + "  approvers: -1\n", 6, "approvals[0].approvers", "approvers must be 0"),
    (BASE + "  window: soon\n", 6, "approvals[0].window", "bad duration 'soon'"),
    (BASE + "  window: 0\n", 6, "approvals[0].window", "window must be positive"),
    (BASE + "  window: [1h]\n", 6, "approvals[0].window", "bad duration"),
    (BASE + "  hold: 601\n", 6, "approvals[0].hold", "hold must be between 0 and 600s"),
    (BASE + "  hold: 11m\n", 6, "approvals[0].hold", "hold must be between 0 and 600s"),
    (BASE + "  hold: -1\n", 6, "approvals[0].hold", "hold must be between 0 and 600s"),
    (BASE + "  secondary: [group:security]\n", 6, "approvals[0].secondary", "set approvers: 2"),
    (BASE + "  approvers: 1\n  secondary: [sam]\n", 7, "approvals[0].secondary",
     "set approvers: 2"),
    (BASE + "  escalate: [group:leads]\n", 6, "approvals[0].escalate", "unknown key 'escalate'"),
    (BASE + "  approvedBy: ['group:']\n", 6, "approvals[0].approvedBy[0]",
     "group: needs a group name"),
    (BASE + "  approvers: 2\n  secondary: [sam, 'group:']\n", 7, "approvals[0].secondary[1]",
     "group: needs a group name"),
    (BASE + "  escalateTo: ['group:']\n", 6, "approvals[0].escalateTo[0]",
     "group: needs a group name"),
    (BASE + "  reason: [a]\n", 6, "approvals[0].reason", "reason must be a string"),
    ("approvals:\n- just a string\n", 4, "approvals[0]", "an approval tier is a mapping"),
])
def test_a_bad_tier_is_refused_with_its_location(tmp_path: Path, body: str, line: int,
                                                  path: str, message: str) -> None:
    found = problems(tmp_path, body)
    assert len(found) == 1, found
    where = f"{tmp_path / 'approvals.yaml'}:{line} at {path}: "
    assert found[0].startswith(where), found[0]
    assert message in found[0][len(where):], found[0]


def test_the_longest_hold_is_allowed(tmp_path: Path) -> None:
    tier = load_policy(write(tmp_path, BASE + f"  hold: {int(MAX_HOLD)}\n")).approvals[0]
    assert tier.hold == MAX_HOLD == 600.0


def test_one_bad_tier_refuses_the_whole_policy_and_every_problem_is_listed(
        tmp_path: Path) -> None:
    body = FIVE + "- id: bad\n  approvers: 3\n  when: 'true'\n- id: worse\n  when: 'x =='\n"
    found = problems(tmp_path, body)
    assert [p.split(" at ")[1].split(":")[0] for p in found] == [
        "approvals[5].approvers", "approvals[6].when"]
