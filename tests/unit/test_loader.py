"""Loading rules: all or nothing, every problem located by file and line."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from fleetgate.policy.loader import (
    API_VERSION,
    PolicyError,
    Problem,
    fingerprint,
    iter_problems,
    load_policy,
    policy_files,
)
from fleetgate.rule import Effect

HEADER = "apiVersion: fleetgate/v1\nkind: Policy\n"


def write(directory: Path, name: str, body: str, header: bool = True) -> Path:
    path = directory / name
    path.write_text((HEADER if header else "") + textwrap.dedent(body), encoding="utf-8")
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.problems, "a PolicyError must list its problems"
    lines = [str(p) for p in info.value.problems]
    assert str(info.value) == "; ".join(lines)
    assert list(iter_problems(info.value)) == lines
    return lines


def one_problem(path: Path) -> str:
    lines = problems_of(path)
    assert len(lines) == 1, lines
    return lines[0]


SEED = """\
authorization:
  rules:
  - deny: 'request.path.contains("delete")'
"""

AGENT = """\
agents:
- name: coder
  match: 'jwt.agent_role == "coder"'
  egress:
    hosts: [api.anthropic.com, "*.example.com", "k8s.example.com:6443"]
  authorization:
    rules:
    - id: coder.llm
      allow: 'request.method == "POST"'
    - require: 'request.method != "DELETE"'
      reason: no deletes
      hosts: [k8s.example.com]
