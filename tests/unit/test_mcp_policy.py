"""mcpAuthorization semantics: the seed's rules verbatim, argument-aware denies, capability
lists, deny by default, and list filtering without arguments (groundwork)."""

from __future__ import annotations

import pytest

from fleetgate.mcp.policy import compile_mcp_rules, glob_to_cel, may_call, may_list

SEED_SECURITY = ('jwt.agent_role == "security" && (\n  mcp.tool.name.startsWith("nmap") ||\n'
                 '  mcp.tool.name.startsWith("trivy") ||\n  mcp.tool.name.startsWith("falco")\n)')
SEED_CLOUD = ('jwt.agent_role == "cloud" && (\n  mcp.tool.name.startsWith("terraform") ||\n'
              '  mcp.tool.name.startsWith("kubectl") ||\n  mcp.tool.name.startsWith("istioctl") ||\n'
              '  mcp.tool.name.startsWith("helm")\n)')
NO_AGENT_INFRA = {"id": "cloud.not-agent-infra",
                  "deny": 'mcp.tool.name.startsWith("kubectl") && '
                          'mcp.tool.arguments.namespace == "agent-infra"',
                  "reason": "agent-infra hosts the gateway"}

RULES = compile_mcp_rules("backend", [SEED_SECURITY, SEED_CLOUD, NO_AGENT_INFRA])


def act(role: str, tool: str, args: dict | None = None, listing: bool = False) -> dict:
    return {"jwt": {"sub": "a", "agent_role": role}, "request": {},
            "mcp": {"method": "tools/list" if listing else "tools/call", "listing": listing,
                    "tool": {"name": tool, "arguments": args or {}},
                    "prompt": {"name": "", "arguments": {}}, "resource": {"uri": ""},
                    "server": {"host": "mcp.example.com", "path": "/mcp"}, "session_id": ""}}


@pytest.mark.parametrize(("role", "tool", "allowed"), [
    ("security", "nmap_scan", True), ("security", "trivy_image", True),
    ("security", "falco_rules", True), ("security", "terraform_apply", False),
    ("cloud", "terraform_plan", True), ("cloud", "nmap_scan", False),
    ("general", "nmap_scan", False),
])
def test_seed_rules_work_verbatim_and_deny_by_default(role: str, tool: str,
                                                      allowed: bool) -> None:
    assert may_call(RULES, act(role, tool)).allow is allowed
    assert may_list(RULES, act(role, tool, listing=True)) is allowed


def test_argument_rule_blocks_kubectl_in_agent_infra_only() -> None:
    denied = may_call(RULES, act("cloud", "kubectl_apply", {"namespace": "agent-infra"}))
    assert (denied.allow, denied.rule) == (False, "cloud.not-agent-infra")
    assert may_call(RULES, act("cloud", "kubectl_apply", {"namespace": "apps"})).allow
    # a call without the argument cannot be judged by the deny: refused, not guessed
    assert not may_call(RULES, act("cloud", "kubectl_apply", {})).allow
    # but the tool stays visible in tools/list, where no arguments exist yet
    assert may_list(RULES, act("cloud", "kubectl_apply", listing=True))


def test_capability_lists_compile_to_the_same_rules() -> None:
    rules = compile_mcp_rules("general", [], allowed_tools=["ssh_*", "git_status"],
                              denied_tools=["ssh_root*"], match='jwt.agent_role == "general"')
    assert may_call(rules, act("general", "ssh_exec")).allow
    assert may_call(rules, act("general", "git_status")).allow
    assert not may_call(rules, act("general", "git_push")).allow
    assert may_call(rules, act("general", "ssh_root_shell")).rule == "general.denied_tools[0]"
    assert not may_call(rules, act("security", "ssh_exec")).allow  # scoped to the profile


@pytest.mark.parametrize(("pattern", "cel"), [
    ("nmap*", 'mcp.tool.name.startsWith("nmap")'),
    ("git_status", 'mcp.tool.name == "git_status"'),
    ("k*_apply", 'mcp.tool.name.matches("^k.*_apply$")'),
])
def test_glob_to_cel(pattern: str, cel: str) -> None:
    assert glob_to_cel(pattern) == cel


@pytest.mark.parametrize("entry", [42, {"allow": "x", "deny": "y"}, {"allow": "mcp.nope("},
                                   {"allow": "true", "when": "x"}])
def test_bad_entries_are_errors(entry: object) -> None:
    with pytest.raises(ValueError):
        compile_mcp_rules("b", [entry])
