"""Wildcard egress never reaches an internal address that only allowPrivate admits.

``allowPrivate`` says which internal addresses exist for agents at all; only an explicit
egress entry (a host name, an IP or a CIDR) lets a profile reach one. ``*`` and ``*.domain``
mean "hosts on the internet".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleetgate.netaddr import HostPattern
from fleetgate.normalize import request_facts
from fleetgate.policy.decide import decide, private_destination_reason
from fleetgate.policy.loader import load_policy
from fleetgate.policy.model import Policy

POLICY = """\
apiVersion: fleetgate/v1
destinations:
  allowPrivate: ["127.0.0.1/32", "10.96.0.0/12"]
agents:
- name: wide
  match: 'jwt.agent_role in ["wide", "both"]'
  egress: {hosts: ["*"]}
  authorization: {rules: [{id: wide.all, allow: 'true'}]}
- name: cluster
  match: 'jwt.agent_role == "cluster"'
  egress: {hosts: ["*.svc.cluster.local", "*.svc.cluster.local:9200"]}
  authorization: {rules: [{id: cluster.all, allow: 'true'}]}
- name: es
  match: 'jwt.agent_role in ["es", "both"]'
  egress:
    hosts: ["*", "es.data.svc.cluster.local:9200", "10.96.0.10", "127.0.0.1:8080",
            "10.100.0.0/16:9200", "[fd00::/8]"]
  authorization: {rules: [{id: es.all, allow: 'true'}]}
