"""One request judged offline, by the functions the gateway's addons call, in their order.

The chain a live request goes through (:func:`fleetgate.addons.pipeline.pipeline`), minus the
sockets: identity (the claims are given, already verified) -> the LLM body's ``llm.*`` facts
(``LlmInspector``) -> the rules (:func:`fleetgate.policy.decide.decide`,
``HttpAuthorization``) -> MCP governance (:func:`fleetgate.mcp.engine.judge_request`,
``McpGuard``) -> the approval tier (:func:`fleetgate.approvals.model.select_tier`,
``ApprovalGate``) -> budgets (``BudgetGuard``) -> rate limits (``RateLimiter``). Budgets come
before rate limits, as in the gateway: a call a budget refuses takes nothing from a bucket.

An :class:`Evaluator` keeps the state a sequence of calls builds up (token buckets, spend) on
its own clock (:meth:`Evaluator.advance`), so "the 6th call in a minute gets 429" is a test,
not a wait. What is not judged offline (it needs a live exchange or the gateway's stores):
the address a name resolves to (``destinations.connect``), MCP tool pins and poisoning
vetting (they need the servers' tool definitions over time), sessions' owners, held
approvals (a tier is reported, never waited for), the kill switch's state, and streaming
overruns. Those have their own tests; this module says so rather than guess. Report-mode
budgets and rate limits are left out, as at the gateway they never refuse (what they would
refuse is not reported offline yet).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from fleetgate.a2a.facts import cel_view
from fleetgate.approvals.model import select_tier
from fleetgate.bodies import BodyError, decode_body, parse_json
from fleetgate.celexpr import Activation, CelError
from fleetgate.errors import ConfigError
from fleetgate.limits.budget import Amount, Ledger
from fleetgate.llm.request import parse_request
from fleetgate.llm.usage import Usage
from fleetgate.mcp.engine import McpScope, check_headers, judge_request, rewrite_message
from fleetgate.mcp.exchange import looks_like_mcp
from fleetgate.mcp.facts import LIST_METHODS, base_facts, mcp_facts
from fleetgate.mcp.messages import McpError, parse_messages
from fleetgate.normalize import RequestFacts, request_facts
from fleetgate.policy.decide import NOT_LLM, decide
from fleetgate.policy.model import McpServer, Policy
from fleetgate.rule import Mode
from fleetgate.runtime.reservations_journal import SpendMirror
from fleetgate.runtime.reservations_rate import RateReservations, applicable_limits
from fleetgate.runtime.reservations_spend import applicable_budgets, budget_key, resets_at

__all__ = ["DEFAULT_MAX_TOKENS", "DEFAULT_START", "Evaluator", "OfflineRequest",
           "RequestSpecError", "Verdict", "json_body"]

DEFAULT_PORTS = {"https": 443, "http": 80}
# fleetgate_limits_default_max_tokens' default: what a call without max_tokens reserves
DEFAULT_MAX_TOKENS = 4096
# Where an evaluator's clock starts: 2026-01-01T00:00:00Z, a fixed point so that daily and
# monthly budget windows in tests do not depend on the day they run.
DEFAULT_START = 1767225600.0
MAX_BODY = 16 * 1024 * 1024  # the gateway's default inspection limits (LLM and MCP bodies)


class RequestSpecError(ConfigError, ValueError):
    """A request given to the offline evaluator cannot be a request (a URL without a scheme
    or host, a port out of range): the test case or flow is wrong, not the policy."""


@dataclass(frozen=True)
class OfflineRequest:
    """A request as the gateway would see it: the target as sent (normalised like live
    traffic by :func:`fleetgate.normalize.request_facts`), headers, the raw body."""

    method: str
    scheme: str
    host: str
    port: int
    target: str  # path and query as sent
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None

    @classmethod
    def from_url(cls, method: str, url: str, headers: Mapping[str, Any] | None = None,
                 body: bytes | None = None) -> OfflineRequest:
        """Keep the host exactly as written (``urlsplit``'s ``.hostname`` would lower-case it
        for us), so a case written with ``API.Example.COM.`` checks the gateway's
        normalisation, not the test's."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS or not parts.netloc:
            raise RequestSpecError(f"{url!r} is not an http:// or https:// URL with a host")
        netloc = parts.netloc.rpartition("@")[2]
        try:
            port = parts.port if parts.port is not None else DEFAULT_PORTS[scheme]
        except ValueError as exc:
            raise RequestSpecError(f"{url!r}: {exc}") from None
        if netloc.startswith("["):
            host = netloc[: netloc.index("]") + 1]
        else:
            host = netloc.rsplit(":", 1)[0] if parts.port is not None else netloc
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        hdrs = tuple((str(k), str(v)) for k, v in (headers or {}).items())
        return cls(str(method), scheme, host, port, target, hdrs, body)

    @property
    def url(self) -> str:
        default = DEFAULT_PORTS.get(self.scheme)
        port = "" if self.port == default else f":{self.port}"
        return f"{self.scheme}://{self.host}{port}{self.target}"

    def header(self, name: str) -> str:
        low = name.lower()
        return next((v for k, v in self.headers if k.lower() == low), "")

    def facts(self) -> RequestFacts:
        return request_facts(self.method, self.scheme, self.host, self.port, self.target,
                             list(self.headers))


