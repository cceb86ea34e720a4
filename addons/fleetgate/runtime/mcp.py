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
- which server a request goes to, and the rules that apply there (cached per policy), and
  the list verdicts of those rules (:class:`fleetgate.mcp.listcache.ListVerdicts`).

Operators reach it through ``/mcp/pins`` (GET) and ``/mcp/approve`` (POST) on the
:class:`~fleetgate.runtime.listeners.Routes` table handed in, and through the addon's
commands. No mitmproxy import: callers pass the request's facts.

With shared state (``fleetgate_state`` a Redis URL, :meth:`use_shared`), pins live in Redis
(:class:`fleetgate.stores.redis_mcp.RedisPinStore`, synced every
:data:`PIN_SYNC` seconds by :meth:`sync_pins`), the pending list is the fleet's (an operator
approves on any gateway what another one saw), and session owners are checked in Redis
(:meth:`check_owner`) so a session opened through one replica is its agent's on all.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import redis

from fleetgate.errors import StateError
from fleetgate.mcp.exchange import looks_like_mcp
from fleetgate.mcp.listcache import AnswerCache, ListVerdicts
from fleetgate.mcp.mode import McpMode
from fleetgate.mcp.pins import Pending, PinMap, Pins
from fleetgate.mcp.sessions import Sessions
from fleetgate.mcp.vetting import Report, Vetting
from fleetgate.metrics import GatewayMetrics
from fleetgate.policy.model import McpServer, Policy
from fleetgate.rule import Rule
from fleetgate.runtime.listeners import Routes
from fleetgate.runtime.shared import SharedState
from fleetgate.stores.pins import PinStore, open_pins
from fleetgate.stores.redis_mcp import RedisPinStore, RedisSessionOwners, pin_map

__all__ = ["PIN_SYNC", "McpService", "OwnerUnknown"]

PIN_SYNC = 2.0  # seconds between reads of the shared pins (approvals elsewhere reach us)
CONFIRMED = 100_000  # (server, session) owners confirmed in Redis, remembered here


class OwnerUnknown(StateError):
    """The shared session owner could not be read: the request is refused (fail closed)."""


log = logging.getLogger("fleetgate.mcp")


