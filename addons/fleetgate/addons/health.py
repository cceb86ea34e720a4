"""HealthEndpoint: Prometheus ``/metrics`` and ``/healthz/ready`` on their own port."""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import ctx, exceptions

from fleetgate.metrics import HealthServer

log = logging.getLogger(__name__)


class HealthEndpoint:
    def __init__(self, server: HealthServer) -> None:
        self.server = server

    def load(self, loader: Any) -> None:
        loader.add_option("fleetgate_metrics_listen", str, "127.0.0.1:15020",
                          "host:port for /metrics, /healthz/ready and /healthz/live "
                          "(port 0 picks a free port; '' disables). Never the proxy port.")
        loader.add_option("fleetgate_admin_token", str, "",
                          "Bearer token for admin actions (POST /mcp/approve...) from other "
                          "hosts than loopback; '' accepts them from loopback only.")

    def configure(self, updated: set[str]) -> None:
        if "fleetgate_admin_token" in updated:
            self.server.admin_token = ctx.options.fleetgate_admin_token
        if "fleetgate_metrics_listen" not in updated:
            return
        spec = ctx.options.fleetgate_metrics_listen
        if spec:
            _host, sep, port = spec.rpartition(":")
            if not sep or not port.isdigit():
                raise exceptions.OptionsError(
                    f"fleetgate_metrics_listen must be host:port, not {spec!r}")

    def running(self) -> None:
        spec = ctx.options.fleetgate_metrics_listen
        if not spec or self.server.address is not None:
            return
        host, _, port = spec.rpartition(":")
        try:
            addr = self.server.start(host.strip("[]") or "0.0.0.0", int(port))
        except OSError as exc:
            log.error("fleetgate: cannot listen for metrics on %s: %s", spec, exc)
            ctx.master.shutdown()
            return
        log.info("fleetgate metrics listening at http://%s:%d/metrics", *addr)

    def done(self) -> None:
        self.server.stop()
