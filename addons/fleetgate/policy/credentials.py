"""Upstream credentials: routes that give a request the gateway's secret on its way out.

A ``credentials:`` route names destinations (hosts, optional ports and path prefix), the
header to set and where the secret lives (a file or an environment variable of the gateway).
The agent's own value of that header, and of any header listed in ``remove``, is dropped, so
agent pods need no provider keys and a stopped or revoked agent holds nothing that works.

Pure (the ``credentials:`` section is read by
:func:`fleetgate.policy.parse_credentials.parse_credentials`; the secrets themselves by
:class:`fleetgate.stores.secrets.SecretSource`): :class:`CredentialRoute` (frozen) says whether
it covers a request (:meth:`~CredentialRoute.matches`, or :func:`find_route` for the first route
in file order). A secret that is missing, empty or not one line raises
:class:`CredentialUnavailable`, which the gateway turns into a refusal: never a request
without its credential, never the agent's header instead.

A secret is carried as :class:`Secret`, whose ``repr``/``str`` never show the value: it
only leaves as the header value :meth:`CredentialRoute.render` builds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from fleetgate.errors import FleetgateError
from fleetgate.netaddr import HostPattern
from fleetgate.normalize import normalize_host, normalize_path

__all__ = [
    "DEFAULT_HEADER",
    "DEFAULT_TEMPLATE",
    "MAX_SECRET_BYTES",
    "CredentialRoute",
    "CredentialUnavailable",
    "Secret",
    "find_route",
    "redacted",
]

SLOT = "{secret}"
DEFAULT_HEADER = "Authorization"
DEFAULT_TEMPLATE = "Bearer {secret}"
MAX_SECRET_BYTES = 64 * 1024
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # what may never be in a header value


class CredentialUnavailable(FleetgateError):
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
