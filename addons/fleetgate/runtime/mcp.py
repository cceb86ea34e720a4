"""McpService: the MCP state that outlives one exchange, shared by the MCP addons.

Built once in ``pipeline()`` and handed to the addons that judge requests
(:class:`fleetgate.addons.mcp.McpGuard`), filter answers
(:class:`fleetgate.addons.mcp_answers.McpAnswers`), read request bodies
(:class:`fleetgate.addons.request_bodies.RequestBodies`) and serve operators
(:class:`fleetgate.addons.mcp_operator.McpOperator`). It owns:

- the sessions (:class:`fleetgate.mcp.sessions.Sessions`: who owns each, answers owed);
- the tool vetting and its pins (:class:`fleetgate.mcp.vetting.Vetting` over
  :class:`fleetgate.mcp.pins.Pins`, saved to a :class:`fleetgate.stores.pins.PinStore`),
  with the definitions pending an operator's approval;
- which server a request goes to, and the rules that apply there (cached per policy).

Operators reach it through ``/mcp/pins`` (GET) and ``/mcp/approve`` (POST) on the
:class:`~fleetgate.runtime.listeners.Routes` table handed in, and through the addon's
commands. No mitmproxy import: callers pass the request's facts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fleetgate.mcp.exchange import looks_like_mcp
from fleetgate.mcp.mode import McpMode
from fleetgate.mcp.pins import Pending, PinMap, Pins
from fleetgate.mcp.sessions import Sessions
from fleetgate.mcp.vetting import Report, Vetting
from fleetgate.metrics import GatewayMetrics
from fleetgate.policy.model import McpServer, Policy
from fleetgate.rule import Rule
from fleetgate.runtime.listeners import Routes
from fleetgate.stores.pins import PinStore, open_pins

__all__ = ["McpService"]

log = logging.getLogger("fleetgate.mcp")


class McpService:
    def __init__(self, metrics: GatewayMetrics, routes: Routes | None = None) -> None:
        self.metrics = metrics
        self.sessions = Sessions()
        self.vetting = Vetting(Pins(), self._on_report)
        self._rules_cache: dict[tuple[str, tuple[str, ...]], tuple[Rule, ...]] = {}
        self._rules_policy: Policy | None = None
        if routes is not None:
            routes.get("/mcp/pins", self.pins_report)
            routes.post("/mcp/approve", self._admin_approve)

    def use_pins(self, store: PinStore | None, trust_on_first_use: bool) -> None:
        """Vet with the pins ``store`` holds (in memory only: ``None``) from now on. Raises
        ``OSError``/``ValueError`` when the store cannot be read; the old pins stay then."""
        self.vetting = Vetting(open_pins(store, trust_on_first_use), self._on_report)

    # -- which flows are MCP, under which rules --------------------------------------

    def server_for(self, policy: Policy, method: str, host: str, port: int, path: str,
                   target: str, headers: Mapping[str, str], llm: bool) -> McpServer | None:
        """The MCP server a request goes to: a declared one, or (``mcp.detect``) an
        undeclared one recognised by how the request looks; ``None``: not MCP. ``host`` and
        ``path`` normalised, ``target`` the raw request target, ``llm``: an LLM API call."""
        server = policy.mcp.server_for(host, port, path)
        if server is not None or not policy.mcp.detect or llm:
            return server
        name = host if port == 443 else f"{host}:{port}"
        if looks_like_mcp(method, headers, target,
                          lambda sid: self.sessions.get(name, sid) is not None):
            return McpServer(name=name, hosts=(), declared=False)
        return None

    def rules(self, policy: Policy, server: McpServer, profiles: Sequence[str]) -> tuple[Rule, ...]:
        """Every mcpAuthorization rule for ``server`` and an agent in ``profiles``: the
        top-level ones, the server's, the profiles'."""
        if policy is not self._rules_policy:  # a new policy: new rules
            self._rules_cache.clear()
            self._rules_policy = policy
        key = (server.name, tuple(profiles))
        rules = self._rules_cache.get(key)
        if rules is None:
            picked = [r for p in policy.agents if p.name in profiles for r in p.mcp_rules]
            rules = (*policy.mcp.rules, *server.rules, *picked)
            self._rules_cache[key] = rules
        return rules

    # -- vetting reports and operator actions -----------------------------------------

    def _on_report(self, r: Report) -> None:
        self.metrics.mcp_findings.labels(server=r.server, rule=r.rule, mode=r.mode.value).inc()
        self.metrics.mcp_pending.set(len(self.vetting.pins.pending()))
        action = {McpMode.ENFORCE: "hidden", McpMode.REPORT: "reported only (report mode)",
                  McpMode.OFF: "ignored"}[r.mode]
        log.warning("fleetgate: MCP server %r tool %r: %s in %s (%s): %s; sha256 %s",
                    r.server, r.tool, r.rule, r.field, r.detail, action, r.fingerprint[:12])

    def pending(self) -> list[Pending]:
        """Tool definitions waiting for an operator."""
        return self.vetting.pins.pending()

    def pinned(self) -> PinMap:
        """Approved definitions: server -> tool -> sha256."""
        return self.vetting.pins.pins()

    def pins_report(self) -> dict[str, Any]:
        return {"pins": self.pinned(),
                "pending": [{"server": p.server, "tool": p.tool, "state": p.state.value,
                             "sha256": p.fingerprint} for p in self.pending()]}

    def approve(self, server: str, tool: str) -> bool:
        """Pin the pending definition of ``tool`` (shown and callable again); False when
        nothing is pending for it."""
        ok = self.vetting.pins.approve(server, tool)
        self.metrics.mcp_pending.set(len(self.vetting.pins.pending()))
        if ok:
            log.warning("fleetgate: MCP tool %r of server %r approved by an operator", tool, server)
        return ok

    def _admin_approve(self, args: dict[str, Any]) -> dict[str, Any]:
        server, tool = args.get("server"), args.get("tool")
        if not isinstance(server, str) or not isinstance(tool, str):
            raise ValueError("send {\"server\": ..., \"tool\": ...}")
        if not self.approve(server, tool):
            raise ValueError(f"nothing pending for tool {tool!r} of server {server!r}")
        return {"approved": {"server": server, "tool": tool}}
