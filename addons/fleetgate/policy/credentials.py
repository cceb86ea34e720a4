"""Upstream credentials: routes that give a request the gateway's secret on its way out.

A ``credentials:`` route names destinations (hosts, optional ports and path prefix), the
header to set and where the secret lives (a file or an environment variable of the gateway).
The agent's own value of that header, and of any header listed in ``remove``, is dropped, so
agent pods need no provider keys and a stopped or revoked agent holds nothing that works.

Three pieces, all pure:

* :func:`parse_credentials` validates the YAML section, reporting every problem through the
  loader's ``err(key_path, message)`` (so problems are located like every other section);
* :class:`CredentialRoute` (frozen) says whether it covers a request (:meth:`~CredentialRoute.
  matches`, or :func:`find_route` for the first route in file order);
* :class:`SecretSource` reads a route's secret: a file is re-read only when its inode, mtime
  or size changes (a Kubernetes Secret's atomic symlink swap changes the inode), an
  environment variable each time. A secret that is missing, empty or not one line raises
  :class:`CredentialUnavailable`, which the gateway turns into a refusal: never a request
  without its credential, never the agent's header instead.

A secret is carried as :class:`Secret`, whose ``repr``/``str`` never show the value: it
only leaves as the header value :meth:`CredentialRoute.render` builds.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleetgate.policy.netaddr import HostPattern
from fleetgate.policy.normalize import normalize_host, normalize_path

__all__ = [
    "DEFAULT_HEADER",
    "DEFAULT_TEMPLATE",
    "MAX_SECRET_BYTES",
    "CredentialRoute",
    "CredentialUnavailable",
    "Secret",
    "SecretSource",
    "find_route",
    "parse_credentials",
    "redacted",
]

SLOT = "{secret}"
DEFAULT_HEADER = "Authorization"
DEFAULT_TEMPLATE = "Bearer {secret}"
MAX_SECRET_BYTES = 64 * 1024

Report = Callable[[str, str], None]

_KEYS = frozenset({"id", "hosts", "ports", "pathPrefix", "header", "value", "secretFile",
                   "secretEnv", "remove"})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP field name (RFC 9110 token)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ID = re.compile(r"[\x21-\x7e]+")  # visible ASCII: it ends up in a header, a metric label
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # what may never be in a header value
# Headers that frame or route the request: a credential route must not replace or remove them.
_RESERVED = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive",
                       "te", "trailer", "upgrade", "proxy-connection"})


class CredentialUnavailable(Exception):
    """A route's secret cannot be used now; ``why`` says what an operator must fix.

    Never carries the secret itself (nor any part of it).
    """

    def __init__(self, route_id: str, why: str) -> None:
        self.route_id = route_id
        self.why = why
        super().__init__(f"credentials {route_id!r} unavailable: {why}")


class Secret:
    """A secret value that does not show itself in ``repr``, ``str`` or f-strings."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)


@dataclass(frozen=True)
class CredentialRoute:
    """One ``credentials[]`` entry. ``remove`` names are lower case; ``ports`` empty: any."""

    id: str
    hosts: tuple[HostPattern, ...]
    ports: tuple[int, ...] = ()
    path_prefix: str = ""
    header: str = DEFAULT_HEADER
    template: str = DEFAULT_TEMPLATE
    secret_file: str | None = None
    secret_env: str | None = None
    remove: tuple[str, ...] = ()

    def matches(self, host: str, port: int, path: str) -> bool:
        """Whether a request to ``host:port`` for ``path`` gets this credential.

        ``host`` and ``path`` are normalised here (case, trailing dot, IP spelling; percent
        escapes, ``..``, ``//``, query dropped) the way the rules see them, so the route
        covers what the upstream will serve: ``/v1/../admin`` is not under ``/v1/``.
        """
        return self._match(normalize_host(host), port, normalize_path(path.split("?", 1)[0]))

    def _match(self, host: str, port: int, path: str) -> bool:
        if self.ports and port not in self.ports:
            return False
        if not any(h.matches(host, port) for h in self.hosts):
            return False
        prefix = self.path_prefix.rstrip("/")
        return not prefix or path == prefix or path.startswith(prefix + "/")

    @property
    def stripped(self) -> tuple[str, ...]:
        """Header names (lower case) dropped from the agent's request before injecting."""
        first = self.header.lower()
        return (first, *(h for h in self.remove if h != first))

    @property
    def origin(self) -> str:
        """Where the secret comes from, for operators (never the secret)."""
        if self.secret_env is not None:
            return f"environment variable {self.secret_env}"
        return f"secret file {self.secret_file}"

    def render(self, secret: Secret) -> str:
        """The header value: the template with the secret in its one ``{secret}`` slot."""
        before, _, after = self.template.partition(SLOT)
        return before + secret.reveal() + after


