"""Which destination addresses are internal, and which hosts an egress list admits.

An agent that can make the gateway dial 169.254.169.254 or a pod IP has escaped its leash,
so every address the gateway is about to dial is classified here, after DNS resolution.
IPv4 addresses embedded in IPv6 (mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``,
6to4, Teredo) are judged by the IPv4 address they carry.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["HostPattern", "internal_reason", "parse_networks"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def _embedded_v4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    return None


def internal_reason(addr: IPAddress) -> str | None:
    """Why ``addr`` is not a public internet address, or ``None`` if it is."""
    if isinstance(addr, ipaddress.IPv6Address):
        v4 = _embedded_v4(addr)
        if v4 is not None:
            inner = internal_reason(v4)
            return f"{inner} (embedded in {addr})" if inner else None
    if addr.is_loopback:
        return "loopback address"
    if addr.is_link_local:
        return "link-local address (cloud metadata lives here)"
    if addr.is_unspecified:
        return "unspecified address"
    if addr.is_multicast:
        return "multicast address"
    if isinstance(addr, ipaddress.IPv4Address) and addr in _CGNAT:
        return "carrier-grade NAT address"
    if addr.is_private:
        return "private address"
    if addr.is_reserved:
        return "reserved address"
    return None


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Parse CIDRs or single addresses; raises ``ValueError`` naming the bad entry."""
    out: list[IPNetwork] = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(str(v).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address or CIDR") from None
    return tuple(out)


class HostPattern:
    """One egress allow-list entry: ``api.openai.com``, ``*.example.com``, ``*``, or
    any of these with ``:port``.

    ``*.example.com`` matches subdomains only, never ``example.com`` itself nor
    ``example.com.evil.net``; matching is on the normalised host (lower case, no trailing
    dot), so spelling cannot evade it.
    """

    __slots__ = ("host", "port", "source", "wildcard")

    def __init__(self, source: str) -> None:
        from fleetgate.policy.normalize import normalize_host

        text = str(source).strip()
        if not text:
            raise ValueError("empty host pattern")
        host, port = text, None
        if text.startswith("["):
            end = text.find("]")
            if end < 0:
                raise ValueError(f"{source!r}: unbalanced '['")
            host, rest = text[1 : end], text[end + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"{source!r}: expected ':port' after ']'")
                port = rest[1:]
        elif text.count(":") == 1:
            host, port = text.split(":")
        self.port: int | None = None
        if port is not None:
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{source!r}: port must be 1-65535")
            self.port = int(port)
        self.source = text
        self.wildcard = host == "*" or host.startswith("*.")
        if "*" in host[2 if host.startswith("*.") else 1 :] or (
            "*" in host and not self.wildcard
        ):
            raise ValueError(f"{source!r}: '*' is only allowed as '*' or a leading '*.'")
        self.host = "*" if host == "*" else (
            "*." + normalize_host(host[2:]) if host.startswith("*.") else normalize_host(host)
        )

    def matches(self, host: str, port: int) -> bool:
        """``host`` must already be normalised."""
        if self.port is not None and port != self.port:
            return False
        if self.host == "*":
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host

    def __repr__(self) -> str:
        return f"HostPattern({self.source!r})"
