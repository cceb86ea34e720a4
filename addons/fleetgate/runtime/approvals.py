"""ApprovalService: the approval queue at run time, shared by the gate, the admin API, the
console, mitmweb commands and the escalation sweep.

The store (:mod:`fleetgate.stores.approvals`) is synchronous: the event loop reaches it
through a thread (``asyncio.to_thread``) so a locked database or a slow Redis delays only
the held request, never every agent's flows; the admin API and the console call it from
their own threads. A decision made on this gateway wakes the requests held here at once; a
decision made on another replica is seen by the held request's poll (``poll`` seconds).

Every event (requested, approved, denied, consumed, escalated, outcome) goes to the audit
log as one JSON line (``event``, ``approval_id``, ``decision_id`` linking it to the decision
records) through ``emit``, and requests and escalations to the webhook.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleetgate.approvals.model import Approval, ApprovalConflict, Status, Tier
from fleetgate.approvals.operators import Operator
from fleetgate.errors import NotFound, StateError
from fleetgate.metrics import GatewayMetrics
from fleetgate.runtime.listeners import Routes
from fleetgate.runtime.shared import SharedState
from fleetgate.runtime.webhook import WebhookNotifier
from fleetgate.stores.approvals import ApprovalStore, SqliteApprovalStore
from fleetgate.stores.redis_approvals import RedisApprovalStore

__all__ = ["ApprovalService", "new_approval_id"]

log = logging.getLogger(__name__)

STATUSES = ("pending", "approved", "denied", "consumed")


def new_approval_id() -> str:
    return "apr_" + secrets.token_hex(8)


class ApprovalService:
    def __init__(self, metrics: GatewayMetrics, admin: Routes | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.metrics = metrics
        self.clock = clock
        self.store: ApprovalStore = SqliteApprovalStore(None)
        self.where = "memory"
        self.webhook = WebhookNotifier(
            on_result=lambda outcome: metrics.approval_webhooks.labels(outcome=outcome).inc())
        self.emit: list[Callable[[dict[str, Any]], None]] = []  # audit lines (DecisionLog)
        self.poll = 0.25  # seconds between checks of a held request's approval in the store
        self.sweep_every = 15.0  # seconds between escalation sweeps
        self.loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        if admin is not None:
            admin.get("/v1/approvals", self.list_view)
            admin.get("/v1/approvals/{approval_id}", self.show)
            admin.post("/v1/approvals/approve", self._api_approve, operator=True)
            admin.post("/v1/approvals/deny", self._api_deny, operator=True)

    # -- state -----------------------------------------------------------------------

    def open_state(self, directory: str) -> None:
        """The embedded queue: ``approvals.sqlite3`` in ``directory`` ('' memory)."""
        path = Path(directory) / "approvals.sqlite3" if directory else None
        old, self.store = self.store, SqliteApprovalStore(path)
        self.where = str(path) if path else "memory"
        old.close()

    def open_shared(self, shared: SharedState) -> None:
        assert shared.settings is not None
        store = RedisApprovalStore(shared.settings)
        store.r.ping()
        old, self.store = self.store, store
        self.where = shared.settings.redacted()
        old.close()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.webhook.start(loop)
        self._sweeper = loop.create_task(self._sweep_forever(), name="fleetgate-approvals")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self.webhook.stop()

    def close_store(self) -> None:
        self.store.close()

    # -- the gate's side (event loop) -------------------------------------------------

    async def _call[T](self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except (ApprovalConflict, NotFound):
            raise
        except Exception as exc:
            raise StateError(f"the approval queue ({self.where}) cannot be read: "
                             f"{type(exc).__name__}: {exc}") from exc

    async def find(self, digest: str) -> Approval | None:
        return await self._call(self.store.find, digest)

    async def get(self, approval_id: str) -> Approval | None:
        return await self._call(self.store.get, approval_id)

    async def ask(self, tier: Tier, digest: str, agent: str, action: dict[str, Any],
                  identity: dict[str, Any], decision_id: str) -> tuple[Approval, bool]:
        """The open approval for this action, created (and announced) if there is none."""
        now = self.clock()
        fresh = Approval(
            id=new_approval_id(), tier=tier.id, digest=digest, created=now,
            deadline=now + tier.window, window=tier.window, needed=tier.approvers,
            agent=agent, action=action, identity=identity, approved_by=tier.approved_by,
            secondary=tier.secondary, escalate_to=tier.escalate_to, reason=tier.reason,
            decision_id=decision_id)
        found, created = await self._call(self.store.create_or_get, fresh)
        if created:
            self._announce("approval.requested", found, decision_id=decision_id)
        return found, created

    async def consume(self, approval_id: str, decision_id: str) -> Approval | None:
        """Use an approved approval for one forwarded retry; ``None`` if it is not (or no
        longer) approved: another retry took it, or someone denied it meanwhile."""
        now = self.clock()
        try:
            used = await self._call(self.store.transition, approval_id,
                                    lambda a: a.consume(now, decision_id))
        except ApprovalConflict:
            return None
        self._audit("approval.consumed", used, decision_id=decision_id)
        return used

    async def wait(self, approval_id: str, timeout: float,
                   interrupt: Callable[[], bool] | None = None) -> Approval | None:
        """Hold until the approval is decided, ``timeout`` passes or ``interrupt()`` says to
        stop waiting (checked every ``poll`` seconds: the agent was stopped); the latest
        record."""
        event = asyncio.Event()
        self._waiters.setdefault(approval_id, set()).add(event)
        deadline = time.monotonic() + timeout
        try:
            while True:
                current = await self.get(approval_id)
                if current is None or current.status is not Status.PENDING:
                    return current
                left = deadline - time.monotonic()
                if left <= 0 or (interrupt is not None and interrupt()):
                    return current
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(self.poll, left))
                event.clear()
        finally:
            waiters = self._waiters.get(approval_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    self._waiters.pop(approval_id, None)

    def outcome(self, approval_id: str, fields: dict[str, Any]) -> None:
        """What happened to the forwarded action (status, error): in the record and the log.
        Best effort: the decision record of the flow has it too."""
        def write() -> None:
            try:
                a = self.store.transition(approval_id, lambda a: a.with_outcome(fields))
            except Exception as exc:  # the audit line below still says it
                log.warning("fleetgate: approval %s outcome not stored: %s", approval_id, exc)
                return
            self._audit("approval.outcome", a, outcome=fields)
        if self.loop is not None:
            self.loop.run_in_executor(None, write)
        else:
            write()

    # -- people's side (threads) -------------------------------------------------------

    def approve(self, approval_id: str, op: Operator, note: str = "") -> Approval:
        now = self.clock()
        a = self.store.transition(approval_id, lambda a: a.approve(op, now, note))
        self._audit("approval.approved" if a.status is Status.APPROVED else "approval.vote", a,
                    by=op.name, note=note)
        self.metrics.approvals.labels(
            tier=a.tier, event="approved" if a.status is Status.APPROVED else "vote").inc()
        if a.status is Status.APPROVED:
            self.webhook.notify("approval.approved", a.as_dict())
        self._wake(approval_id)
        return a

    def deny(self, approval_id: str, op: Operator, reason: str) -> Approval:
        now = self.clock()
        a = self.store.transition(approval_id, lambda a: a.deny(op, now, reason))
        self._audit("approval.denied", a, by=op.name, reason=a.denial_reason)
        self.metrics.approvals.labels(tier=a.tier, event="denied").inc()
        self.webhook.notify("approval.denied", a.as_dict())
        self._wake(approval_id)
        return a

    def list_view(self, status: str = "pending", limit: str = "200") -> dict[str, Any]:
        if status not in (*STATUSES, "all"):
            raise ValueError(f"status must be one of {', '.join(STATUSES)} or all")
        items = self.store.entries(None if status == "all" else status, int(limit))
        if status == "pending":
            self.metrics.approvals_pending.set(len(items))
        return {"approvals": [a.as_dict() for a in items], "store": self.where}

    def show(self, approval_id: str) -> dict[str, Any]:
        a = self.store.get(approval_id)
        if a is None:
            raise NotFound(f"no approval {approval_id!r} (list them: fleetgate approvals list "
                           "--status all)")
        return a.as_dict()

    def _api_approve(self, args: dict[str, Any], op: Operator) -> dict[str, Any]:
        return self.approve(_id(args), op, str(args.get("note") or "")).as_dict()

    def _api_deny(self, args: dict[str, Any], op: Operator) -> dict[str, Any]:
        reason = str(args.get("reason") or "").strip()
        if not reason:
            raise ValueError("say why: a denial is final and the agent is told the reason")
        return self.deny(_id(args), op, reason).as_dict()

    # -- escalation --------------------------------------------------------------------

    async def escalate_due(self) -> list[Approval]:
        now = self.clock()
        out = []
        for a in await self._call(self.store.due, now):
            try:
                up = await self._call(self.store.transition, a.id, lambda x: x.escalate(now))
            except ApprovalConflict:
                continue  # decided meanwhile, or another replica escalated it
            out.append(up)
            self._announce("approval.escalated", up)
        return out

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.escalate_due()
                pending = await self._call(self.store.entries, "pending", 10_000)
                self.metrics.approvals_pending.set(len(pending))
            except Exception as exc:
                log.warning("fleetgate: approval escalation sweep failed: %s", exc)
            await asyncio.sleep(self.sweep_every)

    # -- events ------------------------------------------------------------------------

    def _announce(self, event: str, a: Approval, **fields: Any) -> None:
        self._audit(event, a, **fields)
        self.metrics.approvals.labels(tier=a.tier, event=event.split(".", 1)[1]).inc()
        self.webhook.notify(event, a.as_dict())

    def _audit(self, event: str, a: Approval, **fields: Any) -> None:
        line = {"time": round(self.clock(), 6), "event": event, "approval_id": a.id,
                "tier": a.tier, "status": a.status.value, "agent": a.agent,
                "decision_id": fields.pop("decision_id", None) or a.decision_id,
                "action": {k: a.action.get(k) for k in ("kind", "method", "url", "tool", "model",
                                                        "to") if a.action.get(k)},
                "votes": [v.by for v in a.votes], "escalations": a.escalations, **fields}
        if a.consumed_by_decision:
            line["forwarded_decision_id"] = a.consumed_by_decision
        for sink in self.emit:
            try:
                sink(line)
            except Exception:
                log.exception("fleetgate: approval audit line not written")

    def _wake(self, approval_id: str) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return

        def wake() -> None:
            for event in self._waiters.get(approval_id, ()):
                event.set()
        loop.call_soon_threadsafe(wake)


def _id(args: dict[str, Any]) -> str:
    approval_id = args.get("id")
    if not isinstance(approval_id, str) or not approval_id:
        raise ValueError("name the approval: {\"id\": \"apr_...\"}")
    return approval_id