def find_route(routes: Sequence[CredentialRoute], host: str, port: int,
               path: str) -> CredentialRoute | None:
    """The first route (file order) covering the request; host and path are normalised once
    (see :meth:`CredentialRoute.matches`)."""
    if not routes:
        return None
    h = normalize_host(host)
    p = normalize_path(path.split("?", 1)[0])
    for route in routes:
        if route._match(h, port, p):
            return route
    return None


def redacted(route_id: str) -> str:
    """What the injected header shows once the request has left (mitmweb, dumps, logs)."""
    return f"[injected by fleetgate: {route_id}]"


# -- parsing ---------------------------------------------------------------------------


def parse_credentials(section: Any, path: str, owner: str, err: Report,
                      taken: set[str] | None = None) -> list[CredentialRoute]:
    """Validate a ``credentials:`` list. Every problem is reported with ``err(key_path,
    message)`` (key paths such as ``credentials[0].secretFile``); a route with any problem
    is left out. ``owner`` (the file stem) makes default ids ``<owner>.credentials[<i>]``.
    ``taken`` holds the ids already used by other files; the new ones are added to it.
    """
    if not isinstance(section, list):
        err(path, "credentials must be a list of routes {hosts, secretFile or secretEnv, ...}")
        return []
    ids = taken if taken is not None else set()
    out = []
    for i, entry in enumerate(section):
        route = _route(entry, f"{path}[{i}]", f"{owner}.credentials[{i}]", err, ids)
        if route is not None:
            out.append(route)
    return out


def _route(entry: Any, where: str, default_id: str, err: Report,
           ids: set[str]) -> CredentialRoute | None:
    if not isinstance(entry, dict):
        err(where, "a credential route is a mapping {hosts, secretFile or secretEnv, header, "
            "value, ...}")
        return None
    problems = 0

    def bad(key_path: str, message: str) -> None:
        nonlocal problems
        problems += 1
        err(key_path, message)

    for key in entry:
        if key not in _KEYS:
            bad(f"{where}.{key}", f"unknown key {key!r}; expected one of {sorted(_KEYS)}")

    rid = entry.get("id", default_id)
    if not isinstance(rid, str) or not _ID.fullmatch(rid):
        bad(f"{where}.id", "id must be a non-empty string without spaces")
        rid = None
    elif rid in ids:
        bad(f"{where}.id" if "id" in entry else where,
            f"duplicate credentials id {rid!r} (ids must be unique across all rules files)")
        rid = None
    else:
        ids.add(rid)

    hosts = _hosts(entry.get("hosts"), f"{where}.hosts", bad)
    ports = _ports(entry, f"{where}.ports", bad)

    prefix = entry.get("pathPrefix", "")
    if not isinstance(prefix, str) or (prefix and not prefix.startswith("/")):
        bad(f"{where}.pathPrefix", "pathPrefix must be a path starting with '/'")
        prefix = ""
    elif prefix and normalize_path(prefix) != prefix:
        bad(f"{where}.pathPrefix", f"pathPrefix must be a plain path (no '.', '..', '//', "
            f"percent-escapes or query): requests are matched on their normalised path, "
            f"{normalize_path(prefix)!r} here")

    header = entry.get("header", DEFAULT_HEADER)
    why = _header_problem(header)
    if why:
        bad(f"{where}.header", f"header {why}")

    template = entry.get("value", DEFAULT_TEMPLATE)
    if not isinstance(template, str) or template.count(SLOT) != 1:
        bad(f"{where}.value", f"value must be a string with {SLOT} exactly once "
            f"(e.g. 'Bearer {SLOT}' or '{SLOT}')")
    elif _CONTROL.search(template):
        bad(f"{where}.value", "value must be one line without control characters")

    secret_file, secret_env = entry.get("secretFile"), entry.get("secretEnv")
    if secret_file is None and secret_env is None:
        bad(where, "a credential route needs secretFile (a file path) or secretEnv (an "
            "environment variable name)")
    elif secret_file is not None and secret_env is not None:
        bad(f"{where}.secretEnv", "use either secretFile or secretEnv, not both")
    elif secret_file is not None and (not isinstance(secret_file, str)
                                      or not os.path.isabs(secret_file)):
        bad(f"{where}.secretFile", "secretFile must be an absolute path (relative paths would "
            "depend on the gateway's working directory)")
    elif secret_env is not None and (not isinstance(secret_env, str)
                                     or not _ENV_NAME.fullmatch(secret_env)):
        bad(f"{where}.secretEnv", "secretEnv must be an environment variable name "
            "(letters, digits, '_')")

    remove: list[str] = []
    raw_remove = entry.get("remove", [])
    if not isinstance(raw_remove, list):
        bad(f"{where}.remove", "remove must be a list of header names")
        raw_remove = []
    for j, name in enumerate(raw_remove):
        why = _header_problem(name)
        if why:
            bad(f"{where}.remove[{j}]", f"removed header {why}")
        elif name.lower() not in remove:
            remove.append(name.lower())

    if problems or rid is None:
        return None
    return CredentialRoute(id=rid, hosts=tuple(hosts), ports=tuple(ports), path_prefix=prefix,
                           header=header, template=template, secret_file=secret_file,
                           secret_env=secret_env, remove=tuple(remove))