"""


# -- valid policies ------------------------------------------------------------------------


def test_seed_snippet_loads_verbatim(tmp_path: Path) -> None:
    # exactly the seed article's text: no apiVersion header besides ours, nothing added
    path = write(tmp_path, "seed.yaml", SEED)
    policy = load_policy(path)
    assert len(policy.rules) == 1
    rule = policy.rules[0]
    assert rule.effect is Effect.DENY
    assert rule.expr.source == 'request.path.contains("delete")'
    assert rule.id == "seed.authorization[0]"
    assert rule.source == "seed.yaml:5"
    assert rule.hosts == ()
    assert policy.agents == ()
    assert policy.files == (str(path),)


def test_directory_with_two_files_merges(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", SEED)
    write(tmp_path, "b.yml", AGENT + "revoked:\n  agents: [bad-agent]\n  tokens: [jti-1]\n"
          "destinations:\n  allowPrivate: [10.96.0.0/12, 'fd00::1']\n")
    policy = load_policy(tmp_path)
    assert policy.files == (str(tmp_path / "a.yaml"), str(tmp_path / "b.yml"))
    assert [r.id for r in policy.rules] == ["a.authorization[0]"]
    assert [a.name for a in policy.agents] == ["coder"]
    coder = policy.agents[0]
    assert [h.source for h in coder.egress] == ["api.anthropic.com", "*.example.com",
                                                "k8s.example.com:6443"]
    assert [r.id for r in coder.rules] == ["coder.llm", "coder.authorization[1]"]
    assert [r.effect for r in coder.rules] == [Effect.ALLOW, Effect.REQUIRE]
    assert coder.rules[1].reason == "no deletes"
    assert [h.source for h in coder.rules[1].hosts] == ["k8s.example.com"]
    assert coder.rules[0].source == "b.yml:10"
    assert coder.source == "b.yml:4"
    assert policy.revoked.agents == frozenset({"bad-agent"})
    assert policy.revoked.tokens == frozenset({"jti-1"})
    assert [str(n) for n in policy.allow_private] == ["10.96.0.0/12", "fd00::1/128"]


def test_bare_string_rule_is_an_allow(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", "authorization:\n  rules:\n  - 'jwt.sub == \"a\"'\n")
    (rule,) = load_policy(path).rules
    assert rule.effect is Effect.ALLOW
    assert rule.id == "p.authorization[0]"


def test_several_documents_in_one_file(tmp_path: Path) -> None:
    path = tmp_path / "multi.yaml"
    path.write_text(HEADER + SEED + "---\n" + HEADER + AGENT + "---\n")
    policy = load_policy(path)
    assert len(policy.rules) == 1
    assert len(policy.agents) == 1


def test_comment_only_file_is_fine(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", SEED)
    (tmp_path / "empty.yaml").write_text("# nothing here yet\n")
    assert len(load_policy(tmp_path).rules) == 1


def test_example_rules_directory_loads() -> None:
    rules = Path(__file__).resolve().parents[2] / "rules"
    policy = load_policy(rules)
    names = {a.name for a in policy.agents}
    assert {"coordinator", "security", "network", "cloud", "general", "user-agent"} <= names
    assert [r.id for r in policy.rules] == [
        "fleet.authorization[0]", "fleet.authorization[1]", "fleet.authorization[2]",
        # the general agents' KILLSWITCH.md FORBIDDEN hosts, methods and paths
        *(f"killswitch.general.forbidden[{i}]" for i in range(4, 8))]
    assert {t.id for t in policy.kill_triggers} >= {"runaway-loop", "spend-spike",
                                                    "general.identical_requests"}
    assert policy.delegation.roles["coordinator"] == {"security", "network", "cloud", "general"}
    # cases/ is a subdirectory: never read as rules
    assert all("/cases/" not in f for f in policy.files)


# -- file selection ------------------------------------------------------------------------


def test_policy_files_skips_hidden_other_suffixes_and_subdirectories(tmp_path: Path) -> None:
    write(tmp_path, "b.yaml", SEED)
    write(tmp_path, "a.yml", SEED)
    write(tmp_path, ".hidden.yaml", "this: is: not: yaml")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "README.md").write_text("x")
    sub = tmp_path / "cases"
    sub.mkdir()
    (sub / "c.yaml").write_text("- not a policy\n")
    (tmp_path / "dir.yaml").mkdir()
    assert [p.name for p in policy_files(tmp_path)] == ["a.yml", "b.yaml"]


def test_single_file_path(tmp_path: Path) -> None:
    f = write(tmp_path, "only.yaml", SEED)
    assert policy_files(f) == [f]


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    msg = one_problem(tmp_path)
    assert "no .yaml/.yml files" in msg


def test_directory_with_only_hidden_files_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, ".x.yaml", SEED)
    assert "no .yaml/.yml files" in one_problem(tmp_path)


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    assert "does not exist" in one_problem(tmp_path / "nope")


# -- errors, each with file:line -----------------------------------------------------------


def test_bad_yaml(tmp_path: Path) -> None:
    f = write(tmp_path, "bad.yaml", "metadata: {name: x}\nagents: [a, b}\nrevoked: {}\n")
    msg = one_problem(f)
    assert "invalid YAML" in msg
    assert "bad.yaml:4" in msg


def test_bad_yaml_indentation_line(tmp_path: Path) -> None:
    f = write(tmp_path, "bad.yaml", "metadata:\n  name: x\n   oops: y\n")
    msg = one_problem(f)
    assert "invalid YAML" in msg
    assert "bad.yaml:5" in msg


def test_bad_yaml_file_does_not_hide_other_files_problems(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "agents: [\n", header=False)
    write(tmp_path, "b.yaml", "unknownTop: 1\n")
    lines = problems_of(tmp_path)
    assert any("a.yaml:" in m and "invalid YAML" in m for m in lines)
    assert any("b.yaml:3" in m and "unknownTop" in m for m in lines)


def test_wrong_api_version(tmp_path: Path) -> None:
    f = tmp_path / "v.yaml"
    f.write_text("# comment\nkind: Policy\napiVersion: fleetgate/v0\n")
    msg = one_problem(f)
    assert "v.yaml:3" in msg
    assert API_VERSION in msg
    assert "fleetgate/v0" in msg


def test_missing_api_version(tmp_path: Path) -> None:
    f = tmp_path / "v.yaml"
    f.write_text("kind: Policy\n" + SEED)
    msg = one_problem(f)
    assert "v.yaml:1" in msg
    assert "apiVersion" in msg


def test_wrong_kind(tmp_path: Path) -> None:
    f = tmp_path / "k.yaml"
    f.write_text("apiVersion: fleetgate/v1\nkind: Deployment\n")
    msg = one_problem(f)
    assert "k.yaml:2" in msg
    assert "kind" in msg


def test_document_that_is_not_a_mapping(tmp_path: Path) -> None:
    f = tmp_path / "l.yaml"
    f.write_text("- a\n- b\n")
    msg = one_problem(f)
    assert "l.yaml:1" in msg
    assert "mapping" in msg


@pytest.mark.parametrize(
    ("body", "line", "key"),
    [
        ("metdata: {name: x}\n", 3, "metdata"),
        ("authorization:\n  rule: [{deny: 'true'}]\n", 4, "rule"),
        ("authorization:\n  rules:\n  - deny: 'true'\n    reasn: typo\n", 6, "reasn"),
        ("agents:\n- name: a\n  match: 'true'\n  egres: {hosts: [a.com]}\n", 6, "egres"),
        ("agents:\n- name: a\n  match: 'true'\n  egress: {host: [a.com]}\n", 6, "host"),
        ("revoked:\n  agent: [x]\n", 4, "agent"),
        ("destinations:\n  allowprivate: [10.0.0.0/8]\n", 4, "allowprivate"),
    ],
)
def test_unknown_keys_are_errors(tmp_path: Path, body: str, line: int, key: str) -> None:
    msg = one_problem(write(tmp_path, "u.yaml", body))
    assert f"u.yaml:{line}" in msg
    assert f"unknown key {key!r}" in msg


def test_misspelt_effect_is_not_silently_dropped(tmp_path: Path) -> None:
    f = write(tmp_path, "u.yaml", "authorization:\n  rules:\n  - dney: 'true'\n")
    lines = problems_of(f)
    assert any("u.yaml:5" in m and "'dney'" in m for m in lines)
    assert any("exactly one of" in m for m in lines)


def test_rule_with_two_effects(tmp_path: Path) -> None:
    f = write(tmp_path, "t.yaml", "authorization:\n  rules:\n  - deny: 'true'\n    allow: 'true'\n")
    msg = one_problem(f)
    assert "t.yaml:5" in msg
    assert "exactly one of" in msg


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    f = write(tmp_path, "d.yaml", """\
        authorization:
          rules:
          - deny: 'request.path.contains("delete")'
        authorization:
          rules: []
        """)
    msg = one_problem(f)
    assert "d.yaml:6" in msg
    assert "duplicate key" in msg
    assert "authorization" in msg


def test_duplicate_nested_yaml_key(tmp_path: Path) -> None:
    f = write(tmp_path, "d.yaml", """\
        agents:
        - name: a
          match: 'jwt.agent_role == "a"'
          match: 'true'
          egress: {hosts: [a.com]}
        """)
    msg = one_problem(f)
    assert "d.yaml:6" in msg
    assert "agents[0].match" in msg
    assert "duplicate key" in msg


def test_cel_syntax_error(tmp_path: Path) -> None:
    f = write(tmp_path, "c.yaml", """\
        authorization:
          rules:
          - deny: 'request.path.contains("delete")'
          - deny: 'request.path.contains("x"'
        """)
    msg = one_problem(f)
    assert "c.yaml:6" in msg
    assert "authorization.rules[1].deny" in msg
    assert "CEL" in msg


def test_unknown_cel_function(tmp_path: Path) -> None:
    f = write(tmp_path, "c.yaml", """\
        agents:
        - name: a
          match: 'jwt.agent_role == "a"'
          egress: {hosts: [a.com]}
          authorization:
            rules:
            - id: a.x
              allow: 'request.path.lowercase() == "/"'
        """)
    msg = one_problem(f)
    assert "c.yaml:10" in msg
    assert "unknown function lowercase" in msg


def test_unknown_variable_in_rule(tmp_path: Path) -> None:
    f = write(tmp_path, "c.yaml", "authorization:\n  rules:\n  - deny: 'requests.path == \"/\"'\n")
    msg = one_problem(f)
    assert "c.yaml:5" in msg
    assert "unknown variable requests" in msg


def test_match_only_sees_jwt(tmp_path: Path) -> None:
    f = write(tmp_path, "m.yaml", """\
        agents:
        - name: a
          egress: {hosts: [a.com]}
          match: 'request.method == "GET"'
        """)
    msg = one_problem(f)
    assert "m.yaml:6" in msg
    assert "agents[0].match" in msg
    assert "unknown variable request" in msg


def test_missing_match_is_an_error(tmp_path: Path) -> None:
    f = write(tmp_path, "m.yaml", "agents:\n- name: a\n  egress: {hosts: [a.com]}\n")
    msg = one_problem(f)
    assert "m.yaml:" in msg
    assert "agents[0].match" in msg


def test_agent_without_name(tmp_path: Path) -> None:
    f = write(tmp_path, "n.yaml", "agents:\n- match: 'true'\n")
    msg = one_problem(f)
    assert "n.yaml:4" in msg
    assert "name" in msg


def test_duplicate_agent_names_across_files(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", AGENT)
    write(tmp_path, "b.yaml", """\
        agents:
        - name: other
          match: 'true'
          egress: {hosts: [a.com]}
        - name: coder
          match: 'true'
          egress: {hosts: [a.com]}
        """)
    msg = one_problem(tmp_path)
    assert "b.yaml:7" in msg
    assert "duplicate agent name 'coder'" in msg
    assert "a.yaml:4" in msg  # where the first one is


def test_duplicate_rule_ids(tmp_path: Path) -> None:
    f = write(tmp_path, "r.yaml", """\
        authorization:
          rules:
          - id: no-delete
            deny: 'request.path.contains("delete")'
          - id: no-delete
            deny: 'request.path.contains("drop")'
        """)
    msg = one_problem(f)
    assert "r.yaml:7" in msg
    assert "duplicate rule id 'no-delete'" in msg
    assert "r.yaml:5" in msg


def test_explicit_id_colliding_with_a_default_id_across_files(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", SEED)
    write(tmp_path, "b.yaml", "authorization:\n  rules:\n  - id: a.authorization[0]\n"
          "    deny: 'true'\n")
    msg = one_problem(tmp_path)
    assert "b.yaml:5" in msg
    assert "duplicate rule id" in msg


@pytest.mark.parametrize(
    ("body", "line", "what"),
    [
        ("localRateLimit: {tokens: 10}\n", 3, "goes under 'policies:'"),
        ("agents:\n- name: a\n  match: 'true'\n  egress: {hosts: [a.com]}\n"
         "  localRateLimit: {tokens: 1}\n", 7, "goes under 'policies:'"),
    ],
)
def test_not_yet_supported_keys_are_refused(tmp_path: Path, body: str, line: int,
                                            what: str) -> None:
    msg = one_problem(write(tmp_path, "n.yaml", body))
    assert f"n.yaml:{line}" in msg
    assert what in msg


def test_refused_key_with_a_block_value_points_at_the_key_line(tmp_path: Path) -> None:
    # The operator's editor should land on the offending key, not on the line below it.
    f = write(tmp_path, "n.yaml", """\
        metadata: {name: x}
        localRateLimit:
          tokens: 10
        """)
    msg = one_problem(f)
    assert "goes under 'policies:'" in msg
    assert "n.yaml:4" in msg, msg


def test_unknown_key_with_a_block_value_points_at_the_key_line(tmp_path: Path) -> None:
    f = write(tmp_path, "u.yaml", """\
        authorization:
          rule:
          - deny: 'true'
        """)
    msg = one_problem(f)
    assert "unknown key 'rule'" in msg
    assert "u.yaml:4" in msg, msg


@pytest.mark.parametrize("pattern", ["*bad.com", "a.*.com", "a.com:99999", "[::1"])
def test_bad_egress_host_pattern(tmp_path: Path, pattern: str) -> None:
    f = write(tmp_path, "h.yaml", f"""\
        agents:
        - name: a
          match: 'true'
          egress:
            hosts:
            - ok.example.com
            - "{pattern}"
        """)
    msg = one_problem(f)
    assert "h.yaml:9" in msg
    assert "agents[0].egress.hosts[1]" in msg


def test_bad_rule_host_pattern(tmp_path: Path) -> None:
    f = write(tmp_path, "h.yaml", """\
        authorization:
          rules:
          - deny: 'true'
            hosts: ["ok.com", "x.*"]
        """)
    msg = one_problem(f)
    assert "h.yaml:6" in msg
    assert "authorization.rules[0].hosts[1]" in msg


def test_empty_host_entry(tmp_path: Path) -> None:
    f = write(tmp_path, "h.yaml", "agents:\n- name: a\n  match: 'true'\n  egress:\n"
              "    hosts:\n    - ''\n")
    msg = one_problem(f)
    assert "h.yaml:8" in msg
    assert "non-empty string" in msg


def test_bad_cidr_in_allow_private(tmp_path: Path) -> None:
    f = write(tmp_path, "p.yaml", """\
        destinations:
          allowPrivate:
          - 10.96.0.0/12
          - 10.0.0.0/33
          - banana
        """)
    lines = problems_of(f)
    assert len(lines) == 2
    assert "p.yaml:6" in lines[0]
    assert "10.0.0.0/33" in lines[0]
    assert "p.yaml:7" in lines[1]
    assert "banana" in lines[1]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "authorization:\n  rules:\n  - deny: 'oops('\n")
    write(tmp_path, "b.yaml", "destinations:\n  allowPrivate: [nope]\nbogus: 1\n")
    lines = problems_of(tmp_path)
    assert len(lines) == 3
    assert any("a.yaml:5" in m for m in lines)
    assert any("b.yaml:4" in m for m in lines)
    assert any("b.yaml:5" in m for m in lines)


def test_problem_str_without_line_or_path() -> None:
    assert str(Problem("f.yaml", None, "", "boom")) == "f.yaml: boom"
    assert str(Problem("f.yaml", 3, "a.b", "boom")) == "f.yaml:3 at a.b: boom"


# -- revision and reload -------------------------------------------------------------------


def test_revision_is_stable_and_changes_with_content(tmp_path: Path) -> None:
    f = write(tmp_path, "a.yaml", SEED)
    r1 = load_policy(tmp_path).revision
    assert load_policy(tmp_path).revision == r1
    assert len(r1) == 12
    f.write_text(f.read_text().replace("delete", "destroy"))
    r2 = load_policy(tmp_path).revision
    assert r2 != r1
    f.write_text(f.read_text().replace("destroy", "delete"))
    assert load_policy(tmp_path).revision == r1


def test_revision_changes_when_a_file_is_added(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", SEED)
    r1 = load_policy(tmp_path).revision
    write(tmp_path, "b.yaml", AGENT)
    assert load_policy(tmp_path).revision != r1


def test_fingerprint_changes_when_a_file_changes(tmp_path: Path) -> None:
    f = write(tmp_path, "a.yaml", SEED)
    before = fingerprint(tmp_path)
    assert fingerprint(tmp_path) == before
    f.write_text(f.read_text() + "# more\n")
    assert fingerprint(tmp_path) != before


def test_fingerprint_of_missing_path_is_empty(tmp_path: Path) -> None:
    assert fingerprint(tmp_path / "gone") == ()


def _configmap_version(root: Path, name: str, rule: str) -> Path:
    version = root / name
    version.mkdir()
    (version / "fleet.yaml").write_text(
        HEADER + f"authorization:\n  rules:\n  - deny: '{rule}'\n")
    return version


def test_configmap_layout_loads_and_swaps(tmp_path: Path) -> None:
    root = tmp_path / "rules"
    root.mkdir()
    _configmap_version(root, "..2024_01", 'request.path.contains("delete")')
    os.symlink("..2024_01", root / "..data")
    os.symlink("..data/fleet.yaml", root / "fleet.yaml")

    assert [p.name for p in policy_files(root)] == ["fleet.yaml"]
    first = load_policy(root)
    assert [r.expr.source for r in first.rules] == ['request.path.contains("delete")']
    assert first.files == (str(root / "fleet.yaml"),)
    assert [r.id for r in first.rules] == ["fleet.authorization[0]"]
    fp1 = fingerprint(root)
    assert fingerprint(root) == fp1

    # kubelet's atomic update: new hidden dir, new symlink renamed over ..data
    _configmap_version(root, "..2024_02", 'request.path.contains("drop")')
    os.symlink("..2024_02", root / "..data_tmp")
    os.replace(root / "..data_tmp", root / "..data")

    fp2 = fingerprint(root)
    assert fp2 != fp1
    second = load_policy(root)
    assert [r.expr.source for r in second.rules] == ['request.path.contains("drop")']
    assert second.revision != first.revision


def test_configmap_swap_detected_even_with_identical_content(tmp_path: Path) -> None:
    root = tmp_path / "rules"
    root.mkdir()
    _configmap_version(root, "..v1", "true")
    os.symlink("..v1", root / "..data")
    os.symlink("..data/fleet.yaml", root / "fleet.yaml")
    fp1 = fingerprint(root)
    rev1 = load_policy(root).revision
    _configmap_version(root, "..v2", "true")
    os.symlink("..v2", root / "..tmp")
    os.replace(root / "..tmp", root / "..data")
    assert fingerprint(root) != fp1
    assert load_policy(root).revision == rev1  # same content, same revision


# -- MCP --------------------------------------------------------------------------------

SEED_MCP = """\
# Security agent backend (seed 000, verbatim)
mcpAuthorization:
  rules:
  - >-
    jwt.agent_role == "security" && (
      mcp.tool.name.startsWith("nmap") ||
      mcp.tool.name.startsWith("trivy") ||
      mcp.tool.name.startsWith("falco")
    )
