"""The one place the order of fleetgate's chain lives.

Cheap checks first, then identity, then the kill switch (so it wins even when rules are
wrong), the gateway's own endpoints (delegation: only a live parent reaches them), then the
LLM body facts the rules may use, the rules, MCP governance (it needs the rules' verdict and
the agent's profiles), metering; the decision log last so it sees denied flows too. Rate
limits take from their buckets once the rules and MCP allowed the flow, and settle after the
meter counted the answer. Upstream credentials are injected only into flows every check let
through; KillWatch, after the streaming addon, registers what will be forwarded and feeds
the kill-switch triggers.
"""

from __future__ import annotations

from typing import Any

from fleetgate.addons.ambiguity import AmbiguityGuard
from fleetgate.addons.authorization import HttpAuthorization
from fleetgate.addons.budgets import BudgetGuard
from fleetgate.addons.control import ControlEndpoint
from fleetgate.addons.credentials import CredentialInjector
from fleetgate.addons.decisions import DecisionLog
from fleetgate.addons.guard import ConnectionGuard
from fleetgate.addons.health import HealthEndpoint
from fleetgate.addons.identity import AgentIdentity
from fleetgate.addons.killswitch import KillSwitch, KillWatch
from fleetgate.addons.limits import RateLimiter
from fleetgate.addons.llm import LlmInspector, LlmMeter
from fleetgate.addons.mcp import McpGuard
from fleetgate.addons.request_bodies import RequestBodies
from fleetgate.addons.rules import PolicyStore
from fleetgate.addons.streaming import StreamPassthrough
from fleetgate.addons.timeouts import HeaderBounds, Timeouts
from fleetgate.addons.upstream_errors import UpstreamErrors
from fleetgate.llm.ledger import Ledger
from fleetgate.metrics import GatewayMetrics, HealthServer


def pipeline() -> list[Any]:
    metrics = GatewayMetrics()
    store = PolicyStore(metrics)
    health = HealthServer(metrics, store.status)
    admin = HealthServer(metrics, store.status, admin=True)
    ledger = Ledger()
    health.json_routes["/usage"] = ledger.snapshot
    identity = AgentIdentity(metrics)
    kill = KillSwitch(identity, metrics, admin)
    watch = KillWatch(kill, metrics)
    store.listeners.append(kill.on_policy)
    meter = LlmMeter(store, metrics, ledger)
    budgets = BudgetGuard(store, metrics, health)
    limiter = RateLimiter(store, metrics, health)
    meter.stream_guards += [budgets.stream_guard, limiter.stream_guard]
    budgets.watch = limiter.watch = meter.watched
    mcp = McpGuard(store, metrics, admin)
    return [
        ConnectionGuard(metrics),
        HeaderBounds(),  # 431 before anything reads the headers
        AmbiguityGuard(),  # before identity: a doubled Host or path trick needs no token to refuse
        store,
        identity,
        kill,
        ControlEndpoint(kill, identity, store, metrics),
        # requestheaders: bound the body, stream it when nothing reads it (runs the request
        # hook before the body then), refuse it early when a reader could not read it
        RequestBodies(store, mcp, kill),
        LlmInspector(store, metrics),
        HttpAuthorization(store, metrics, [health, admin]),
        mcp,
        meter,
        # after the meter: they settle their reservations from the usage the meter recorded.
        # Budgets first: a call a budget refuses takes nothing from the rate limits.
        budgets,
        limiter,
        CredentialInjector(store, metrics),
        StreamPassthrough(),
        watch,
        Timeouts(metrics),  # after every check and stream wrapper: times only what goes upstream
        HealthEndpoint(health, admin),
        # answers an allowed request whose upstream failed, before the log records its status
        UpstreamErrors(metrics),
        DecisionLog(store, metrics),
    ]
