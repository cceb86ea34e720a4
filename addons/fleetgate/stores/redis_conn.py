"""The shared engine: how fleetgate connects to Redis (or Valkey) when several gateways share
state (``fleetgate_state=redis://…``).

One :class:`RedisSettings`, parsed and checked once from the options, is what every
Redis-backed store gets. It hands out the two clients of the maintained ``redis`` package:
a synchronous one for the stores' writer threads and the admin API's threads, and an asyncio
one for the proxy's event loop (created on the loop that uses it). Both have short timeouts:
a Redis that stops answering must turn into a refused call within a bounded time, never into
a request that hangs.

Every key lives under one hash tag (``{prefix}:…``), so the multi-key scripts (a request's
rate limits, a call's budgets, all taken or none) run on Redis Cluster as well as on a single
primary (Sentinel or not): they all map to one slot.

TLS: ``rediss://`` (``?ssl_ca_certs=/path/ca.pem`` for a private CA, ``ssl_cert_reqs`` as the
``redis`` package reads them). The password: in the URL (``redis://:secret@host``) or, better
for Kubernetes Secrets, read from ``fleetgate_state_password_file``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis

from fleetgate.errors import ConfigError

__all__ = ["RedisSettings", "parse_state"]

SCHEMES = ("redis", "rediss", "unix")
CONNECT_TIMEOUT = 1.0  # seconds: a Redis that is down is known quickly
OP_TIMEOUT = 1.0  # seconds an operation may take before it counts as a failure


def _replica_name() -> str:
    """Who this process is in the kill log and the reservations: the pod name (HOSTNAME in
    Kubernetes) and the process id (several workers per pod)."""
    return f"{os.environ.get('HOSTNAME') or socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class RedisSettings:
    """Where the shared state is: ``url`` (password elsewhere), key ``prefix``."""

    url: str
    prefix: str = "fleetgate"
    password: str | None = field(default=None, repr=False)
    replica: str = field(default_factory=_replica_name)

    def __repr__(self) -> str:
        return f"RedisSettings({self.redacted()!r}, prefix={self.prefix!r})"

    def key(self, *parts: str) -> str:
        """``{prefix}:part:part``: one hash tag for every key (one Cluster slot)."""
        return ":".join(["{" + self.prefix + "}", *parts])

    def redacted(self) -> str:
        """The URL with any password replaced (logs, status)."""
        u = urlsplit(self.url)
        if u.password is None:
            return self.url
        netloc = f"{u.username or ''}:***@{u.hostname or ''}" + (f":{u.port}" if u.port else "")
        return u._replace(netloc=netloc).geturl()

    def _kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"socket_connect_timeout": CONNECT_TIMEOUT,
                              "socket_timeout": OP_TIMEOUT, "health_check_interval": 5,
                              "client_name": f"fleetgate-{self.replica}".replace(" ", "_")}
        if self.password is not None:
            kw["password"] = self.password
        return kw

    def sync_client(self, **extra: Any) -> redis.Redis:
        """A client for threads (writer threads, the admin API)."""
        return redis.Redis.from_url(self.url, **{**self._kwargs(), **extra})

    def async_client(self, **extra: Any) -> aioredis.Redis:
        """A client for the event loop that calls it (create it on that loop)."""
        return aioredis.Redis.from_url(self.url, **{**self._kwargs(), **extra})


def parse_state(url: str, password_file: str = "", prefix: str = "fleetgate"
                ) -> RedisSettings | None:
    """``fleetgate_state``: ``''`` is the embedded default (``None``), a ``redis://``,
    ``rediss://`` or ``unix://`` URL is Redis. Raises :class:`ConfigError` saying what is
    wrong (the gateway does not start on a state option it cannot use)."""
    url = url.strip()
    if not url:
        return None
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        raise ConfigError(f"fleetgate_state={url!r}: use '' (embedded SQLite state) or a Redis "
                          "URL: redis://host:6379/0, rediss://host:6380/0 (TLS) or "
                          "unix:///path/redis.sock")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a malformed port
    except ValueError as exc:
        raise ConfigError(f"fleetgate_state: malformed Redis URL ({exc})") from None
    if scheme != "unix" and not parts.hostname:
        raise ConfigError(f"fleetgate_state={url!r}: the URL names no host")
    if not prefix or any(c in prefix for c in "{}: \t"):
        raise ConfigError(f"fleetgate_state_prefix={prefix!r}: use a non-empty name without "
                          "braces, colons or spaces")
    password = None
    if password_file:
        try:
            password = Path(password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"fleetgate_state_password_file: cannot read {password_file!r} "
                              f"({exc.strerror or exc})") from None
        if not password:
            raise ConfigError(f"fleetgate_state_password_file: {password_file!r} is empty")
    return RedisSettings(url, prefix, password)
