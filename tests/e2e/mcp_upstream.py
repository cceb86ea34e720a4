"""The MCP test server, from the package (``fleetgate.mocks.mcp_server``, shared with the demo).

:class:`McpUpstream` here is the package's server plus what the e2e harness needs: its name
(``up<port>.fleetgate.test``) is registered with :func:`harness.register_name` while it runs, so
every :class:`harness.Gateway` started meanwhile resolves it, as it does for ``harness.Upstream``.
The wire format the SDK speaks is described in the package module's docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleetgate.mocks import mcp_server
from fleetgate.mocks.mcp_server import (
    ALL_TOOLS,
    CLOUD_TOOLS,
    GENERAL_TOOLS,
    POISON_TEXT,
    POISONED_TOOL,
    POISONED_TOOLS,
    PROMPT,
    RESOURCE,
    RESOURCE_TEXT,
    SECURITY_TOOLS,
    TRANSPORTS,
    Call,
    Exchange,
    ToolSpec,
    Transport,
)
from harness import Gateway, register_name, unregister_names

__all__ = [
    "ALL_TOOLS",
    "CLOUD_TOOLS",
    "GENERAL_TOOLS",
    "POISONED_TOOL",
    "POISONED_TOOLS",
    "POISON_TEXT",
    "PROMPT",
    "RESOURCE",
    "RESOURCE_TEXT",
    "SECURITY_TOOLS",
    "TRANSPORTS",
    "Call",
    "Exchange",
    "GatewayPool",
    "McpUpstream",
    "ToolSpec",
    "Transport",
]


class McpUpstream(mcp_server.McpUpstream):
    """The package's MCP server, its name resolvable by gateways the tests start."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        register_name(self.name, self.port, self.port)

    def stop(self) -> None:
        unregister_names(self.port)
        super().stop()

    def __enter__(self) -> McpUpstream:
        return self


class GatewayPool:
    """Gateways shared by the tests of one module (start-up is the slow part of an e2e test).

    :meth:`get` starts a gateway for ``key`` the first time (``rules`` writes its policy into the
    given path) and hands the same one back afterwards; start the MCP servers it must resolve
    first.  Use it only for tests that do not change the gateway (rules, pins, restarts).
    """

    def __init__(self, root: Path, confdir: Path, upstream_ca_file: Path) -> None:
        self.root, self.confdir, self.upstream_ca_file = root, confdir, upstream_ca_file
        self._started: dict[str, Gateway] = {}

    def get(self, key: str, rules: Callable[[Path], Path], **options: str) -> Gateway:
        if key not in self._started:
            workdir = self.root / key
            workdir.mkdir()
            gw = Gateway(rules=rules(workdir / "rules.yaml"), workdir=workdir, confdir=self.confdir,
                         upstream_ca=self.upstream_ca_file, options=options)
            self._started[key] = gw.start()
        return self._started[key]

    def stop(self) -> None:
        for gw in self._started.values():
            gw.stop()
