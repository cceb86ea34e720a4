"""``credentials: [...]``: routes that give a request the gateway's secret on its way out.

A route names destinations (hosts, optional ports and path prefix), the header to set and
where the secret lives (a file or an environment variable of the gateway); see
:mod:`fleetgate.policy.credentials` for what a route does at request time. A route with any
problem is left out, and every problem is reported: the rules then do not load at all.
"""

from __future__ import annotations

import os
import re
from typing import Any

from fleetgate.netaddr import HostPattern
from fleetgate.normalize import normalize_path
from fleetgate.policy.credentials import CONTROL, DEFAULT_HEADER, DEFAULT_TEMPLATE, SLOT, CredentialRoute
from fleetgate.policy.report import Reporter, check_keys
from fleetgate.policy.schema import keys

__all__ = ["parse_credentials", "parse_route"]

_KEYS = keys("Credential")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP field name (RFC 9110 token)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ID = re.compile(r"[\x21-\x7e]+")  # visible ASCII: it ends up in a header, a metric label
# Headers that frame or route the request: a credential route must not replace or remove them.
_RESERVED = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive",
                       "te", "trailer", "upgrade", "proxy-connection"})


def parse_credentials(node: Any, where: str, report: Reporter, *, owner: str,
                      taken: set[str] | None = None) -> list[CredentialRoute]:
    """Validate a ``credentials:`` list (key paths such as ``credentials[0].secretFile``).
    ``owner`` (the file stem) makes default ids ``<owner>.credentials[<i>]``. ``taken``
    holds the ids already used by other files; the new ones are added to it.
    """
    if not isinstance(node, list):
        report.error(where, "credentials must be a list of routes {hosts, secretFile or "
                     "secretEnv, ...}")
        return []
    ids = taken if taken is not None else set()
    out = []
    for i, entry in enumerate(node):
        route = parse_route(entry, f"{where}[{i}]", report,
                            default_id=f"{owner}.credentials[{i}]", taken=ids)
        if route is not None:
            out.append(route)
    return out


def parse_route(node: Any, where: str, report: Reporter, *, default_id: str,
                taken: set[str]) -> CredentialRoute | None:
    """One route; ``None`` when it has any problem."""
    if not isinstance(node, dict):
        report.error(where, "a credential route is a mapping {hosts, secretFile or secretEnv, "
                     "header, value, ...}")
        return None
    before = len(report.problems)
    check_keys(node, where, _KEYS, report)
    rid = _route_id(node, where, report, default_id, taken)
    hosts = _hosts(node.get("hosts"), f"{where}.hosts", report)
    ports = _ports(node, f"{where}.ports", report)
    prefix = _prefix(node, where, report)
    header = node.get("header", DEFAULT_HEADER)
    why = _header_problem(header)
    if why:
        report.error(f"{where}.header", f"header {why}")
    template = node.get("value", DEFAULT_TEMPLATE)
    if not isinstance(template, str) or template.count(SLOT) != 1:
        report.error(f"{where}.value", f"value must be a string with {SLOT} exactly once "
                     f"(e.g. 'Bearer {SLOT}' or '{SLOT}')")
    elif CONTROL.search(template):
        report.error(f"{where}.value", "value must be one line without control characters")
    secret_file, secret_env = node.get("secretFile"), node.get("secretEnv")
    _secret(secret_file, secret_env, where, report)
    remove = _remove(node, where, report)
    if len(report.problems) > before or rid is None:
        return None
    return CredentialRoute(id=rid, hosts=tuple(hosts), ports=tuple(ports), path_prefix=prefix,
                           header=header, template=template, secret_file=secret_file,
                           secret_env=secret_env, remove=tuple(remove))