"""


def test_seed_mcp_authorization_loads_verbatim(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, "backend.yaml", SEED_MCP))
    [rule] = policy.mcp.rules
    assert rule.id == "backend.mcpAuthorization[0]"
    assert rule.effect is Effect.ALLOW
    assert rule.source == "backend.yaml:6"
    assert policy.mcp.reveal_denied is False and policy.mcp.detect is True


def test_mcp_servers_profiles_and_capability_lists(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, "p.yaml", """\
        mcp:
          revealDenied: true
          servers:
          - name: cloud-tools
            hosts: [mcp-cloud.example.com]
            path: /mcp
            poisoning: report
            mcpAuthorization:
              rules:
              - id: no-agent-infra
                deny: 'mcp.tool.arguments.namespace == "agent-infra"'
                reason: agent-infra hosts the gateway
        agents:
        - name: marketing
          match: 'jwt.agent_role == "marketing"'
          egress: {hosts: [mcp.example.com]}
          allowed_tools: [write_blog_post, "read_*"]
          denied_tools: [execute_code]
          mcpAuthorization:
            rules:
            - 'mcp.method == "prompts/get"'
        """))
    [server] = policy.mcp.servers
    assert (server.name, server.path, server.poisoning.value, server.pins.value) == (
        "cloud-tools", "/mcp", "report", "enforce")
    assert [r.id for r in server.rules] == ["no-agent-infra"]
    assert server.matches("mcp-cloud.example.com", 443, "/mcp")
    assert server.matches("mcp-cloud.example.com", 443, "/mcp/messages?session_id=1")
    assert not server.matches("mcp-cloud.example.com", 443, "/mcpx")
    assert not server.matches("other.example.com", 443, "/mcp")
    assert policy.mcp.server_for("mcp-cloud.example.com", 443, "/mcp") is server
    assert policy.mcp.reveal_denied is True
    [profile] = policy.agents
    assert [(r.id, r.effect.value) for r in profile.mcp_rules] == [
        ("marketing.mcpAuthorization[0]", "allow"),
        ("marketing.allowed_tools[0]", "allow"), ("marketing.allowed_tools[1]", "allow"),
        ("marketing.denied_tools[0]", "deny")]
    assert profile.mcp_rules[2].expr.source == 'mcp.tool.name.startsWith("read_")'


@pytest.mark.parametrize(
    ("body", "line", "what"),
    [
        ("mcpAuthorization:\n  rules:\n  - 'mcp.tool.nam == 1 +'\n", 5, "CEL"),
        ("mcpAuthorization:\n  rules:\n  - 'llm.model == \"x\"'\n", 5, "unknown variable llm"),
        ("mcpAuthorization:\n  rules:\n  - require: 'true'\n", 5, "'allow' or 'deny'"),
        ("mcpAuthorization:\n  rules:\n  - {deny: 'true', hosts: [a]}\n", 5, "unknown key"),
        ("mcp:\n  servers:\n  - name: s\n    hosts: []\n", 6, "at least one host"),
        ("mcp:\n  servers:\n  - name: s\n    hosts: [a.com]\n    poisoning: block\n", 7,
         "enforce, report, off"),
        ("mcp:\n  servers:\n  - name: s\n    hosts: [a.com]\n    path: mcp\n", 7, "path prefix"),
        ("mcp:\n  revealDenied: yes please\n", 4, "true or false"),
        ("mcp:\n  server: []\n", 4, "unknown key 'server'"),
        ("agents:\n- name: a\n  match: 'true'\n  egress: {hosts: [a.com]}\n"
         "  allowed_tools: ['']\n", 7, "non-empty string"),
        ("agents:\n- name: a\n  match: 'true'\n  egress: {hosts: [a.com]}\n"
         "  allowed_tool: [x]\n", 7, "unknown key 'allowed_tool'"),
        ("mcpAuthorization:\n  rules:\n  - {id: dup, allow: 'true'}\n  - {id: dup, allow: 'true'}\n",
         6, "duplicate rule id"),
    ],
)
def test_bad_mcp_rules_are_located(tmp_path: Path, body: str, line: int, what: str) -> None:
    [problem] = problems_of(write(tmp_path, "p.yaml", body))
    assert f"p.yaml:{line}" in problem
    assert what in problem


# -- rate limits ------------------------------------------------------------------------

SEED_LIMITS = """\
agents:
- name: security
  match: 'jwt.agent_role == "security"'
  egress: {hosts: [api.anthropic.com]}
  # Security agent route, seed 000 verbatim
  policies:
    localRateLimit:
      - maxTokens: 50000
        tokensPerFill: 50000
        fillInterval: 1m
        type: tokens
      - maxTokens: 20
        tokensPerFill: 20
        fillInterval: 1m
        type: requests