def _hosts(value: Any, where: str, bad: Report) -> list[HostPattern]:
    if not isinstance(value, list) or not value:
        bad(where, "hosts must be a non-empty list of hosts ('api.openai.com' or "
            "'*.example.com')")
        return []
    out = []
    for j, item in enumerate(value):
        at = f"{where}[{j}]"
        if not isinstance(item, str) or not item.strip():
            bad(at, "a host must be a non-empty string")
            continue
        try:
            pattern = HostPattern(item)
        except ValueError as exc:
            bad(at, str(exc))
            continue
        if pattern.host == "*":
            bad(at, "'*' would send the secret to every host: name the hosts it is for")
        elif pattern.port is not None:
            bad(at, f"{item!r}: put ports under 'ports', not in the host")
        else:
            out.append(pattern)
    return out


def _ports(entry: dict[str, Any], where: str, bad: Report) -> list[int]:
    if "ports" not in entry:
        return []
    value = entry["ports"]
    if not isinstance(value, list) or not value:
        bad(where, "ports must be a non-empty list of port numbers (omit it for any port)")
        return []
    out = []
    for j, port in enumerate(value):
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            bad(f"{where}[{j}]", "a port must be a number from 1 to 65535")
        else:
            out.append(port)
    return out


def _header_problem(name: Any) -> str | None:
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        return "must be an HTTP header name (letters, digits and -_.!#$%&'*+^`|~)"
    if name.lower() in _RESERVED:
        return f"{name!r} frames or routes the request and cannot be replaced or removed"
    return None


# -- secrets ---------------------------------------------------------------------------


class SecretSource:
    """Reads the secrets of credential routes. Files are cached by path and re-read when
    ``(inode, mtime_ns, size)`` changes, so a rotated Secret is used from the next request;
    a file that disappears stops working at once (its cached value is dropped). Environment
    variables (``environ``, default ``os.environ``) are read on every call.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ: Mapping[str, str] = os.environ if environ is None else environ
        self._files: dict[str, tuple[tuple[int, int, int], Secret]] = {}

    def __repr__(self) -> str:
        return f"SecretSource(files={sorted(self._files)!r})"

    def read(self, route: CredentialRoute) -> Secret:
        """The route's secret, stripped of surrounding whitespace, or
        :class:`CredentialUnavailable` saying what is wrong."""
        if route.secret_env is not None:
            value = self._environ.get(route.secret_env)
            if value is None:
                raise CredentialUnavailable(route.id, f"{route.origin} is not set in the "
                                            "gateway's environment; set it and restart the gateway")
            return _checked(route, value)
        if route.secret_file is None:
            raise CredentialUnavailable(route.id, "the route names no secret")
        return self._file(route, route.secret_file)

    def _file(self, route: CredentialRoute, path: str) -> Secret:
        try:
            st = os.stat(path)  # follows symlinks: a ConfigMap/Secret swap changes the inode
            if not stat.S_ISREG(st.st_mode):
                raise CredentialUnavailable(route.id, f"{route.origin} is not a regular file; "
                                            "point secretFile at the file holding the secret")
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._files.get(path)
            if cached is not None and cached[0] == key:
                return cached[1]
            if st.st_size > MAX_SECRET_BYTES:
                raise CredentialUnavailable(route.id, f"{route.origin} is larger than "
                                            f"{MAX_SECRET_BYTES} bytes; is secretFile the right file?")
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read(MAX_SECRET_BYTES + 1)
            if len(data) > MAX_SECRET_BYTES:
                raise CredentialUnavailable(route.id, f"{route.origin} is larger than "
                                            f"{MAX_SECRET_BYTES} bytes; is secretFile the right file?")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                raise CredentialUnavailable(route.id, f"{route.origin} is not UTF-8 text") from None
            secret = _checked(route, text)
        except FileNotFoundError:
            self._files.pop(path, None)
            raise CredentialUnavailable(route.id, f"{route.origin} does not exist; create it "
                                        "(or mount the Secret there) or fix secretFile") from None
        except OSError as exc:
            self._files.pop(path, None)
            raise CredentialUnavailable(route.id, f"{route.origin} cannot be read "
                                        f"({exc.strerror or exc}); check its permissions") from None
        except CredentialUnavailable:
            self._files.pop(path, None)
            raise
        self._files[path] = ((st.st_ino, st.st_mtime_ns, st.st_size), secret)
        return secret


def _checked(route: CredentialRoute, value: str) -> Secret:
    text = value.strip()
    if not text:
        raise CredentialUnavailable(route.id, f"{route.origin} is empty; put the secret in it")
    if _CONTROL.search(text):
        raise CredentialUnavailable(route.id, f"{route.origin} holds more than one line or a "
                                    "control character; it must hold the secret alone")
    return Secret(text)
