"""Approval webhooks: every new approval request and escalation, POSTed to people's chat.

The body is Slack-compatible (``text`` and ``blocks``, what a Slack incoming webhook and most
chat bridges accept) and carries the whole event under ``fleetgate`` for tooling. Each POST
is signed like Slack's and Stripe's: ``X-Fleetgate-Signature: t=<unix time>,v1=<hex
HMAC-SHA256 of "<t>.<body>">`` with the secret of ``fleetgate_approval_webhook_secret_file``;
a receiver recomputes it (:func:`sign`) and rejects old timestamps. ``X-Fleetgate-Delivery``
is the same on every retry of one event (receivers deduplicate on it).

Delivery runs on the proxy's event loop but never on a request's path: events queue (bounded;
a full queue drops the event and counts it) and one task sends them in order, retrying a
failure (connection error, 5xx, 429) with exponential backoff up to ``attempts``. A 4xx other
than 429 is not retried: the receiver refuses the event as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

__all__ = ["WebhookNotifier", "sign", "slack_body"]

log = logging.getLogger(__name__)
# httpx logs every request at INFO: one line per delivery attempt would drown the gateway log
logging.getLogger("httpx").setLevel(logging.WARNING)

QUEUE_MAX = 1000


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def slack_body(event: str, approval: dict[str, Any], console: str = "") -> dict[str, Any]:
    """A Slack-compatible message for an approval event."""
    action = approval.get("action") or {}
    what = action.get("tool") or action.get("model") or action.get("to") or ""
    line = f"{action.get('method', '')} {action.get('url', '')}".strip()
    verb = {"approval.requested": "needs approval",
            "approval.escalated": "is still waiting for approval (escalated)",
            "approval.approved": "was approved", "approval.denied": "was denied"}.get(event, event)
    text = (f"[fleetgate] {approval.get('agent')}: {action.get('kind', 'http')} "
            f"{what + ' ' if what else ''}{verb} — tier {approval.get('tier')}, id "
            f"{approval.get('id')}")
    role = (approval.get("identity") or {}).get("role") or "-"
    details = [f"*Agent:* {approval.get('agent')} (role {role})",
               f"*Tier:* {approval.get('tier')} — {approval.get('reason') or ''}",
               f"*Action:* `{line}`"]
    if action.get("tool"):
        details.append(f"*Tool:* {action['tool']} `{json.dumps(action.get('arguments') or {})[:500]}`")
    if action.get("model"):
        details.append(f"*Model:* {action['model']}")
    if approval.get("needed", 1) > 1:
        details.append(f"*Needs:* {approval['needed']} distinct approvers "
                       f"({len(approval.get('votes') or [])} so far)")
    how = f"fleetgate approvals approve {approval.get('id')}"
    if console:
        how += f" or {console}"
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": text}},
              {"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(details)}},
              {"type": "context", "elements": [{"type": "mrkdwn", "text": how}]}]
    return {"text": text, "blocks": blocks,
            "fleetgate": {"event": event, "approval": approval}}


class WebhookNotifier:
    def __init__(self, on_result: Callable[[str], None] | None = None) -> None:
        self.url = ""
        self.secret = b""
        self.console = ""
        self.attempts = 6
        self.backoff = 1.0  # first retry after this many seconds, doubling, at most 60 s
        self.timeout = 10.0
        self.on_result = on_result or (lambda outcome: None)  # delivered|failed|dropped|retried
        self._queue: asyncio.Queue[tuple[str, bytes]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue = asyncio.Queue(QUEUE_MAX)
        self._task = loop.create_task(self._run(), name="fleetgate-approval-webhook")

    async def stop(self, wait: float = 3.0) -> None:
        if self._task is None:
            return
        if self._queue is not None and not self._queue.empty():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), wait)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def notify(self, event: str, approval: dict[str, Any]) -> None:
        """Queue an event; callable from any thread (the admin API's, the event loop)."""
        if not self.enabled or self._loop is None or self._queue is None:
            return
        body = json.dumps(slack_body(event, approval, self.console)).encode()
        delivery = uuid.uuid4().hex
        queue = self._queue

        def put() -> None:
            try:
                queue.put_nowait((delivery, body))
            except asyncio.QueueFull:
                self.on_result("dropped")
                log.error("fleetgate: approval webhook queue full (%d); event %s dropped",
                          QUEUE_MAX, event)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            put()
        else:
            self._loop.call_soon_threadsafe(put)

    async def _run(self) -> None:
        assert self._queue is not None
        item = await self._queue.get()
        # httpx only once there is something to deliver: a gateway that never sends a
        # webhook never loads it (~4 MiB of RSS)
        import httpx

        async with httpx.AsyncClient(timeout=self.timeout, trust_env=False) as client:
            while True:
                delivery, body = item
                try:
                    await self._deliver(client, delivery, body)
                finally:
                    self._queue.task_done()
                item = await self._queue.get()

    async def _deliver(self, client: httpx.AsyncClient, delivery: str, body: bytes) -> None:
        import httpx  # loaded by _run already; the name is needed for the except clause

        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            ts = int(time.time())
            headers = {"Content-Type": "application/json", "X-Fleetgate-Delivery": delivery,
                       "X-Fleetgate-Attempt": str(attempt), "User-Agent": "fleetgate"}
            if self.secret:
                headers["X-Fleetgate-Signature"] = sign(self.secret, ts, body)
            try:
                resp = await client.post(self.url, content=body, headers=headers)
                if resp.status_code < 300:
                    self.on_result("delivered")
                    return
                if resp.status_code != 429 and resp.status_code < 500:
                    self.on_result("failed")
                    log.error("fleetgate: approval webhook %s refused delivery %s: HTTP %d",
                              self.url, delivery, resp.status_code)
                    return
                why = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
            if attempt == self.attempts:
                break
            self.on_result("retried")
            log.warning("fleetgate: approval webhook delivery %s failed (%s); retry %d in %.1fs",
                        delivery, why, attempt, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)
        self.on_result("failed")
        log.error("fleetgate: approval webhook delivery %s failed %d times; giving up (the "
                  "approval stays queued: fleetgate approvals list)", delivery, self.attempts)
