"""ApprovalGate: actions in an approval tier wait for people, never for a timeout.

After every other check allowed the request (rules, MCP, A2A facts known; before limits and
budgets, which apply when it is really forwarded), the first ``approvals[]`` tier whose
``when`` is true decides: ``approvers: 0`` passes at once; otherwise the action needs
people. The request is held open (``hold``) while they decide:

- approved while held: forwarded as sent, once;
- denied: refused, final, saying who denied and why;
- still pending: the agent is answered in its client's format (LLM JSON error, JSON-RPC
  error for MCP and A2A) with the approval id, the tier and ``Retry-After``; the action
  stays queued. Its retry (the same action, matched by digest, or carrying
  ``Fleetgate-Approval: <id>``) joins the same approval, and once approved passes exactly
  once. Past the tier's window it escalates (notified again; ``escalateTo`` may approve).

Held flows are marked in mitmweb (``:hourglass:``) with the approval id in the comment;
``fleetgate.approve FLOWS`` / ``fleetgate.deny FLOWS REASON`` decide from there, the flows
named by id (``@<flow id>``) or by a filter (``~comment apr_...``). Not ``@focus`` in mitmweb:
the flow selected in its page is not known to the server, whose focus is the first flow seen.
Each command says what it decided; naming no held flow is an error, not a silent no-op.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mitmproxy import command, ctx, exceptions, flow, http

from fleetgate.a2a.facts import cel_view
from fleetgate.addons.flowtools import allowed, deny, fail_closed
from fleetgate.addons.kill_flows import refuse_stop, subject_of
from fleetgate.addons.limit_facts import flow_activation
from fleetgate.addons.state import (
    HEADER,
    a2a_of,
    add_comment,
    agent_of,
    annotate_decision,
    claims_of,
    decision_id,
    identity_of,
    llm_request_of,
    mcp_of,
    record_decision,
)
from fleetgate.approvals.action import action_digest, action_summary
from fleetgate.approvals.model import Approval, Status, Tier, select_tier
from fleetgate.approvals.operators import Operator
from fleetgate.celexpr import CelError
from fleetgate.durations import seconds
from fleetgate.errors import StateError
from fleetgate.kill.board import Verdict
from fleetgate.kill.model import Verb
from fleetgate.mcp.facts import mcp_facts
from fleetgate.mcp.messages import McpError, parse_messages
from fleetgate.metrics import GatewayMetrics
from fleetgate.policy.model import Policy
from fleetgate.runtime.approvals import ApprovalService
from fleetgate.runtime.kill import KillService
from fleetgate.runtime.listeners import HttpListener
from fleetgate.runtime.policy import PolicyService
from fleetgate.wire import jsonrpc_error

__all__ = ["APPROVAL", "ApprovalGate", "approval_header"]

log = logging.getLogger(__name__)

APPROVAL = "fleetgate.approval"  # flow.metadata: {id, tier, status, held_ms}
approval_header = "Fleetgate-Approval"
PENDING_CODE = -32040  # JSON-RPC (server error range): held for human approval
DENIED_CODE = -32041  # JSON-RPC: a human denied this action
STATE_OPTIONS = {"fleetgate_state", "fleetgate_state_password_file", "fleetgate_state_prefix",
                 "fleetgate_state_dir"}


def _a2a_facts(flow: http.HTTPFlow) -> dict[str, Any]:
    """What rules see as ``a2a`` (every field present; ``is_a2a`` false for other traffic)."""
    return cel_view(a2a_of(flow))


class ApprovalGate:
    def __init__(self, store: PolicyService, metrics: GatewayMetrics, service: ApprovalService,
                 kill: KillService, shared: Any = None, admin: HttpListener | None = None) -> None:
        self.store = store
        self.admin = admin  # its operators name the mitmweb operator's groups
        self.metrics = metrics
        self.service = service
        self.kill = kill
        self.shared = shared

    def load(self, loader: Any) -> None:
        loader.add_option("fleetgate_approval_webhook", str, "",
                          "URL that receives every new approval request and escalation (Slack-"
                          "compatible JSON, signed, retried with backoff). '' sends none.")
        loader.add_option("fleetgate_approval_webhook_secret_file", str, "",
                          "File with the secret that signs webhook bodies (X-Fleetgate-"
                          "Signature: t=<time>,v1=<HMAC-SHA256 of '<time>.<body>'>).")
        loader.add_option("fleetgate_approval_console_url", str, "",
                          "The console's URL, quoted in webhook messages (e.g. "
                          "https://fleetgate-admin.example/console).")
        loader.add_option("fleetgate_approval_sweep", str, "15s",
                          "How often to look for approvals whose window passed (they "
                          "escalate: notified again), e.g. 15s.")
        loader.add_option("fleetgate_web_operator", str, "mitmweb",
                          "Operator name recorded for approvals made with mitmweb commands "
                          "(fleetgate.approve); groups from fleetgate_admin_users_file.")

    def configure(self, updated: set[str]) -> None:
        o = ctx.options
        hook = self.service.webhook
        if "fleetgate_approval_webhook" in updated:
            url = o.fleetgate_approval_webhook
            if url and not url.startswith(("http://", "https://")):
                raise exceptions.OptionsError("fleetgate_approval_webhook must be an http(s) URL")
            hook.url = url
        if "fleetgate_approval_webhook_secret_file" in updated:
            path = o.fleetgate_approval_webhook_secret_file
            try:
                hook.secret = Path(path).read_bytes().strip() if path else b""
            except OSError as exc:
                raise exceptions.OptionsError(
                    f"fleetgate_approval_webhook_secret_file: cannot read {path}: {exc}") from None
            if path and len(hook.secret) < 16:
                raise exceptions.OptionsError("fleetgate_approval_webhook_secret_file: the "
                                              "secret is shorter than 16 bytes")
        if "fleetgate_approval_console_url" in updated:
            hook.console = o.fleetgate_approval_console_url
        if "fleetgate_approval_sweep" in updated:
            try:
                text = o.fleetgate_approval_sweep.strip()
                every = seconds(float(text) if text.replace(".", "", 1).isdigit() else text)
            except ValueError as exc:
                raise exceptions.OptionsError(f"fleetgate_approval_sweep: {exc}") from None
            if every <= 0:
                raise exceptions.OptionsError("fleetgate_approval_sweep must be positive")
            self.service.sweep_every = every
        if STATE_OPTIONS & updated:
            shared = self.shared
            try:
                if shared is not None and shared.enabled:
                    self.service.open_shared(shared)
                else:
                    self.service.open_state(o.fleetgate_state_dir)
            except Exception as exc:
                raise exceptions.OptionsError(f"cannot open the approval queue: {exc}") from None

    def running(self) -> None:
        self.service.attach(asyncio.get_running_loop())

    async def done(self) -> None:
        await self.service.close()
        self.service.close_store()

    # -- the gate ----------------------------------------------------------------------

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        policy = self.store.policy
        if policy is None or not policy.approvals or allowed(flow) is None:
            return
        req = flow.request
        offered = req.headers.pop(approval_header, None)  # never forwarded upstream
        try:
            tier, facts = self._tier(policy, flow)
        except CelError as exc:
            deny(flow, 403, "approvals.when", f"an approval tier's 'when' could not be "
                 f"evaluated ({exc}); denied rather than forwarded without approval",
                 hint="fix the rule (fleetgate rules check)")
            return
        if tier is None:
            return
        if tier.approvers == 0:
            annotate_decision(flow, approval={"tier": tier.id, "status": "not-needed"})
            return
        if req.stream or (req.raw_content is None and _has_body(req)):
            # the body streams past the gateway (nothing else reads it): an approval could not
            # be bound to what it says, so the action is refused rather than approved blind
            self._answer(flow, 413, "approvals.body",
                         f"this action needs human approval (tier {tier.id}) but its body is "
                         "too large for the gateway to hold and show to the approvers", None,
                         hint="send a body under fleetgate_stream_min_bytes, or ask an operator "
                              "to exempt this action from the tier")
            return
        agent = agent_of(flow)
        did = decision_id(flow)
        digest = action_digest(agent, tier.id, req.method, req.url, req.raw_content or b"")
        try:
            await self._gate(flow, tier, facts, agent, digest, did, offered)
        except StateError as exc:
            self._answer(flow, 503, "approvals.state", f"{exc}; the action was not forwarded",
                         None, hint="retry shortly", retry_after=5)

    def _tier(self, policy: Policy, flow: http.HTTPFlow) -> tuple[Tier | None, dict[str, Any]]:
        """The first tier whose ``when`` holds, for any message of the request (an MCP batch
        is held whole when one of its calls needs approval)."""
        activation = flow_activation(flow)
        activation.set("a2a", _a2a_facts(flow))
        return select_tier(policy.approvals, activation, self._mcp_variants(flow))

    @staticmethod
    def _mcp_variants(flow: http.HTTPFlow) -> list[dict[str, Any]]:
        """The facts of every message of an MCP request (as the server will receive it)."""
        meta = mcp_of(flow)
        if meta is None or flow.request.method != "POST":
            return []
        try:
            messages, _ = parse_messages(json.loads(flow.request.content or b""))
        except (McpError, ValueError):
            first = meta.get("facts")
            return [first] if isinstance(first, dict) else []
        server = flow.request.host
        return [mcp_facts(m, server, flow.request.path, meta.get("session"),
                          str(meta.get("server") or server)) for m in messages if m.method]

    async def _gate(self, flow: http.HTTPFlow, tier: Tier, facts: dict[str, Any], agent: str,
                    digest: str, did: str, offered: str | None) -> None:
        if offered:
            found = await self.service.get(offered)
            if found is None or found.digest != digest or found.agent != agent:
                self._answer(flow, 403, "approvals.mismatch",
                             f"approval {offered} is not for this action (a different request, "
                             "agent or tier); nothing was forwarded", None,
                             hint="send the action exactly as it was approved, or ask again "
                                  "without the Fleetgate-Approval header")
                return
        else:
            found = await self.service.find(digest)
        if found is None:
            req = flow.request
            ident = identity_of(flow)
            summary = action_summary(req.method, req.pretty_url, req.pretty_host,
                                     req.raw_content or b"", llm=llm_request_of(flow),
                                     mcp=facts or (mcp_of(flow) or {}).get("facts"),
                                     a2a=_a2a_facts(flow))
            identity = ({k: v for k, v in ident.as_dict().items() if k != "jti"}
                        if ident else {})
            root = claims_of(flow).get("root_session")
            if isinstance(root, str):
                identity["root_session"] = root
            found, _ = await self.service.ask(tier, digest, agent, summary, identity, did)
        if found.status is Status.PENDING and tier.hold > 0:
            found = await self._hold(flow, tier, found)
            if flow.response is not None or flow.error is not None:
                return
        await self._settle(flow, found)

    async def _hold(self, flow: http.HTTPFlow, tier: Tier, a: Approval) -> Approval:
        self.metrics.approvals.labels(tier=tier.id, event="held").inc()
        flow.metadata[APPROVAL] = {"id": a.id, "tier": a.tier, "status": "held"}
        previous = flow.marked
        flow.marked = ":hourglass:"
        add_comment(flow, f"held for approval {a.id} ({a.tier})")
        _update(flow)
        started = time.monotonic()
        subject = subject_of(flow)

        def stopped() -> Verdict | None:
            verdict = self.kill.verdict(subject) if subject is not None else None
            return verdict if verdict is not None and verdict.action.verb is Verb.STOP else None
        latest = await self.service.wait(a.id, tier.hold,
                                         lambda: stopped() is not None or not flow.live)
        flow.marked = previous
        flow.metadata[APPROVAL]["held_ms"] = round((time.monotonic() - started) * 1000, 1)
        if not flow.live or flow.error is not None:
            return latest or a  # the agent hung up: the action stays queued
        verdict = stopped()
        if verdict is not None:
            refuse_stop(flow, verdict, self.metrics)  # stopped while it waited: still queued
        return latest or a

    async def _settle(self, flow: http.HTTPFlow, a: Approval) -> None:
        meta = flow.metadata.setdefault(APPROVAL, {"id": a.id, "tier": a.tier})
        if a.status is Status.APPROVED:
            used = await self.service.consume(a.id, decision_id(flow))
            if used is not None:
                meta["status"] = "approved"
                meta["by"] = [v.by for v in used.votes]
                annotate_decision(flow, approval=dict(meta))
                add_comment(flow, f"approved by {', '.join(meta['by'])} ({a.id})")
                self.metrics.approvals.labels(tier=a.tier, event="consumed").inc()
                _update(flow)
                return
            a = await self.service.get(a.id) or a  # another retry took it, or it was denied
        if a.status is Status.DENIED:
            meta["status"] = "denied"
            self._answer(flow, 403, "approvals.denied",
                         f"{a.denied_by} denied this action ({a.tier}): {a.denial_reason}", a,
                         hint="a denial is final: do not retry this action", final=True)
            return
        if a.status is Status.CONSUMED:
            # approved once and already used: this identical action needs its own approval
            meta["status"] = "used"
            self._answer(flow, 403, "approvals.used",
                         f"approval {a.id} was already used by decision "
                         f"{a.consumed_by_decision}; an approval lets one request through",
                         a, hint="retry without the Fleetgate-Approval header to ask again")
            return
        meta["status"] = "pending"
        self.metrics.approvals.labels(tier=a.tier, event="answered_pending").inc()
        wait = _retry_after(a, self.service.clock())
        votes = f" ({len(a.votes)} of {a.needed} approvals so far)" if a.needed > 1 else ""
        self._answer(flow, 403, "approvals.pending",
                     f"this action needs human approval (tier {a.tier}"
                     f"{': ' + a.reason if a.reason else ''}); it is queued as {a.id}{votes} and "
                     "will not be forwarded until people approve it", a,
                     hint=f"retry the same request after {wait}s (or with header "
                          f"'{approval_header}: {a.id}'); it passes once approved",
                     retry_after=wait)

    def _answer(self, flow: http.HTTPFlow, status: int, rule: str, reason: str,
                a: Approval | None, *, hint: str, retry_after: int | None = None,
                final: bool = False) -> None:
        """Refuse in the client's format: JSON-RPC errors for MCP and A2A, LLM JSON else."""
        headers: dict[str, str] = {}
        extra: dict[str, Any] = {}
        if a is not None:
            headers["Fleetgate-Approval-Id"] = a.id
            extra = {"approval_id": a.id, "tier": a.tier, "approval_status": a.status.value,
                     "needed": a.needed, "votes": [v.by for v in a.votes]}
            if final:
                extra.update(denied_by=a.denied_by, denial_reason=a.denial_reason)
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
            extra["retry_after"] = retry_after
        lead = ("fleetgate is holding this request for human approval"
                if rule == "approvals.pending" else "fleetgate denied this request")
        deny(flow, status, rule, reason, hint=hint, headers=headers, lead=lead, **extra)
        assert flow.response is not None
        ids = _rpc_ids(flow)
        if ids is not None:
            did = decision_id(flow)
            code = DENIED_CODE if final else PENDING_CODE
            errors = [jsonrpc_error(rid, code, f"fleetgate ({rule}): {reason}. {hint}",
                                    rule=rule, decision_id=did, **extra) for rid in ids]
            body = errors if len(ids) != 1 or _is_batch(flow) else errors[0]
            flow.response = http.Response.make(
                200, json.dumps(body).encode(),
                {"Content-Type": "application/json", HEADER: did, **headers})
            record_decision(flow, False, rule, reason, 200)
        annotate_decision(flow, approval=dict(flow.metadata.get(APPROVAL) or {}))
        if rule == "approvals.pending":
            flow.marked = ":hourglass:"
        _update(flow)

    # -- outcome -----------------------------------------------------------------------

    def response(self, flow: http.HTTPFlow) -> None:
        self._outcome(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._outcome(flow)

    def _outcome(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(APPROVAL)
        if not isinstance(meta, dict) or meta.get("status") != "approved" or meta.get("done"):
            return
        meta["done"] = True
        fields: dict[str, Any] = {"decision_id": decision_id(flow)}
        if flow.response is not None:
            fields["status"] = flow.response.status_code
        if flow.error is not None:
            fields["error"] = flow.error.msg
        self.service.outcome(str(meta["id"]), fields)

    # -- mitmweb -----------------------------------------------------------------------

    def _operator(self) -> Operator:
        name = ctx.options.fleetgate_web_operator or "mitmweb"
        known = self.admin.operators.named(name) if self.admin is not None else None
        return known or Operator(name, frozenset())

    @command.command("fleetgate.approve")
    def approve_cmd(self, flows: Sequence[flow.Flow]) -> str:
        """Approve the approvals the given flows are held on (or were answered pending)."""
        op, done = self._operator(), []
        for a_id in _approval_ids(flows):
            try:
                a = self.service.approve(a_id, op, "from mitmweb")
                log.info("fleetgate: %s approved %s (%s)", op.name, a_id, a.status.value)
                done.append(f"{a_id}: {a.status.value} ({op.name})")
            except Exception as exc:
                log.warning("fleetgate: cannot approve %s: %s", a_id, exc)
                done.append(f"{a_id}: NOT approved: {exc}")
        return "; ".join(done)

    @command.command("fleetgate.deny")
    def deny_cmd(self, flows: Sequence[flow.Flow], reason: str) -> str:
        """Deny (final) the approvals the given flows are held on, saying why."""
        op, done = self._operator(), []
        for a_id in _approval_ids(flows):
            try:
                self.service.deny(a_id, op, reason)
                done.append(f"{a_id}: denied ({op.name})")
            except Exception as exc:
                log.warning("fleetgate: cannot deny %s: %s", a_id, exc)
                done.append(f"{a_id}: NOT denied: {exc}")
        return "; ".join(done)


def _approval_ids(flows: Sequence[flow.Flow]) -> list[str]:
    """The approvals the flows are held on; none is an error the command bar shows."""
    out = []
    for f in flows:
        meta = f.metadata.get(APPROVAL)
        if isinstance(meta, dict) and isinstance(meta.get("id"), str):
            out.append(meta["id"])
    if not out:
        raise exceptions.CommandError(
            f"none of the {len(flows)} flow(s) named is held for approval; name a held flow "
            "by id (@<flow id>) or with ~comment apr_... (in mitmweb @focus is not the flow "
            "selected in the page)")
    return list(dict.fromkeys(out))


def _retry_after(a: Approval, now: float) -> int:
    """When to ask again: a minute, or sooner if the window ends sooner."""
    return max(1, min(60, int(a.deadline - now) if a.deadline > now else 60))


def _has_body(req: http.Request) -> bool:
    length = req.headers.get("content-length", "")
    return bool(req.headers.get("transfer-encoding")) or (length.isdigit() and int(length) > 0)


def _is_batch(flow: http.HTTPFlow) -> bool:
    return (flow.request.content or b"").lstrip()[:1] == b"["


def _rpc_ids(flow: http.HTTPFlow) -> list[Any] | None:
    """The JSON-RPC request ids of an MCP or A2A request (answered as JSON-RPC errors);
    ``None`` for other traffic."""
    if mcp_of(flow) is None and not _a2a_facts(flow).get("is_a2a"):
        return None
    try:
        body = json.loads(flow.request.content or b"")
    except ValueError:
        return [None]
    items = body if isinstance(body, list) else [body]
    ids = [m.get("id") for m in items if isinstance(m, dict) and "id" in m]
    return ids or [None]


def _update(flow: http.HTTPFlow) -> None:
    """Tell mitmweb the flow changed (marked, comment) while it is still in flight."""
    master = ctx.master if hasattr(ctx, "master") else None
    if master is None:
        return
    try:
        from mitmproxy.hooks import UpdateHook
        master.addons.trigger(UpdateHook([flow]))
    except Exception:  # mitmweb's view is a courtesy, never a reason to fail the flow
        pass