policies:
  localRateLimit:
  - id: tool-calls
    maxTokens: 5
    tokensPerFill: 1
    fillInterval: 10s
    key: 'jwt.agent_role + "/" + mcp.tool.name'
    when: 'mcp.method == "tools/call"'
"""


def test_seed_rate_limits_load_verbatim(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, "p.yaml", SEED_LIMITS))
    [profile] = policy.agents
    tokens, requests = profile.limits
    assert (tokens.id, tokens.spec.max_tokens, tokens.spec.fill_interval, tokens.spec.kind.value) == (
        "security.localRateLimit[0]", 50000, 60.0, "tokens")
    assert (requests.spec.max_tokens, requests.spec.kind.value, requests.key) == (20, "requests", None)
    [tool] = policy.limits
    assert tool.id == "tool-calls" and tool.spec.fill_interval == 10.0
    assert tool.key is not None and tool.when is not None


@pytest.mark.parametrize(("body", "what"), [
    ("policies:\n  localRateLimit:\n  - {maxTokens: 0, tokensPerFill: 1, fillInterval: 1m}\n",
     "positive integer"),
    ("policies:\n  localRateLimit:\n  - {maxTokens: 1, tokensPerFill: 1, fillInterval: soon}\n",
     "duration"),
    ("policies:\n  localRateLimit:\n  - {maxTokens: 1, tokensPerFill: 1, fillInterval: 1m, "
     "type: dollars}\n", "'requests' or 'tokens'"),
    ("policies:\n  localRateLimit:\n  - {maxTokens: 1, tokensPerFill: 1, fillInterval: 1m, "
     "when: 'x.y'}\n", "unknown variable x"),
    ("policies:\n  localRateLimit:\n  - {maxTokens: 1, tokensPerFill: 1, fillInterval: 1m, "
     "burst: 3}\n", "unknown key 'burst'"),
])
def test_bad_rate_limits_are_refused(tmp_path: Path, body: str, what: str) -> None:
    [problem] = problems_of(write(tmp_path, "p.yaml", body))
    assert what in problem and "p.yaml:" in problem


def test_kustomization_next_to_the_rules_is_not_rules(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", SEED)
    (tmp_path / "kustomization.yaml").write_text("apiVersion: kustomize.config.k8s.io/v1beta1\n")
    assert [p.name for p in policy_files(tmp_path)] == ["a.yaml"]


def test_every_rules_file_is_in_the_configmap() -> None:
    """rules/kustomization.yaml must list every file the gateway reads from rules/."""
    rules = Path(__file__).resolve().parents[2] / "rules"
    import yaml
    listed = set(yaml.safe_load((rules / "kustomization.yaml").read_text())
                 ["configMapGenerator"][0]["files"])
    wanted = {p.name for p in policy_files(rules)} | {p.name for p in rules.glob("*.md")}
    assert listed == wanted


def test_editing_a_killswitch_document_changes_the_fingerprint(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", SEED)
    doc = tmp_path / "KILLSWITCH.x.md"
    doc.write_text("one")
    before = fingerprint(tmp_path)
    doc.write_text("two, longer")
    assert fingerprint(tmp_path) != before


def test_a_killswitch_document_edit_changes_the_revision(tmp_path: Path) -> None:
    """A hot edit of KILLSWITCH.md alone must produce a new policy, not be ignored."""
    doc = tmp_path / "KILLSWITCH.x.md"
    doc.write_text("---\nagent: x\n---\n## TRIGGERS\n- requests > 60/minute\n")
    write(tmp_path, "a.yaml", SEED + "killswitch:\n  files: [KILLSWITCH.x.md]\n")
    before = load_policy(tmp_path)
    doc.write_text("---\nagent: x\n---\n## TRIGGERS\n- requests > 10/minute\n")
    after = load_policy(tmp_path)
    assert after.revision != before.revision
    assert [t.above for t in after.kill_triggers] == [10]
