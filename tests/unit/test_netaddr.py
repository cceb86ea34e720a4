"""Egress host patterns and the internal-address classifier."""

from __future__ import annotations

import ipaddress

import pytest

from fleetgate.netaddr import HostPattern, internal_reason, parse_networks

# -- HostPattern ---------------------------------------------------------------------------


def test_exact_host_matches_only_itself() -> None:
    p = HostPattern("api.openai.com")
    assert p.matches("api.openai.com", 443)
    assert p.matches("api.openai.com", 80)  # no port in the pattern: any port
    assert not p.matches("openai.com", 443)
    assert not p.matches("x.api.openai.com", 443)
    assert not p.matches("api.openai.com.evil.com", 443)
    assert not p.matches("evilapi.openai.com", 443)


def test_exact_pattern_is_normalised() -> None:
    p = HostPattern("API.OpenAI.com.")
    assert p.host == "api.openai.com"
    assert p.matches("api.openai.com", 443)


def test_allowed_com_does_not_match_allowed_com_evil_com() -> None:
    p = HostPattern("allowed.com")
    assert p.matches("allowed.com", 443)
    assert not p.matches("allowed.com.evil.com", 443)
    assert not p.matches("notallowed.com", 443)
    assert not p.matches("allowed.co", 443)


def test_wildcard_matches_subdomains_only() -> None:
    p = HostPattern("*.example.com")
    assert p.wildcard
    assert p.matches("a.example.com", 443)
    assert p.matches("a.b.example.com", 443)
    assert not p.matches("example.com", 443)  # not the apex
    assert not p.matches("example.com.evil.com", 443)
    assert not p.matches("a.example.com.evil.com", 443)
    assert not p.matches("evilexample.com", 443)  # suffix, but not at a label boundary


def test_wildcard_pattern_is_normalised() -> None:
    p = HostPattern("*.Example.COM.")
    assert p.host == "*.example.com"
    assert p.matches("s3.example.com", 443)


def test_star_matches_everything() -> None:
    p = HostPattern("*")
    assert p.wildcard
    for host in ("example.com", "10.0.0.1", "::1", "x.y.z"):
        assert p.matches(host, 443)


def test_port_restricts_the_match() -> None:
    p = HostPattern("kubernetes.example.com:6443")
    assert p.port == 6443
    assert p.host == "kubernetes.example.com"
    assert p.matches("kubernetes.example.com", 6443)
    assert not p.matches("kubernetes.example.com", 443)
    assert not p.matches("other.example.com", 6443)


def test_wildcard_with_port() -> None:
    p = HostPattern("*.svc.cluster.local:9200")
    assert p.matches("es.data.svc.cluster.local", 9200)
    assert not p.matches("es.data.svc.cluster.local", 9300)
    assert not p.matches("svc.cluster.local", 9200)


def test_star_with_port() -> None:
    p = HostPattern("*:443")
    assert p.matches("anything.example", 443)
    assert not p.matches("anything.example", 80)


def test_ipv6_patterns() -> None:
    bracketed = HostPattern("[::1]:8080")
    assert bracketed.host == "::1"
    assert bracketed.port == 8080
    assert bracketed.matches("::1", 8080)
    assert not bracketed.matches("::1", 8081)
    bare = HostPattern("[2001:DB8::1]")
    assert bare.port is None
    assert bare.matches("2001:db8::1", 443)
    unbracketed = HostPattern("2001:db8::1")
    assert unbracketed.port is None
    assert unbracketed.matches("2001:db8::1", 443)


def test_repr_names_the_source() -> None:
    assert repr(HostPattern("a.example.com:443")) == "HostPattern('a.example.com:443')"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "*example.com",
        "foo.*.com",
        "*.*.example.com",
        "api.*",
        "ex*ample.com",
        "**",
        "example.com:0",
        "example.com:65536",
        "example.com:http",
        "example.com:",
        "example.com:-1",
        "[::1",
        "[::1]8080",
        "[::1]:",
        "[::1]:abc",
    ],
)
def test_invalid_patterns_raise_value_error(bad: str) -> None:
    with pytest.raises(ValueError):
        HostPattern(bad)


# -- internal_reason -----------------------------------------------------------------------


def _reason(text: str) -> str | None:
    return internal_reason(ipaddress.ip_address(text))


@pytest.mark.parametrize(
    ("addr", "fragment"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("10.0.0.1", "private"),
        ("10.255.255.255", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("169.254.0.1", "link-local"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("100.127.255.254", "carrier-grade NAT"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("ff02::1", "multicast"),
    ],
)
def test_internal_addresses(addr: str, fragment: str) -> None:
    reason = _reason(addr)
    assert reason is not None
    assert fragment in reason


@pytest.mark.parametrize(
    "addr",
    [
        "::ffff:169.254.169.254",  # IPv4-mapped
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b::169.254.169.254",
        "2002:a9fe:a9fe::1",  # 6to4 carrying 169.254.169.254
    ],
)
def test_metadata_address_embedded_in_ipv6_is_internal(addr: str) -> None:
    reason = _reason(addr)
    assert reason is not None
    assert "link-local" in reason
    assert "embedded in" in reason


@pytest.mark.parametrize("addr", ["::ffff:127.0.0.1", "64:ff9b::7f00:1"])
def test_loopback_embedded_in_ipv6_is_internal(addr: str) -> None:
    reason = _reason(addr)
    assert reason is not None
    assert "loopback" in reason


def test_private_embedded_in_ipv6_is_internal() -> None:
    reason = _reason("::ffff:10.1.2.3")
    assert reason is not None
    assert "private" in reason


@pytest.mark.parametrize(
    "addr",
    ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700::", "2606:4700:4700::1111",
     "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808"],
)
def test_public_addresses(addr: str) -> None:
    assert _reason(addr) is None


def test_cgnat_boundaries() -> None:
    assert _reason("100.63.255.255") is None
    assert _reason("100.128.0.0") is None
    assert _reason("100.64.0.0") is not None


def test_172_boundaries() -> None:
    assert _reason("172.15.255.255") is None
    assert _reason("172.32.0.0") is None


# -- parse_networks ------------------------------------------------------------------------


def test_parse_networks_accepts_cidrs_and_single_addresses() -> None:
    nets = parse_networks(["10.96.0.0/12", " 192.168.1.5 ", "fd00::/8", "10.0.0.1/8"])
    assert [str(n) for n in nets] == ["10.96.0.0/12", "192.168.1.5/32", "fd00::/8", "10.0.0.0/8"]


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "not-an-ip", "10.0.0", "", "fd00::/129"])
def test_parse_networks_rejects_garbage(bad: str) -> None:
    with pytest.raises(ValueError, match="not an IP address or CIDR"):
        parse_networks(["10.0.0.0/8", bad])