@dataclass(frozen=True)
class Verdict:
    """What the gateway would do with one request.

    ``rule`` names what decided (a rule id, ``default-deny``, a budget or limit id...); for
    an MCP message it is the MCP rule that judged the (first denied, else first) message,
    and ``http_rule`` is the HTTP rule that let the request reach MCP governance. ``stage``
    says which step decided: ``identity``, ``llm``, ``rules``, ``mcp``, ``approval``,
    ``budget``, ``limit`` (or ``allowed``: every step let it through)."""

    allow: bool
    rule: str
    reason: str
    status: int
    stage: str
    http_rule: str = ""
    profiles: tuple[str, ...] = ()
    approval: str | None = None  # the approval tier that applies (None: none)
    approvers: int = 0  # people that tier needs (0: logged, not held)
    mcp: tuple[dict[str, Any], ...] = ()  # each judged MCP message: method, target, allow, rule
    visible: tuple[str, ...] | None = None  # a list answer's entries the agent would see
    hidden: tuple[str, ...] = ()
    limits: tuple[str, ...] = ()  # the rate limits and budgets it took from

    @property
    def held(self) -> bool:
        """Allowed by every check, but waiting for people (an approval tier with approvers)."""
        return self.allow and self.approvers > 0

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"allow": self.allow, "rule": self.rule, "status": self.status,
                             "stage": self.stage, "reason": self.reason}
        if self.http_rule and self.http_rule != self.rule:
            d["http_rule"] = self.http_rule
        if self.approval:
            d["approval"] = self.approval
        if self.visible is not None:
            d["visible"] = list(self.visible)
        return d


def _deny(stage: str, rule: str, reason: str, status: int, **kw: Any) -> Verdict:
    return Verdict(False, rule, reason, status, stage, **kw)


@dataclass
class _Judged:
    """What the steps before approvals found out, for the later ones."""

    claims: Mapping[str, Any]
    req: OfflineRequest
    facts: RequestFacts
    llm: dict[str, Any] | None
    profiles: tuple[str, ...]
    http_rule: str
    mcp_facts: dict[str, Any] | None = None
    mcp_variants: list[dict[str, Any]] = field(default_factory=list)
    mcp_records: tuple[dict[str, Any], ...] = ()
    scope: McpScope | None = None
    methods: dict[str, str] = field(default_factory=dict)


