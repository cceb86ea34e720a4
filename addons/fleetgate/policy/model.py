"""The compiled policy: frozen values built once per (re)load, read by every request.

A :class:`Policy` is only ever built whole by :func:`fleetgate.policy.loader.load_policy`,
with every CEL expression compiled; the running gateway swaps one immutable object for
another, so a request never sees half a reload.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

from fleetgate.approvals.model import Tier
from fleetgate.celexpr import Expr
from fleetgate.kill.delegation import DelegationPolicy
from fleetgate.kill.model import Action
from fleetgate.kill.triggers import TriggerSpec
from fleetgate.limits.bucket import BucketSpec
from fleetgate.limits.budget import BudgetSpec
from fleetgate.llm.pricing import PricingTable
from fleetgate.llm.providers import ProviderTable
from fleetgate.mcp.mode import McpMode
from fleetgate.netaddr import HostPattern, IPNetwork
from fleetgate.policy.credentials import CredentialRoute
from fleetgate.policy.profile_index import ProfileIndex
from fleetgate.rule import Mode, Rule

__all__ = [
    "A2aAgent",
    "A2aSettings",
    "AgentProfile",
    "Budget",
    "McpServer",
    "McpSettings",
    "Policy",
    "RateLimit",
    "Revocations",
]


@dataclass(frozen=True)
class RateLimit:
    """A ``policies.localRateLimit`` entry. ``key`` (CEL, a string) picks the bucket; ``None``
    means one bucket per identity (agent id). ``when`` (CEL) limits it to some traffic."""

    id: str
    spec: BucketSpec
    key: Expr | None = None
    when: Expr | None = None
    source: str = ""
    mode: Mode = Mode.ENFORCE  # report: counts in its own bucket, reports, never refuses


@dataclass(frozen=True)
class Budget:
    """A ``budgets`` entry: spend per ``per`` (agent, role, session, fleet) or per CEL ``key``,
    for the LLM calls ``when`` selects."""

    id: str
    spec: BudgetSpec
    per: str = "agent"
    key: Expr | None = None
    when: Expr | None = None
    source: str = ""
    mode: Mode = Mode.ENFORCE  # report: spend is recorded and reported, never refused


@dataclass(frozen=True)
class Capture:
    """A profile's ``telemetry.capture``: which LLM contents its agents' spans carry
    (opt-in; secrets masked, each side cut at ``max_bytes``)."""

    prompts: bool = False
    completions: bool = False
    max_bytes: int = 4096


@dataclass(frozen=True)
class AgentProfile:
    """An ``agents[]`` entry: which identities it selects and what they may do."""

    name: str
    match: Expr
    egress: tuple[HostPattern, ...]
    rules: tuple[Rule, ...]
    source: str = ""
    # mcpAuthorization rules and allowed_tools/denied_tools of this profile: they apply
    # to MCP traffic of the agents this profile selects.
    mcp_rules: tuple[Rule, ...] = ()
    # policies.localRateLimit of this profile: every one must pass for its agents' flows
    limits: tuple[RateLimit, ...] = ()
    budgets: tuple[Budget, ...] = ()
    capture: Capture | None = None  # telemetry.capture: None, nothing captured
    # report: its rules, limits and budgets report, and so do its egress list and the
    # default deny when only report-mode profiles select the identity (policy.decide)
    mode: Mode = Mode.ENFORCE


@dataclass(frozen=True)
class McpServer:
    """An ``mcp.servers[]`` entry: an MCP endpoint and how its tools are vetted."""

    name: str
    hosts: tuple[HostPattern, ...]
    path: str = ""  # path prefix; empty: every path on the hosts
    poisoning: McpMode = McpMode.ENFORCE
    pins: McpMode = McpMode.ENFORCE
    rules: tuple[Rule, ...] = ()
    source: str = ""
    declared: bool = True  # False: found by its MCP headers, not listed in the rules
    mode: Mode = Mode.ENFORCE  # report: every rule of this server reports (rules carry it)

    def matches(self, host: str, port: int, path: str) -> bool:
        if not any(h.matches(host, port) for h in self.hosts):
            return False
        p = self.path.rstrip("/")
        return not p or path == p or path.startswith(p + "/") or path.startswith(p + "?")


@dataclass(frozen=True)
class McpSettings:
    """The ``mcp`` section and the top-level ``mcpAuthorization`` rules."""

    servers: tuple[McpServer, ...] = ()
    rules: tuple[Rule, ...] = ()  # top-level mcpAuthorization: every server, every agent
    reveal_denied: bool = False  # False: a denied tool answers as if it did not exist
    detect: bool = True  # undeclared servers are recognised by their MCP headers

    def server_for(self, host: str, port: int, path: str) -> McpServer | None:
        for s in self.servers:
            if s.matches(host, port, path):
                return s
        return None


# where an A2A agent serves its card (1.0 and 0.3; 0.2 used agent.json)
A2A_CARD_PATHS = ("/.well-known/agent-card.json", "/.well-known/agent.json")


@dataclass(frozen=True)
class A2aAgent:
    """An ``a2a.agents[]`` entry: an agent's id and the A2A endpoint it serves."""

    name: str  # the agent id its tokens carry (agent_id or sub)
    url: str
    host: HostPattern  # host:port of the endpoint
    path: str = ""  # path prefix of the JSON-RPC endpoint; empty: every path on the host
    source: str = ""

    def matches(self, host: str, port: int, path: str) -> bool:
        """The request goes to this agent's JSON-RPC endpoint (as McpServer.matches)."""
        if not self.host.matches(host, port):
            return False
        p = self.path.rstrip("/")
        return not p or path == p or path.startswith(p + "/") or path.startswith(p + "?")

    def card(self, host: str, port: int, path: str) -> bool:
        """The request asks for this agent's card: at the host's root or under its path."""
        if not self.host.matches(host, port):
            return False
        p = self.path.rstrip("/")
        return any(path in (c, p + c) for c in A2A_CARD_PATHS)


