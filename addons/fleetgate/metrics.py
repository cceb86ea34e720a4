"""Prometheus metrics: one registry per gateway instance and the collectors in it.

The registry is per gateway instance (not prometheus_client's global one) so that a script
reload or a test that builds two pipelines never trips over duplicate collectors. It is
served by :mod:`fleetgate.runtime.listeners` on its own listener.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fleetgate.celexpr import over_budget_count

__all__ = ["GatewayMetrics", "LabelBudget"]


class LabelBudget:
    """Bounded label values: the first ``limit`` distinct values are kept, the rest become
    ``other``. Agent ids and request model names come from clients; unbounded, they would
    let any agent blow up the metrics' memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        v = value or ""
        with self._lock:
            if v in self.seen:
                return v
            if len(self.seen) < self.limit:
                self.seen.add(v)
                return v
        return "other"


class GatewayMetrics:
    """All fleetgate metrics, registered on one private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fleetgate_requests", "Requests judged by fleetgate, by agent, decision and rule.",
            ["agent", "role", "decision", "rule"], registry=r)
        self.decision_seconds = Histogram(
            "fleetgate_decision_seconds", "Time spent deciding one request (policy evaluation).",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05), registry=r)
        self.identity_failures = Counter(
            "fleetgate_identity_failures", "Proxy credentials refused, by reason code.",
            ["code"], registry=r)
        self.jwks_fetches = Counter(
            "fleetgate_jwks_fetches", "Fetches of the JWKS URL (fleetgate_jwks_url), by result.",
            ["result"], registry=r)
        self.jwks_last_success = Gauge(
            "fleetgate_jwks_last_success_timestamp_seconds",
            "When the JWKS URL was last fetched successfully (Unix time; 0: never).", registry=r)
        self.jwks_keys = Gauge(
            "fleetgate_jwks_keys", "Keys in the last good JWKS fetched from the URL.", registry=r)
        self.jwks_usable = Gauge(
            "fleetgate_jwks_usable", "1 while the JWKS URL's keys are fresh enough to use "
            "(fleetgate_jwks_max_stale), 0 while its tokens are refused; 1 without a URL.",
            registry=r)
        self.jwks_usable.set(1)
        self.reloads = Counter(
            "fleetgate_policy_reloads", "Rules (re)load attempts by result.", ["result"],
            registry=r)
        self.policy_valid = Gauge(
            "fleetgate_policy_last_reload_ok",
            "1 if the last rules load succeeded, 0 if it failed and an older policy runs.",
            registry=r)
        self.policy_loaded = Gauge(
            "fleetgate_policy_loaded", "1 while a valid policy is loaded (readiness).",
            registry=r)
        self.policy_revision = Gauge(
            "fleetgate_policy_revision_info", "The running policy revision (value is always 1).",
            ["revision"], registry=r)
        self.flows_cut = Counter(
            "fleetgate_flows_cut", "In-flight flows cut by fleetgate, by rule.", ["rule"],
            registry=r)
        self.upstream_failures = Counter(
            "fleetgate_upstream_failures", "Allowed requests whose upstream could not be reached "
            "(answered by the gateway in the client's format), by rule.", ["rule"], registry=r)
        self.connections_refused = Counter(
            "fleetgate_connections_refused", "Connections refused before any request, by reason.",
            ["reason"], registry=r)
        self.kill_actions = Counter(
            "fleetgate_kill_actions", "Kill-switch actions applied (stop, pause, throttle) and "
            "lifted, by verb, scope kind, source (operator, rules, trigger) and event.",
            ["verb", "scope", "source", "event"], registry=r)
        self.kill_flows_cut = Counter(
            "fleetgate_kill_flows_cut", "In-flight flows and tunnels a kill-switch stop cut, by "
            "scope kind and source of the stop.", ["scope", "source"], registry=r)
        self.kill_refused = Counter(
            "fleetgate_kill_requests_refused", "Requests refused by the kill switch, by verb "
            "(stop: 503, pause: waited then 503, throttle: 429).", ["verb"], registry=r)
        self.kill_cut_seconds = Histogram(
            "fleetgate_kill_cut_seconds", "Time from a stop being issued to the last affected "
            "flow being cut.", buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                        0.25, 1), registry=r)
        self.kill_in_force = Gauge(
            "fleetgate_kill_actions_in_force", "Kill-switch actions in force, by verb.", ["verb"],
            registry=r)
        self.kill_sessions = Gauge(
            "fleetgate_kill_sessions", "Sessions in the session graph, by state (live, stopped, "
            "paused, throttled).", ["state"], registry=r)
        self.delegations = Counter(
            "fleetgate_delegations", "Child tokens asked for at the delegation endpoint, by "
            "result (issued or the refusal code).", ["result"], registry=r)

        # OpenTelemetry GenAI semantic conventions, as Prometheus names (dots -> underscores).
        genai = ["gen_ai_provider_name", "gen_ai_request_model", "gen_ai_operation_name"]
        self.genai_tokens = Counter(
            "fleetgate_gen_ai_client_token_usage",
            "LLM tokens by type (input includes cached; output includes reasoning), provider, "
            "model, operation, agent and role. 'estimated' is true when the provider reported "
            "no usage and fleetgate counted the streamed text.",
            ["gen_ai_token_type", *genai, "agent", "role", "estimated"], registry=r)
        self.genai_token_histogram = Histogram(
            "gen_ai_client_token_usage", "Tokens per LLM call (OTel gen_ai.client.token.usage).",
            ["gen_ai_token_type", *genai],
            buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304),
            registry=r)
        self.genai_cost = Counter(
            "fleetgate_gen_ai_cost_usd", "LLM spend in USD from the pricing table.",
            [*genai, "agent", "role"], registry=r)
        self.genai_calls = Counter(
            "fleetgate_gen_ai_calls", "LLM calls by outcome, usage source and pricing status.",
            [*genai, "agent", "role", "outcome", "usage", "priced"], registry=r)
        self.genai_duration = Histogram(
            "gen_ai_client_operation_duration_seconds", "LLM call duration, request to last byte.",
            genai, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r)
        self.genai_ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from the end of the request to the first response byte of a streamed call.",
            genai, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.llm_refused = Counter(
            "fleetgate_llm_requests_refused", "LLM request bodies refused before any rule ran.",
            ["reason"], registry=r)

        self.mcp_messages = Counter(
            "fleetgate_mcp_messages",
            "MCP requests and notifications judged, by server, method, tool (or prompt / "
            "resource), decision, rule and agent.",
            ["server", "method", "tool", "decision", "rule", "agent"], registry=r)
        self.mcp_hidden = Counter(
            "fleetgate_mcp_list_entries_hidden",
            "Entries removed from MCP list results, by server, list kind and reason "
            "(policy, poisoning, pin).", ["server", "kind", "reason"], registry=r)
        self.mcp_findings = Counter(
            "fleetgate_mcp_tool_findings",
            "Tool-poisoning findings and unapproved tool definitions, once per definition, by "
            "server, rule and mode.", ["server", "rule", "mode"], registry=r)
        self.mcp_refused = Counter(
            "fleetgate_mcp_refused",
            "MCP bodies and streams refused before any rule ran, by reason.", ["reason"],
            registry=r)
        self.mcp_pending = Gauge(
            "fleetgate_mcp_tools_pending_approval",
            "Tools (new or changed definitions) waiting for an operator's approval.", registry=r)

        self.ratelimit_level = Gauge(
            "fleetgate_ratelimit_bucket_level",
            "Tokens left in a localRateLimit bucket after its last use, by limit and key (key "
            "bounded to 1,000 values).", ["limit", "key"], registry=r)
        self.ratelimit_rejections = Counter(
            "fleetgate_ratelimit_rejections",
            "Requests refused by a localRateLimit, by limit id.", ["limit"], registry=r)

        self.budget_rejections = Counter(
            "fleetgate_budget_rejections", "LLM calls refused by a hard budget, by budget id.",
            ["budget"], registry=r)
        self.budget_soft = Counter(
            "fleetgate_budget_soft_exceeded",
            "Times a soft budget was crossed (once per crossing), by budget id.", ["budget"],
            registry=r)
        self.budget_spend_usd = Gauge(
            "fleetgate_budget_spend_usd", "Spend in the current budget window, by budget and key "
            "(key bounded to 1,000 values).", ["budget", "key"], registry=r)
        self.budget_remaining_usd = Gauge(
            "fleetgate_budget_remaining_usd", "Hard USD limit minus spend in the current window, "
            "by budget and key.", ["budget", "key"], registry=r)
        self.budget_remaining_tokens = Gauge(
            "fleetgate_budget_remaining_tokens", "Hard token limit minus spend in the current "
            "window, by budget and key.", ["budget", "key"], registry=r)
        self.budget_spend_tokens = Gauge(
            "fleetgate_budget_spend_tokens", "Tokens in the current budget window, by budget and "
            "key.", ["budget", "key"], registry=r)

        self.credentials_injected = Counter(
            "fleetgate_credentials_injected", "Requests given an upstream credential by the "
            "gateway, by credentials route id.", ["route"], registry=r)
        self.credentials_unavailable = Counter(
            "fleetgate_credentials_unavailable", "Requests refused (503) because their "
            "credentials route's secret could not be read, by route id.", ["route"], registry=r)

        self.audit_write_errors = Counter(
            "fleetgate_audit_write_errors", "Decision log lines that could not be written (a "
            "target failed, or the writer's queue was full).", registry=r)
        self.otel_enabled = Gauge(
            "fleetgate_otel_export_enabled", "1 when traces (and metrics) are exported over "
            "OTLP (fleetgate_otel_endpoint or OTEL_EXPORTER_OTLP_ENDPOINT).", registry=r)
        self.otel_spans = Counter(
            "fleetgate_otel_spans", "Spans handed to the OTLP exporter, by result: exported, "
            "failed (the collector did not take them), dropped (the export queue was full: "
            "a slow or dead collector never slows agents).", ["result"], registry=r)
        self.observer_errors = Counter(
            "fleetgate_observer_errors", "Decision records an observer (trace export, the "
            "recent-sessions store) failed to take; the record itself was still written.",
            ["observer"], registry=r)
        self.audit_log_ok = Gauge(
            "fleetgate_audit_log_ok", "1 while the last decision log line was written, 0 "
            "after a failed one (with fleetgate_audit_required calls are refused then).",
            registry=r)

        self.state_errors = Counter(
            "fleetgate_state_errors", "State store operations that failed (disk full, read-only, "
            "I/O error, locked past the wait, writer queue full), by store and operation.",
            ["store", "op"], registry=r)
        self.state_ok = Gauge(
            "fleetgate_state_ok", "1 while the state store's writes work, 0 while they fail "
            "(calls that depend on it are refused then).", ["store"], registry=r)

        # rule cost (celexpr): evaluations over the runtime budget, denied; read at scrape
        self.rule_over_budget = Gauge(
            "fleetgate_rule_evaluations_over_budget", "Rule evaluations that took longer than "
            "the runtime budget since start (each denied its request; see the rules reference).",
            registry=r)
        self.rule_over_budget.set_function(lambda: float(over_budget_count()))

        self.budget_lost_in_crash = Counter(
            "fleetgate_budget_lost_in_crash", "Reservations found open at startup (calls in "
            "flight when the gateway died), charged their reserved amount, by budget.",
            ["budget"], registry=r)

        self.ratelimit_state_refusals = Counter(
            "fleetgate_ratelimit_state_refusals", "Requests refused (503 ratelimit.state) "
            "because the shared state (Redis) could not check their rate limits, by the first "
            "limit.", ["limit"], registry=r)

        # approvals (runtime/approvals.py): the queue of actions held for people
        self.approvals = Counter(
            "fleetgate_approvals", "Approval events by tier: requested, vote (one of several "
            "needed), approved, denied, consumed (the approved retry forwarded), escalated, held (a request "
            "held open), answered_pending (the agent told to retry later).",
            ["tier", "event"], registry=r)
        self.approvals_pending = Gauge(
            "fleetgate_approvals_pending", "Approvals waiting for people (as of the last "
            "escalation sweep or change on this gateway).", registry=r)
        self.approval_webhooks = Counter(
            "fleetgate_approval_webhooks", "Approval webhook deliveries: delivered, retried, "
            "failed (given up), dropped (queue full).", ["outcome"], registry=r)

        # report mode and the canary policy (addons/report_mode.py, addons/canary.py)
        self.would_deny = Counter(
            "fleetgate_would_deny", "Denials a report-mode element (rule, profile, limit, "
            "budget, MCP server, trigger) would have enforced, by its id; the flow went on.",
            ["rule"], registry=r)
        self.canary_disagreements = Counter(
            "fleetgate_canary_disagreements", "Requests the canary policy "
            "(fleetgate_canary_rules) judged otherwise than the enforcing policy, by the rule "
            "that decided in the canary.", ["rule"], registry=r)

    def set_revision(self, revision: str) -> None:
        self.policy_revision.clear()
        self.policy_revision.labels(revision=revision).set(1)
