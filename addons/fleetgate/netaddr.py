"""Which destination addresses are internal, and which hosts an egress list admits.

An agent that can make the gateway dial 169.254.169.254 or a pod IP has escaped its leash,
so every address the gateway is about to dial is classified here, after DNS resolution.
IPv4 addresses embedded in IPv6 (mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``,
6to4, Teredo) are judged by the IPv4 address they carry.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["HostPattern", "internal_reason", "parse_networks", "parse_resolve_overrides"]

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


def _refuse_url(text: str) -> None:
    """A URL where a host belongs (``https://api.github.com/``) is refused with the host
    name to write instead, not with whatever the host parser trips on first (the ``:`` of
    the scheme read as a port separator)."""
    from urllib.parse import urlsplit

    if "://" in text:
        try:
            parts = urlsplit(text)
            host, port = parts.hostname, parts.port
        except ValueError:
            host, port = None, None
        if host:
            name = f"[{host}]" if ":" in host else host
            hint = f"{name}:{port}" if port else name
            raise ValueError(f"{text!r} is a URL: write the host name {hint!r} (a port as "
                             f"host:port; paths are matched by rules, not here)")
        raise ValueError(f"{text!r} is a URL: write the host name only (api.example.com)")
    head, sep, _ = text.partition("/")
    if sep and head and not head.startswith("[") and any(c.isalpha() for c in head) \
            and not all(c in "0123456789abcdefABCDEF:." for c in head):
        raise ValueError(f"{text!r} has a path: write the host name {head!r} (paths are "
                         "matched by rules, not here)")


class HostPattern:
    """One egress allow-list entry: ``api.openai.com``, ``*.example.com``, ``*``, an IP
    address, a CIDR (``10.96.0.0/12``, ``[fd00::/8]``), or any of these with ``:port``.

    ``*.example.com`` matches subdomains only, never ``example.com`` itself nor
    ``example.com.evil.net``; matching is on the normalised host (lower case, no trailing
    dot), so spelling cannot evade it. A CIDR matches IP-literal destinations inside it.

    ``wildcard`` entries (``*``, ``*.domain``) stand for "hosts on the internet": they never
    admit an address only ``destinations.allowPrivate`` makes reachable; an explicit entry
    (a name, an IP or a CIDR) does (see :func:`fleetgate.policy.decide.private_destination_reason`).
    """

    __slots__ = ("host", "network", "port", "source", "wildcard")

    def __init__(self, source: str, *, cidr: bool = False) -> None:
        """``cidr``: accept a CIDR entry. Off by default: a user of :attr:`host` that turns
        patterns into text (KILLSWITCH.md hosts become CEL) would silently never match one."""
        from fleetgate.normalize import normalize_host

        text = str(source).strip()
        if not text:
            raise ValueError("empty host pattern")
        _refuse_url(text)
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
        self.network: IPNetwork | None = None
        if "/" in host:
            if not cidr:
                raise ValueError(f"{source!r}: a CIDR is not allowed here (only in egress "
                                 "hosts and a rule's hosts)")
            if self.wildcard:
                raise ValueError(f"{source!r}: a CIDR cannot contain '*'")
            try:
                self.network = ipaddress.ip_network(host, strict=False)
            except ValueError:
                raise ValueError(f"{source!r}: {host!r} is not a CIDR") from None
            self.host = str(self.network)
            return
        self.host = "*" if host == "*" else (
            "*." + normalize_host(host[2:]) if host.startswith("*.") else normalize_host(host)
        )

    def matches(self, host: str, port: int) -> bool:
        """``host`` must already be normalised."""
        if self.port is not None and port != self.port:
            return False
        if self.network is not None:
            try:
                return ipaddress.ip_address(host) in self.network
            except ValueError:
                return False
        if self.host == "*":
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host

    def __repr__(self) -> str:
        return f"HostPattern({self.source!r})"


Endpoint = tuple[str, int]


def _split_endpoint(text: str, what: str) -> tuple[str, int | None]:
    t = text.strip()
    if t.startswith("["):  # [v6]:port
        host, sep, rest = t[1:].partition("]")
        if not sep:
            raise ValueError(f"{what} {text!r}: unclosed '['")
        port_text = rest[1:] if rest.startswith(":") else (None if not rest else "!")
    elif t.count(":") == 1:
        host, _, port_text = t.partition(":")
    else:
        host, port_text = t, None  # a bare name, IPv4 or IPv6 address
    if port_text == "!":
        raise ValueError(f"{what} {text!r}: expected ':port' after ']'")
    port: int | None = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{what} {text!r}: {port_text!r} is not a port (1-65535)")
        port = int(port_text)
    if not host:
        raise ValueError(f"{what} {text!r}: no host")
    return host.lower().rstrip("."), port


def parse_resolve_overrides(entries: Iterable[str]) -> dict[Endpoint, Endpoint]:
    """Parse ``NAME:PORT=ADDRESS[:PORT]`` entries (curl's ``--connect-to``, one per entry).

    The gateway then dials ``ADDRESS`` (and the new port, when given) whenever a request for
    ``NAME:PORT`` was allowed, instead of asking DNS. Host header, TLS SNI and certificate
    checks still use ``NAME``; the address is judged like any resolved one (``allowPrivate``
    still decides whether a private address may be dialled). Raises ``ValueError`` naming the
    entry that is wrong.
    """
    out: dict[Endpoint, Endpoint] = {}
    for raw in entries:
        name_part, sep, addr_part = str(raw).partition("=")
        if not sep:
            raise ValueError(f"resolve entry {raw!r}: expected NAME:PORT=ADDRESS[:PORT]")
        name, port = _split_endpoint(name_part, "resolve entry")
        if port is None:
            raise ValueError(f"resolve entry {raw!r}: the name needs a port (NAME:PORT)")
        addr, addr_port = _split_endpoint(addr_part, "resolve entry")
        try:
            addr = str(ipaddress.ip_address(addr))
        except ValueError:
            raise ValueError(f"resolve entry {raw!r}: {addr!r} is not an IP address") from None
        key = (name, port)
        if key in out:
            raise ValueError(f"resolve entry {raw!r}: {name}:{port} is given twice")
        out[key] = (addr, addr_port or port)
    return out