@dataclass(frozen=True)
class A2aSettings:
    """The ``a2a`` section: the agents that speak A2A and the deepest hop allowed."""

    agents: tuple[A2aAgent, ...] = ()
    max_depth: int = 5  # 0: unchecked

    def agent_for(self, host: str, port: int, path: str) -> A2aAgent | None:
        for a in self.agents:
            if a.matches(host, port, path) or a.card(host, port, path):
                return a
        return None


@dataclass(frozen=True)
class Revocations:
    """Identities refused outright, whatever else the policy says: by agent id, token id
    (``jti``), role (``agent_role``) or session (``session_id``/``sid``)."""

    agents: frozenset[str] = frozenset()
    tokens: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    sessions: frozenset[str] = frozenset()

    def reason(self, agent: str, jti: str | None, role: str | None = None,
               session: str | None = None) -> str | None:
        if agent in self.agents:
            return f"agent {agent!r} is revoked"
        if jti is not None and jti in self.tokens:
            return f"token {jti!r} is revoked"
        if role is not None and role in self.roles:
            return f"role {role!r} is revoked"
        if session is not None and session in self.sessions:
            return f"session {session!r} is revoked"
        return None


@dataclass(frozen=True)
class Policy:
    """The whole running policy."""

    revision: str
    files: tuple[str, ...]
    rules: tuple[Rule, ...]  # global authorization rules, for every agent
    agents: tuple[AgentProfile, ...]
    revoked: Revocations
    allow_private: tuple[IPNetwork, ...]
    # Optional parts of the CEL input some rule reads ("query", "headers", "llm", "a2a"): the rest
    # is never converted for the engine (see RequestFacts.to_cel).
    cel_inputs: frozenset[str] = frozenset({"query", "headers", "llm", "a2a"})
    # Whether LLM requests need llm.estimated_input_tokens (a pre-flight tiktoken count): some
    # expression reads it, a `type: tokens` limit or a budget reserves it. Decided once per load
    # (policy.loader); when False the LLM inspector leaves it 0 and never loads a tokenizer.
    needs_input_estimate: bool = True
    providers: ProviderTable = field(default_factory=ProviderTable)
    pricing: PricingTable = field(default_factory=PricingTable)
    mcp: McpSettings = field(default_factory=McpSettings)
    limits: tuple[RateLimit, ...] = ()  # top-level policies.localRateLimit: every agent
    budgets: tuple[Budget, ...] = ()  # top-level budgets
    kill_actions: tuple[Action, ...] = ()  # killswitch stop/pause/throttle (source rules)
    kill_triggers: tuple[TriggerSpec, ...] = ()  # killswitch.triggers and KILLSWITCH.md files
    delegation: DelegationPolicy = field(default_factory=DelegationPolicy)
    credentials: tuple[CredentialRoute, ...] = ()  # upstream credential routes, file order
    a2a: A2aSettings = field(default_factory=A2aSettings)  # A2A agents, hop depth
    approvals: tuple[Tier, ...] = ()  # approval tiers, file order: the first that matches
    # what `fleetgate rules check` prints and a reload logs: legal, probably not meant
    # (fleetgate.policy.lint), one "file:line at path: message" line each
    warnings: tuple[str, ...] = ()

    @cached_property
    def profile_index(self) -> ProfileIndex:
        """``agents`` indexed by what their ``match`` compares, so a decision evaluates only
        the selectors that can pick a token. Built by the loader, off the event loop; a
        policy made by ``dataclasses.replace`` builds its own on first use."""
        return ProfileIndex(self.agents)

    @cached_property
    def _positions(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, list[int]] = {}
        for i, profile in enumerate(self.agents):
            out.setdefault(profile.name, []).append(i)
        return {name: tuple(pos) for name, pos in out.items()}

    def named(self, names: Iterable[str]) -> list[AgentProfile]:
        """The profiles called ``names`` (a decision's ``profiles``), in file order: what
        ``[p for p in agents if p.name in names]`` gives, without walking 1,000 profiles
        per request."""
        positions = self._positions
        return [self.agents[i] for i in sorted(i for n in set(names) for i in positions.get(n, ()))]