class McpService:
    def __init__(self, metrics: GatewayMetrics, routes: Routes | None = None,
                 shared: SharedState | None = None) -> None:
        self.metrics = metrics
        self.shared = shared
        self.shared_pins: RedisPinStore | None = None
        self.owners: RedisSessionOwners | None = None
        self._confirmed: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._pins_loaded = True
        self._trust_first_use = True
        self.sessions = Sessions()
        self.vetting = Vetting(Pins(), self._on_report)
        self._rules_cache: dict[tuple[str, tuple[str, ...]], tuple[Rule, ...]] = {}
        self._rules_policy: Policy | None = None
        # list verdicts, dropped with the rules when the policy changes (a reload)
        self.list_verdicts = ListVerdicts()
        self.answers = AnswerCache()  # whole rewritten answers, by their bytes
        if routes is not None:
            routes.get("/mcp/pins", self.pins_report)
            routes.post("/mcp/approve", self._admin_approve)

    def use_pins(self, store: PinStore | None, trust_on_first_use: bool) -> None:
        """Vet with the pins ``store`` holds (in memory only: ``None``) from now on. Raises
        ``OSError``/``ValueError`` when the store cannot be read; the old pins stay then."""
        self.vetting = Vetting(open_pins(store, trust_on_first_use), self._on_report)
        self.shared_pins, self.owners = None, None

    def use_shared(self, trust_on_first_use: bool) -> None:
        """Keep pins, the pending list and session owners in the shared Redis state. Raises
        ``OSError`` when the pins cannot be read (the gateway does not start vetting against
        an empty set)."""
        shared = self.shared
        assert shared is not None and shared.enabled
        store = RedisPinStore(shared.sync_client(), shared.key, self._report_shared)
        self._trust_first_use = trust_on_first_use
        try:
            pins = Pins(store.load(), trust_on_first_use, store.save, store.add_pending)
            self._pins_loaded = True
        except OSError as exc:
            # Redis is down at startup: vet against no pins and trust nothing on first sight
            # (every tool waits) until the sync task reads the fleet's pins
            log.error("fleetgate: %s; every MCP tool is hidden until the shared pins are read", exc)
            pins = Pins({}, False, store.save, store.add_pending)
            self._pins_loaded = False
        old, self.shared_pins = self.shared_pins, store
        self.vetting = Vetting(pins, self._on_report)
        self.owners = RedisSessionOwners(shared.key)
        self._confirmed.clear()
        if old is not None:
            old.close()

    def _report_shared(self, op: str, exc: BaseException | None) -> None:
        if self.shared is None:
            return
        if exc is None:
            self.shared.worked()
        else:
            self.shared.failed(f"mcp.{op}", exc)

    async def sync_pins(self, wait: float = 5.0) -> bool:
        """Adopt the pins other gateways saved (periodically, and before a ``tools/list`` is
        forwarded); False when they could not be read within ``wait`` seconds."""
        store, shared = self.shared_pins, self.shared
        if store is None or shared is None:
            return True
        try:
            raw = await asyncio.wait_for(
                shared.async_client().hgetall(store.pins_key), wait)  # type: ignore[arg-type]
        except (redis.RedisError, OSError, TimeoutError) as exc:
            shared.failed("mcp.pins.sync", exc if str(exc) else f"no answer within {wait:g}s")
            return False
        shared.worked()
        pins = pin_map(raw)
        store.remember(pins)
        if not self._pins_loaded:  # the first read since a startup without Redis
            self.vetting = Vetting(Pins(pins, self._trust_first_use, store.save,
                                        store.add_pending), self._on_report)
            self._pins_loaded = True
            log.warning("fleetgate: the fleet's MCP pins were read from Redis; tools are vetted "
                        "against them")
        else:
            self.vetting.pins.adopt(pins)
        self.metrics.mcp_pending.set(len(self.vetting.pins.pending()))
        return True

    async def check_owner(self, server: str, sid: str, agent: str, wait: float) -> str | None:
        """Shared state only: the reason to refuse when another agent owns the session
        (``None``: it is ``agent``'s). Raises :class:`OwnerUnknown` when Redis cannot say
        within ``wait`` seconds. Once confirmed, a session costs no round trip here."""
        owners, shared = self.owners, self.shared
        if owners is None or shared is None:
            return None
        key = (server, sid)
        if self._confirmed.get(key) == agent:
            self._confirmed.move_to_end(key)
            return None
        try:
            owner = await asyncio.wait_for(
                owners.claim(shared.async_client(), server, sid, agent), wait)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            shared.failed("mcp.owner", exc if str(exc) else f"no answer within {wait:g}s")
            raise OwnerUnknown(f"the owner of MCP session {sid!r} cannot be checked in the "
                               f"shared state ({type(exc).__name__}: {exc})") from None
        shared.worked()
        if owner != agent:
            self._confirmed.pop(key, None)
            self.sessions.forget(server, sid)  # bound to this agent here by mistake
            return f"MCP session {sid!r} belongs to another agent"
        self._confirmed[key] = agent
        if len(self._confirmed) > CONFIRMED:
            self._confirmed.popitem(last=False)
        return None

    async def forget_owner(self, server: str, sid: str, agent: str) -> None:
        """The session was ended by its owner (DELETE)."""
        self._confirmed.pop((server, sid), None)
        owners, shared = self.owners, self.shared
        if owners is None or shared is None:
            return
        try:
            await owners.forget(shared.async_client(), server, sid, agent)
        except (redis.RedisError, OSError) as exc:
            shared.failed("mcp.owner", exc)  # it expires with its TTL

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
            self.list_verdicts.clear()
            self.answers.clear()
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
        """Tool definitions waiting for an operator (the fleet's, with shared state)."""
        if self.shared_pins is not None:
            return self.shared_pins.pending()
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
        store = self.shared_pins
        if store is not None:  # the fleet's pending list: another gateway may have seen it
            shared_p = store.take_pending(server, tool)
            if not ok and shared_p is not None:
                self.vetting.pins.pin(server, tool, shared_p.fingerprint)
                ok = True
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
