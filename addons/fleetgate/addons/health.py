"""HealthEndpoint: the metrics/health listener and the admin API listener.

Two listeners, never the proxy port: ``fleetgate_metrics_listen`` (``/metrics``,
``/healthz/*`` and read-only JSON views, for Prometheus and probes) and
``fleetgate_admin_listen`` (operator views and actions: the kill switch, MCP approvals),
which demands the admin token. HttpAuthorization refuses to proxy to either address, so an
agent cannot reach them through the gateway even when private destinations are allowed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions

from fleetgate.approvals.operators import OperatorsError, parse_operators
from fleetgate.runtime.listeners import HttpListener

log = logging.getLogger(__name__)


def _listen_spec(name: str, spec: str) -> tuple[str, int] | None:
    if not spec:
        return None
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit():
        raise exceptions.OptionsError(f"{name} must be host:port, not {spec!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class HealthEndpoint:
    def __init__(self, server: HttpListener, admin: HttpListener) -> None:
        self.server = server
        self.admin = admin

    def load(self, loader: Any) -> None:
        loader.add_option("fleetgate_metrics_listen", str, "127.0.0.1:15020",
                          "host:port for /metrics, /healthz/ready and /healthz/live "
                          "(port 0 picks a free port; '' disables). Never the proxy port.")
        loader.add_option("fleetgate_admin_listen", str, "127.0.0.1:15021",
                          "host:port of the admin API (kill switch, MCP approvals); '' "
                          "disables it. Keep it off networks agents can reach.")
        loader.add_option("fleetgate_admin_token", str, "",
                          "Bearer token the admin API demands. '' (and no token file): the "
                          "admin API answers loopback clients only.")
        loader.add_option("fleetgate_admin_token_file", str, "",
                          "File holding the admin token (takes precedence over "
                          "fleetgate_admin_token).")
        loader.add_option("fleetgate_admin_users_file", str, "",
                          "YAML file of operators (name, groups, tokenSha256 of a personal "
                          "admin token): who approves and stops, by name (approvals need "
                          "distinct people). The shared admin token acts as 'admin'.")

    def configure(self, updated: set[str]) -> None:
        if {"fleetgate_admin_token", "fleetgate_admin_token_file"} & updated:
            token = ctx.options.fleetgate_admin_token
            path = ctx.options.fleetgate_admin_token_file
            if path:
                try:
                    token = Path(path).read_text().strip()
                except OSError as exc:
                    raise exceptions.OptionsError(
                        f"fleetgate_admin_token_file: cannot read {path}: {exc}") from None
                if len(token) < 16:
                    raise exceptions.OptionsError(
                        f"fleetgate_admin_token_file: the token in {path} is shorter than 16 "
                        "characters")
            self.admin.admin_token = token
            self.server.admin_token = token
        if "fleetgate_admin_users_file" in updated:
            path = ctx.options.fleetgate_admin_users_file
            try:
                self.admin.operators = (parse_operators(Path(path).read_text()) if path
                                        else type(self.admin.operators)())
            except (OSError, OperatorsError) as exc:
                raise exceptions.OptionsError(
                    f"fleetgate_admin_users_file: {path}: {exc}") from None
        for name in ("fleetgate_metrics_listen", "fleetgate_admin_listen"):
            if name in updated:
                _listen_spec(name, getattr(ctx.options, name))

    def running(self) -> None:
        for server, name, what in ((self.server, "fleetgate_metrics_listen", "metrics"),
                                   (self.admin, "fleetgate_admin_listen", "admin API")):
            spec = _listen_spec(name, getattr(ctx.options, name))
            if spec is None or server.address is not None:
                continue
            try:
                addr = server.start(*spec)
            except OSError as exc:
                log.error("fleetgate: cannot listen for the %s on %s:%d: %s", what, *spec, exc)
                ctx.master.shutdown()
                return
            log.info("fleetgate %s listening at http://%s:%d/", what, *addr)
            if server is self.admin and not self.admin.admin_token:
                log.warning("fleetgate: no admin token configured; the admin API answers "
                            "loopback clients only (set fleetgate_admin_token_file)")

    def done(self) -> None:
        self.server.stop()
        self.admin.stop()