def _route_id(node: dict[str, Any], where: str, report: Reporter, default_id: str,
              taken: set[str]) -> str | None:
    rid = node.get("id", default_id)
    if not isinstance(rid, str) or not _ID.fullmatch(rid):
        report.error(f"{where}.id", "id must be a non-empty string without spaces")
        return None
    if rid in taken:
        report.error(f"{where}.id" if "id" in node else where,
                     f"duplicate credentials id {rid!r} (ids must be unique across all rules files)")
        return None
    taken.add(rid)
    return rid


def _prefix(node: dict[str, Any], where: str, report: Reporter) -> str:
    prefix = node.get("pathPrefix", "")
    if not isinstance(prefix, str) or (prefix and not prefix.startswith("/")):
        report.error(f"{where}.pathPrefix", "pathPrefix must be a path starting with '/'")
        return ""
    if prefix and normalize_path(prefix) != prefix:
        report.error(f"{where}.pathPrefix", f"pathPrefix must be a plain path (no '.', '..', "
                     f"'//', percent-escapes or query): requests are matched on their "
                     f"normalised path, {normalize_path(prefix)!r} here")
    return prefix


def _secret(secret_file: Any, secret_env: Any, where: str, report: Reporter) -> None:
    if secret_file is None and secret_env is None:
        report.error(where, "a credential route needs secretFile (a file path) or secretEnv "
                     "(an environment variable name)")
    elif secret_file is not None and secret_env is not None:
        report.error(f"{where}.secretEnv", "use either secretFile or secretEnv, not both")
    elif secret_file is not None and (not isinstance(secret_file, str)
                                      or not os.path.isabs(secret_file)):
        report.error(f"{where}.secretFile", "secretFile must be an absolute path (relative "
                     "paths would depend on the gateway's working directory)")
    elif secret_env is not None and (not isinstance(secret_env, str)
                                     or not _ENV_NAME.fullmatch(secret_env)):
        report.error(f"{where}.secretEnv", "secretEnv must be an environment variable name "
                     "(letters, digits, '_')")


def _remove(node: dict[str, Any], where: str, report: Reporter) -> list[str]:
    remove: list[str] = []
    raw = node.get("remove", [])
    if not isinstance(raw, list):
        report.error(f"{where}.remove", "remove must be a list of header names")
        return remove
    for j, name in enumerate(raw):
        why = _header_problem(name)
        if why:
            report.error(f"{where}.remove[{j}]", f"removed header {why}")
        elif name.lower() not in remove:
            remove.append(name.lower())
    return remove


def _hosts(node: Any, where: str, report: Reporter) -> list[HostPattern]:
    if not isinstance(node, list) or not node:
        report.error(where, "hosts must be a non-empty list of hosts ('api.openai.com' or "
                     "'*.example.com')")
        return []
    out = []
    for j, item in enumerate(node):
        at = f"{where}[{j}]"
        if not isinstance(item, str) or not item.strip():
            report.error(at, "a host must be a non-empty string")
            continue
        try:
            pattern = HostPattern(item)
        except ValueError as exc:
            report.error(at, str(exc))
            continue
        if pattern.host == "*":
            report.error(at, "'*' would send the secret to every host: name the hosts it is for")
        elif pattern.port is not None:
            report.error(at, f"{item!r}: put ports under 'ports', not in the host")
        else:
            out.append(pattern)
    return out


def _ports(node: dict[str, Any], where: str, report: Reporter) -> list[int]:
    if "ports" not in node:
        return []
    value = node["ports"]
    if not isinstance(value, list) or not value:
        report.error(where, "ports must be a non-empty list of port numbers (omit it for any "
                     "port)")
        return []
    out = []
    for j, port in enumerate(value):
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            report.error(f"{where}[{j}]", "a port must be a number from 1 to 65535")
        else:
            out.append(port)
    return out


def _header_problem(name: Any) -> str | None:
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        return "must be an HTTP header name (letters, digits and -_.!#$%&'*+^`|~)"
    if name.lower() in _RESERVED:
        return f"{name!r} frames or routes the request and cannot be replaced or removed"
    return None