"""


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    d = tmp_path_factory.mktemp("egress-private")
    (d / "p.yaml").write_text(POLICY)
    return load_policy(d)


def ask(policy: Policy, role: str, host: str, port: int = 443) -> Any:
    facts = request_facts("GET", "https", host, port, "/", [])
    return decide(policy, {"sub": f"a-{role}", "agent_role": role}, facts)


@pytest.mark.parametrize(("host", "port"), [
    ("127.0.0.1", 8080), ("127.0.0.1", 443), ("10.96.0.10", 443), ("10.100.3.4", 9200),
    ("127.1", 8080), ("0x7f.0.0.1", 8080), ("2130706433", 8080), ("[127.0.0.1]", 8080),
])
def test_star_never_reaches_an_address_only_allow_private_admits(
        policy: Policy, host: str, port: int) -> None:
    d = ask(policy, "wide", host, port)
    assert (d.allow, d.rule) == (False, "egress.private"), d
    assert "wildcard" in d.reason and "wide" in d.reason


def test_star_still_reaches_public_hosts_and_addresses(policy: Policy) -> None:
    for host in ("api.example.com", "8.8.8.8", "2001:4860:4860::8888"):
        d = ask(policy, "wide", host)
        assert (d.allow, d.rule) == (True, "wide.all"), d
        assert d.named is False  # a name may still resolve inside: the dial is judged too


def test_star_does_not_widen_allow_private(policy: Policy) -> None:
    # outside allowPrivate: refused for everyone, explicit entry or not
    for role in ("wide", "es"):
        d = ask(policy, role, "10.0.0.7")
        assert (d.allow, d.rule) == (False, "destinations.private"), d
    d = ask(policy, "wide", "::ffff:127.0.0.1", 8080)  # IPv4-mapped form of a covered v4
    assert not d.allow and d.rule == "destinations.private"


def test_subdomain_wildcard_is_a_wildcard_too(policy: Policy) -> None:
    d = ask(policy, "cluster", "es.data.svc.cluster.local", 9200)
    assert d.allow and d.named is False  # a name: refused when it resolves inside


@pytest.mark.parametrize(("host", "port"), [
    ("127.0.0.1", 8080), ("10.96.0.10", 443), ("10.100.3.4", 9200),
    ("es.data.svc.cluster.local", 9200),
])
def test_explicit_entry_reaches_it(policy: Policy, host: str, port: int) -> None:
    d = ask(policy, "es", host, port)
    assert (d.allow, d.rule, d.named) == (True, "es.all", True), d


@pytest.mark.parametrize(("host", "port"), [
    ("127.0.0.1", 8081),  # the explicit entry has another port; '*' does not count
    ("10.96.0.11", 443),  # another address in allowPrivate
    ("10.100.3.4", 9300),  # the CIDR entry has a port
])
def test_explicit_entry_is_exact(policy: Policy, host: str, port: int) -> None:
    d = ask(policy, "es", host, port)
    assert (d.allow, d.rule) == (False, "egress.private"), d


def test_explicit_name_is_named_other_names_are_not(policy: Policy) -> None:
    assert ask(policy, "es", "es.data.svc.cluster.local", 9200).named is True
    assert ask(policy, "es", "es.data.svc.cluster.local", 9300).named is False
    assert ask(policy, "es", "localhost", 8080).named is False  # "127.0.0.1" names no name


def test_union_of_profiles_counts_any_explicit_entry(policy: Policy) -> None:
    d = ask(policy, "both", "127.0.0.1", 8080)
    assert d.allow and d.named and d.profiles == ("wide", "es")


@pytest.mark.parametrize("address", ["127.0.0.1", "10.96.0.10", "10.111.255.255"])
def test_dial_of_a_resolved_internal_address_needs_a_named_destination(
        policy: Policy, address: str) -> None:
    assert private_destination_reason(policy, address, named=True) is None
    why = private_destination_reason(policy, address, named=False)
    assert why is not None and address in why and "wildcard" in why


def test_public_and_uncovered_addresses_do_not_depend_on_named(policy: Policy) -> None:
    for named in (True, False):
        assert private_destination_reason(policy, "8.8.8.8", named=named) is None
        why = private_destination_reason(policy, "169.254.169.254", named=named)
        assert why is not None and "allowPrivate" in why


# -- HostPattern: CIDR entries and which entries are explicit ------------------------------


def test_cidr_pattern_matches_addresses_inside() -> None:
    p = HostPattern("10.96.0.0/12", cidr=True)
    assert not p.wildcard and p.network is not None
    assert p.matches("10.96.0.1", 443) and p.matches("10.111.255.255", 80)
    assert not p.matches("10.112.0.0", 443)
    assert not p.matches("example.com", 443)  # names never match a CIDR
    assert not p.matches("::ffff:10.96.0.1", 443)


def test_cidr_pattern_with_port_and_ipv6() -> None:
    p = HostPattern("10.96.0.0/12:9200", cidr=True)
    assert p.port == 9200 and p.matches("10.96.0.1", 9200) and not p.matches("10.96.0.1", 9300)
    v6 = HostPattern("[fd00::/8]:443", cidr=True)
    assert v6.matches("fd12::1", 443) and not v6.matches("fe80::1", 443)
    assert HostPattern("fd00::/8", cidr=True).matches("fd00::5", 1)
    assert HostPattern("10.1.2.3/8", cidr=True).host == "10.0.0.0/8"  # host bits are dropped


def test_cidr_only_where_asked_for() -> None:
    # KILLSWITCH.md hosts, credentials, providers turn patterns into text: no CIDR there
    with pytest.raises(ValueError, match="CIDR is not allowed"):
        HostPattern("10.0.0.0/8")


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "*.10.0.0.0/8", "example.com/24", "10.0.0.0/8:0"])
def test_bad_cidr_patterns_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        HostPattern(bad, cidr=True)


def test_loader_accepts_cidr_egress_and_refuses_a_bad_one(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY.replace('"[fd00::/8]"', '"10.0.0.0/40"'))
    with pytest.raises(Exception, match=r"egress\.hosts\[5\]"):
        load_policy(tmp_path)


def test_killswitch_forbidden_host_refuses_a_cidr(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY + "killswitch:\n  files: [K.md]\n")
    (tmp_path / "K.md").write_text("## FORBIDDEN\nhosts:\n  - '10.0.0.0/8'\n")
    with pytest.raises(Exception, match="CIDR is not allowed"):
        load_policy(tmp_path)