class Evaluator:
    """Judges requests against one policy, keeping rate buckets and spend between calls.

    ``start`` is the clock's first reading (epoch seconds; budgets' daily and monthly
    windows are computed from it); :meth:`advance` moves it. One evaluator per independent
    sequence: replaying unrelated flows through one shares their buckets, as one gateway
    would."""

    def __init__(self, policy: Policy, *, start: float = DEFAULT_START,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.policy = policy
        self.now = start
        self.default_max_tokens = default_max_tokens
        self.rates = RateReservations(lambda: self.now)
        self.ledger = Ledger(SpendMirror())
        self._ids = itertools.count(1)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self.now += seconds

    # -- the chain ------------------------------------------------------------------------

    def evaluate(self, claims: Mapping[str, Any] | None, req: OfflineRequest, *,
                 usage: Usage | None = None,
                 mcp_answer: Any = None) -> Verdict:
        """Judge ``req`` sent with ``claims`` (``None``: no verified identity). ``usage``:
        what an allowed LLM call used (settles its reservations; without it, what was
        reserved is charged, as the gateway does for a call it sent but could not meter).
        ``mcp_answer``: the MCP server's answer (a list result is filtered for the agent:
        :attr:`Verdict.visible`)."""
        if claims is None:
            return _deny("identity", "identity.missing", "request carries no verified identity",
                         407)
        facts = req.facts()
        llm, refusal = self._llm(req, facts)
        if refusal is not None:
            return refusal
        decision = decide(self.policy, claims, facts, llm)
        if not decision.allow:
            return _deny("rules", decision.rule, decision.reason, decision.status,
                         http_rule=decision.rule, profiles=decision.profiles)
        j = _Judged(claims, req, facts, llm, decision.profiles, decision.rule)
        verdict = self._mcp(j)
        if verdict is not None:
            return verdict
        return self._admit(j, decision.reason, usage, mcp_answer)

    def _llm(self, req: OfflineRequest,
             facts: RequestFacts) -> tuple[dict[str, Any] | None, Verdict | None]:
        """``llm.*`` as ``LlmInspector`` sets them: a POST on an LLM provider's route."""
        route = self.policy.providers.route(facts.host, facts.port, facts.path)
        if route is None or facts.method != "POST":
            return None, None
        try:
            raw = decode_body(req.body or b"", req.header("content-encoding"), MAX_BODY)
            parsed = parse_request(route, parse_json(raw), facts.path,
                                   estimate=self.policy.needs_input_estimate)
        except BodyError as exc:
            return None, _deny("llm", "llm.body", exc.message, exc.status)
        return {"is_llm": True, **parsed.to_cel()}, None

    def _server(self, j: _Judged) -> McpServer | None:
        f = j.facts
        server = self.policy.mcp.server_for(f.host, f.port, f.path)
        if server is not None or not self.policy.mcp.detect or j.llm:
            return server
        name = f.host if f.port == 443 else f"{f.host}:{f.port}"
        headers = {k.lower(): v for k, v in j.req.headers}
        if looks_like_mcp(j.req.method, headers, j.req.target, lambda sid: False):
            return McpServer(name=name, hosts=(), declared=False)
        return None

    def _mcp(self, j: _Judged) -> Verdict | None:
        """MCP governance of a POST to an MCP server; a denial, or ``None`` to go on."""
        server = self._server(j)
        if server is None or j.req.method.upper() != "POST":
            return None
        sid = j.req.header("mcp-session-id") or None
        f = j.facts
        scope = McpScope(
            claims=j.claims, request=f.to_cel(self.policy.cel_inputs), server=server.name,
            host=f.host, path=f.path, session_id=sid,
            rules=self._mcp_rules(server, j.profiles),
            reveal_denied=self.policy.mcp.reveal_denied, poisoning=server.poisoning,
            pins=server.pins, vetting=None)
        j.scope = scope
        try:
            raw = decode_body(j.req.body or b"", j.req.header("content-encoding"), MAX_BODY)
            messages, batch = parse_messages(parse_json(raw))
            check_headers({k.lower(): v for k, v in j.req.headers}, messages, batch)
        except BodyError as exc:
            if not server.declared:
                return None  # not MCP after all: only the HTTP rules apply
            return _deny("mcp", "mcp.body", exc.message, exc.status, http_rule=j.http_rule,
                         profiles=j.profiles)
        except McpError as exc:
            if not server.declared:
                return None
            rule = "mcp.header-mismatch" if exc.code == -32020 else "mcp.body"
            return _deny("mcp", rule, exc.message, 400, http_rule=j.http_rule,
                         profiles=j.profiles)
        plan = judge_request(messages, batch, scope, answer_directly=True)
        j.mcp_records = tuple(r.as_dict() for r in plan.records)
        j.mcp_facts = plan.facts
        j.methods = dict(plan.methods)
        j.mcp_variants = [mcp_facts(m, j.req.host, j.req.target, sid, server.name)
                          for m in messages if m.method]
        denied = plan.denied
        if denied:
            first = denied[0]
            # fully denied: answered at once (JSON-RPC error in a 200); partly: the denied
            # messages reach the server as pings and their answers are replaced
            return _deny("mcp", first.rule, first.reason, plan.answer_status or 200,
                         http_rule=j.http_rule, profiles=j.profiles, mcp=j.mcp_records)
        return None

    def _mcp_rules(self, server: McpServer, profiles: Sequence[str]) -> tuple[Any, ...]:
        """``McpService.rules``: the top-level rules, the server's, the profiles'."""
        picked = [r for p in self.policy.agents if p.name in profiles for r in p.mcp_rules]
        return (*self.policy.mcp.rules, *server.rules, *picked)

    def _activation(self, j: _Judged) -> Activation:
        """``flow_activation``: what limits, budgets and approval tiers read."""
        return Activation({
            "jwt": dict(j.claims),
            "request": j.facts.to_cel(frozenset({"query", "headers"})),
            "llm": dict(j.llm) if j.llm is not None else dict(NOT_LLM),
            "mcp": j.mcp_facts if j.mcp_facts is not None else base_facts("", "", "", None),
        })

    def _admit(self, j: _Judged, reason: str, usage: Usage | None, answer: Any) -> Verdict:
        base: dict[str, Any] = {"http_rule": j.http_rule, "profiles": j.profiles,
                                "mcp": j.mcp_records}
        rule = j.mcp_records[0]["rule"] if j.mcp_records else j.http_rule
        if j.mcp_records:
            reason = j.mcp_records[0]["reason"]
        tier_id, approvers = None, 0
        if self.policy.approvals:
            act = self._activation(j)
            act.set("a2a", cel_view(None))
            try:
                tier, _ = select_tier(self.policy.approvals, act, j.mcp_variants)
            except CelError as exc:
                return _deny("approval", "approvals.when", f"an approval tier's 'when' could "
                             f"not be evaluated ({exc})", 403, **base)
            if tier is not None:
                tier_id, approvers = tier.id, tier.approvers
        base.update(approval=tier_id, approvers=approvers)
        flow_id = f"offline-{next(self._ids)}"
        refused, taken = self._budgets(j, flow_id, usage)
        if refused is not None:
            return Verdict(False, refused[0], refused[1], refused[2], "budget", **base)
        limited, held = self._limits(j, flow_id, usage)
        if limited is not None:
            self._unbudget(taken)
            return Verdict(False, limited[0], limited[1], limited[2], "limit", **base)
        self._settle_budgets(j, taken, usage)
        visible, hidden = self._listing(j, answer)
        return Verdict(True, rule, reason, 200, "allowed", visible=visible, hidden=hidden,
                       limits=tuple(t[0] for t in taken) + held, **base)

    # -- budgets and limits ---------------------------------------------------------------

    def _budgets(self, j: _Judged, flow_id: str, usage: Usage | None,
                 ) -> tuple[tuple[str, str, int] | None, list[tuple[str, str, Amount, Any]]]:
        """``BudgetGuard.request`` and its settlement: reserve against every budget that
        applies (all or nothing), then charge ``usage`` (or the reservation)."""
        taken: list[tuple[str, str, Amount, Any]] = []
        if j.llm is None:
            return None, taken
        # report-mode budgets never refuse at the gateway (they only report), so not here
        budgets = [b for b in applicable_budgets(self.policy, list(j.profiles))
                   if b.mode is not Mode.REPORT]
        if not budgets:
            return None, taken
        est_in = int(j.llm.get("estimated_input_tokens") or 0)
        max_out = int(j.llm.get("max_tokens") or 0) or self.default_max_tokens
        model = str(j.llm.get("model") or "")
        usd = self.policy.pricing.cost(model, Usage(input=est_in, output=max_out))
        act = self._activation(j) if any(b.key or b.when for b in budgets) else None
        claims = j.claims
        who = {"agent": str(claims.get("agent_id") or claims.get("sub") or ""),
               "role": _opt(claims.get("agent_role")),
               "session": _opt(claims.get("session_id", claims.get("sid")))}
        for b in budgets:
            try:
                if b.when is not None and act is not None and not b.when.evaluate(act):
                    continue
                key = budget_key(b, act, who)
            except CelError as exc:
                self._unbudget(taken)
                return (b.id, f"budget {b.id} could not be evaluated ({exc})", 500), []
            if usd is None and (b.spec.hard_usd is not None or b.spec.soft_usd is not None):
                self._unbudget(taken)
                return (b.id, f"model {model!r} has no price in llm.pricing, so USD budget "
                        f"{b.id} cannot be enforced", 403), []
            amount = Amount(usd or 0.0, est_in + max_out)
            refusal = self.ledger.reserve(b.id, key, b.spec, amount, self.now)
            if refusal is not None:
                self._unbudget(taken)
                return (b.id, f"budget {b.id} ({b.spec.describe()}) for {key!r} would be "
                        f"exceeded ({refusal.unit}); it refills in "
                        f"{resets_at(b.spec, self.now) - self.now:.0f} s", 429), []
            taken.append((b.id, key, amount, b.spec))
        return None, taken

    def _unbudget(self, taken: list[tuple[str, str, Amount, Any]]) -> None:
        for bid, key, amount, _ in taken:
            self.ledger.release(bid, key, amount)

    def _settle_budgets(self, j: _Judged, taken: list[tuple[str, str, Amount, Any]],
                        usage: Usage | None) -> None:
        model = str((j.llm or {}).get("model") or "")
        for bid, key, amount, spec in taken:
            if usage is None:
                actual = amount  # sent, nothing metered: charged what was reserved
            else:
                cost = self.policy.pricing.cost(model, usage)
                actual = Amount(amount.usd if cost is None else cost,
                                usage.input + usage.output)
            self.ledger.settle(bid, key, spec, amount, actual, self.now)

    def _limits(self, j: _Judged, flow_id: str, usage: Usage | None,
                ) -> tuple[tuple[str, str, int] | None, tuple[str, ...]]:
        """``RateLimiter.request``: take from every bucket that applies, all or nothing;
        then settle token reservations to ``usage`` (without it the reservation stands)."""
        # report-mode limits count in buckets of their own and never 429 at the gateway
        limits = [x for x in applicable_limits(self.policy, list(j.profiles))
                  if x.mode is not Mode.REPORT]
        if not limits:
            return None, ()
        tokens = None
        if j.llm is not None:
            tokens = int(j.llm.get("estimated_input_tokens") or 0) + (
                int(j.llm.get("max_tokens") or 0) or self.default_max_tokens)
        act = self._activation(j) if any(x.key or x.when for x in limits) else None
        agent = str(j.claims.get("agent_id") or j.claims.get("sub") or "")
        out = self.rates.reserve(flow_id, limits, agent=agent, llm_tokens=tokens, act=act)
        lim = out.failed
        if lim is not None and out.error is not None:
            return (lim.id, f"rate limit {lim.id} could not be evaluated ({out.error})",
                    500), ()
        if lim is not None and out.take is not None:
            why = "can never allow this request" if out.take.never else "is exhausted"
            return (lim.id, f"rate limit {lim.id} for {out.key!r} {why}: {out.take.remaining} "
                    f"of {lim.spec.max_tokens} left, this request needs {out.needed}; retry "
                    f"after {out.take.retry_after:.0f} s", 429), ()
        used = None if usage is None else usage.input + usage.output
        self.rates.settle(flow_id, used)  # without usage the reservation stands
        return None, tuple(h.limit.id for h in out.held)

    def _listing(self, j: _Judged, answer: Any) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
        """``McpAnswers``: the list answer as the agent would receive it."""
        if answer is None or j.scope is None:
            return None, ()
        hidden: list[tuple[str, str]] = []
        out = rewrite_message(answer, j.methods, {}, j.scope, hidden)
        result = out.get("result") if isinstance(out, dict) else None
        if not isinstance(result, dict):
            return None, tuple(h[0] for h in hidden)
        for key, _ in LIST_METHODS.values():
            items = result.get(key)
            if isinstance(items, list):
                names = tuple(str(i.get("name") or i.get("uri") or i.get("uriTemplate") or "")
                              for i in items if isinstance(i, dict))
                return names, tuple(h[0] for h in hidden)
        return None, tuple(h[0] for h in hidden)


def _opt(v: Any) -> str | None:
    return None if v is None else str(v)


def json_body(value: Any) -> bytes:
    """A case's ``json:`` as the bytes an SDK would send."""
    return json.dumps(value, separators=(",", ":")).encode()
