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

from fleetgate.a2a.depth import DepthTracker
from fleetgate.addons.a2a import A2aForward, A2aGuard
from fleetgate.addons.ambiguity import AmbiguityGuard
from fleetgate.addons.approvals import ApprovalGate
from fleetgate.addons.authorization import HttpAuthorization
from fleetgate.addons.budgets import BudgetGuard
from fleetgate.addons.canary import CanaryRules
from fleetgate.addons.control import ControlEndpoint
from fleetgate.addons.credentials import CredentialInjector
from fleetgate.addons.decisions import DecisionLog
from fleetgate.addons.guard import ConnectionGuard
from fleetgate.addons.header_bounds import HeaderBounds
from fleetgate.addons.health import HealthEndpoint
from fleetgate.addons.identity import AgentIdentity
from fleetgate.addons.kill_commands import KillCommands
from fleetgate.addons.kill_flows import kill_service
from fleetgate.addons.killswitch import KillSwitch
from fleetgate.addons.killwatch import KillWatch
from fleetgate.addons.limits import RateLimiter
from fleetgate.addons.llm import LlmInspector
from fleetgate.addons.llm_meter import LlmMeter
from fleetgate.addons.mcp import McpGuard
from fleetgate.addons.mcp_answers import McpAnswers
from fleetgate.addons.mcp_operator import McpOperator
from fleetgate.addons.mcp_owners import McpSharedState
from fleetgate.addons.record import FlowRecorder
from fleetgate.addons.request_bodies import RequestBodies
from fleetgate.addons.reuse_port import ReusePort
from fleetgate.addons.rules import PolicyStore
from fleetgate.addons.state_backend import StateBackend
from fleetgate.addons.streaming import StreamPassthrough
from fleetgate.addons.timeouts import Timeouts
from fleetgate.addons.tracing import Tracing
from fleetgate.addons.upstream_errors import UpstreamErrors
from fleetgate.console import Console
from fleetgate.llm.ledger import Ledger
from fleetgate.metrics import GatewayMetrics
from fleetgate.runtime.approvals import ApprovalService
from fleetgate.runtime.canary import CanaryService
from fleetgate.runtime.identity import IdentityRegistry
from fleetgate.runtime.listeners import HttpListener
from fleetgate.runtime.mcp import McpService
from fleetgate.runtime.policy import PolicyService
from fleetgate.runtime.reservations import ReservationBook
from fleetgate.runtime.shared import SharedState
from fleetgate.runtime.usage import SharedUsage
from fleetgate.stores.spend import SqliteSpendStore
from fleetgate.telemetry.recent import RecentSessions


def pipeline() -> list[Any]:
    metrics = GatewayMetrics()
    policies = PolicyService(metrics)  # the running policy; PolicyStore loads and reloads it
    canary = CanaryService()  # fleetgate_canary_rules: judged beside the rules, not enforced
    shared = SharedState(metrics)  # Redis, when fleetgate_state names one (StateBackend)
    health = HttpListener(metrics, policies.status)
    admin = HttpListener(metrics, policies.status, admin=True)
    ledger = Ledger()
    health.routes.get("/usage", SharedUsage(ledger, shared).snapshot)  # Redis: the fleet's
    identities = IdentityRegistry()  # the token verifier, tunnels bound to identities
    kill = kill_service(metrics, identities, shared)  # kill decisions, live flows, sweeps
    policies.subscribe(kill.on_policy)
    policies.add_status("killswitch", kill.store_status)  # /healthz/ready state.killswitch
    policies.add_status("jwks", identities.jwks_status)  # the JWKS URL: unready until fetched
    # rate limits and budgets: reserved by the limiter and the budget guard, checked by the
    # meter while an answer streams, settled from the meter's usage
    # spend in memory until fleetgate_state_dir; rate buckets in Redis when shared
    book = ReservationBook(SqliteSpendStore(None), shared=shared)
    meter = LlmMeter(policies, metrics, ledger, book)
    budgets = BudgetGuard(policies, metrics, book, health, shared)
    limiter = RateLimiter(policies, metrics, book, health)
    mcp = McpService(metrics, admin.routes, shared)  # sessions, pins; /mcp/pins, /mcp/approve
    tracing = Tracing(policies, metrics)  # spans over OTLP, from the decision records
    decisions = DecisionLog(policies, metrics)
    approvals = ApprovalService(metrics, admin.routes)  # the queue; /v1/approvals
    approvals.emit.append(decisions.write_event)  # requests, decisions, escalations: audited
    decisions.listeners.append(tracing.on_record)
    recent = RecentSessions()  # recent families in memory: GET /v1/trace/<session>
    depths = DepthTracker()  # A2A hop depths, counted by the gateway (guard and forward)
    admin.routes.get("/v1/trace/{session}", recent.trace_view)
    admin.routes.mount("/console", Console(admin, health.routes))  # operator console (HTML)
    decisions.listeners.append(recent.add)
    return [
        ConnectionGuard(metrics),
        ReusePort(),  # fleetgate_reuse_port: set before the proxy listeners bind
        HeaderBounds(),  # 431 before anything reads the headers
        AmbiguityGuard(),  # before identity: a doubled Host or path trick needs no token to refuse
        StateBackend(shared, policies),  # before every addon that opens a store
        PolicyStore(metrics, policies),
        CanaryRules(canary, policies),
        AgentIdentity(metrics, identities),
        KillSwitch(kill, metrics),  # the gate
        KillCommands(kill, admin.routes),  # mitmweb commands, /v1/... admin API
        ControlEndpoint(kill, identities, policies, metrics),
        # requestheaders: bound the body, stream it when nothing reads it (runs the request
        # hook before the body then), refuse it early when a reader could not read it
        RequestBodies(policies, mcp, kill),
        LlmInspector(policies, metrics, canary),
        A2aGuard(policies, depths),  # A2A messages: strict body, a2a.* facts, counted depth
        HttpAuthorization(policies, metrics, [health, admin], canary),
        McpOperator(mcp),  # the MCP options and commands
        McpGuard(policies, metrics, mcp),  # requests
        McpAnswers(policies, metrics, mcp),  # answers
        McpSharedState(mcp),  # shared state: session owners and pins across gateways
        # every check allowed it: an action in an approval tier waits for people here,
        # before limits and budgets (they count what is really forwarded)
        ApprovalGate(policies, metrics, approvals, kill, shared, admin),
        meter,
        # after the meter: they settle their reservations from the usage the meter recorded.
        # Budgets first: a call a budget refuses takes nothing from the rate limits.
        budgets,
        limiter,
        CredentialInjector(policies, metrics),
        tracing,  # request: the span id of what is forwarded, traceparent, capture
        StreamPassthrough(),
        KillWatch(kill, metrics),  # live-flow registry, trigger observations
        Timeouts(metrics),  # after every check and stream wrapper: times only what goes upstream
        HealthEndpoint(health, admin),
        # answers an allowed request whose upstream failed, before the log records its status
        UpstreamErrors(metrics),
        # after every gate: record forwarded A2A messages, end them with their answer; any
        # refusal of an A2A request as a JSON-RPC error (before the log records its status)
        A2aForward(policies, depths),
        decisions,
        FlowRecorder(),  # fleetgate_record: a masked copy of the finished flow, for replay
    ]
