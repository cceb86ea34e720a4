"""Approval webhooks: the Slack-compatible body, the HMAC signature, and delivery to a real
HTTP server on 127.0.0.1 (retries with one delivery id, a 4xx not retried, giving up, a full
queue dropping)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from fleetgate.runtime import webhook
from fleetgate.runtime.webhook import WebhookNotifier, sign, slack_body

SECRET = b"whsec-test"

APPROVAL: dict[str, Any] = {
    "id": "apr_0001", "tier": "infrastructure", "agent": "ops-bot", "needed": 2,
    "votes": [{"by": "alice", "at": 1.0, "note": ""}], "reason": "infra needs two people",
    "identity": {"role": "ops"},
    "action": {"kind": "mcp", "method": "POST", "url": "https://mcp.example.com/mcp",
               "tool": "kubectl", "arguments": {"command": "delete pod web-1"}},
}


# -- the body and the signature -------------------------------------------------------


def verify(secret: bytes, header: str, body: bytes) -> bool:
    fields = dict(part.split("=", 1) for part in header.split(","))
    expect = hmac.new(secret, f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(fields["v1"], expect)


def test_sign_verifies_with_hmac_sha256() -> None:
    body = b'{"text": "hi"}'
    header = sign(SECRET, 1700000000, body)
    assert header.startswith("t=1700000000,v1=")
    assert header == "t=1700000000,v1=" + hmac.new(
        SECRET, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert verify(SECRET, header, body)
    assert not verify(b"other", header, body)
    assert not verify(SECRET, header, body + b" ")
    assert not verify(SECRET, header.replace("t=1700000000", "t=1700000001"), body)


def test_slack_body_has_text_blocks_and_the_event() -> None:
    out = slack_body("approval.requested", APPROVAL, console="https://gw.example.com/console")
    assert out["fleetgate"] == {"event": "approval.requested", "approval": APPROVAL}
    text = out["text"]
    assert text.startswith("[fleetgate] ops-bot: mcp kubectl needs approval")
    assert "tier infrastructure" in text and "apr_0001" in text
    blocks = out["blocks"]
    assert [b["type"] for b in blocks] == ["section", "section", "context"]
    assert blocks[0]["text"] == {"type": "mrkdwn", "text": text}
    details = blocks[1]["text"]["text"]
    assert "*Agent:* ops-bot (role ops)" in details
    assert "*Action:* `POST https://mcp.example.com/mcp`" in details
    assert '*Tool:* kubectl `{"command": "delete pod web-1"}`' in details
    assert "*Needs:* 2 distinct approvers (1 so far)" in details
    how = blocks[2]["elements"][0]["text"]
    assert how == ("fleetgate approvals approve apr_0001 or https://gw.example.com/console")
    json.dumps(out)  # JSON-able as it is


def test_slack_body_says_what_happened() -> None:
    assert "is still waiting for approval (escalated)" in slack_body(
        "approval.escalated", APPROVAL)["text"]
    assert "was denied" in slack_body("approval.denied", APPROVAL)["text"]
    llm = {**APPROVAL, "needed": 1, "action": {"kind": "llm", "model": "gpt-4o"}}
    out = slack_body("approval.approved", llm)
    assert out["text"].startswith("[fleetgate] ops-bot: llm gpt-4o was approved")
    assert "*Model:* gpt-4o" in out["blocks"][1]["text"]["text"]
    assert "*Needs:*" not in out["blocks"][1]["text"]["text"]


# -- delivery to a real server ----------------------------------------------------------


@dataclass
class Receiver:
    """A local webhook receiver answering each POST with the next scripted status."""

    script: list[int]
    seen: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver(script=[])
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with lock:
                rec.seen.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = rec.script.pop(0) if rec.script else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    rec.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=rec.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield rec
    rec.server.shutdown()
    rec.server.server_close()
    thread.join(5)


def notifier(url: str, outcomes: list[str], attempts: int = 6) -> WebhookNotifier:
    n = WebhookNotifier(on_result=outcomes.append)
    n.url, n.secret, n.attempts, n.backoff, n.timeout = url, SECRET, attempts, 0.01, 5.0
    return n


async def send(n: WebhookNotifier, events: int = 1, from_thread: bool = False) -> None:
    n.start(asyncio.get_running_loop())
    for i in range(events):
        if from_thread:  # the admin API's threads
            await asyncio.to_thread(n.notify, "approval.requested", {**APPROVAL, "id": f"apr_{i}"})
        else:
            n.notify("approval.requested", {**APPROVAL, "id": f"apr_{i}"})
    await n.stop(wait=10)


def test_a_failed_delivery_is_retried_with_the_same_delivery_id(receiver: Receiver) -> None:
    receiver.script = [500, 429, 200]
    outcomes: list[str] = []
    asyncio.run(send(notifier(receiver.url, outcomes)))
    assert outcomes == ["retried", "retried", "delivered"]
    assert len(receiver.seen) == 3
    headers = [h for h, _ in receiver.seen]
    bodies = {b for _, b in receiver.seen}
    assert len(bodies) == 1
    assert len({h["x-fleetgate-delivery"] for h in headers}) == 1
    assert [h["x-fleetgate-attempt"] for h in headers] == ["1", "2", "3"]
    body = bodies.pop()
    for h in headers:
        assert h["content-type"] == "application/json"
        assert verify(SECRET, h["x-fleetgate-signature"], body)
    assert json.loads(body)["fleetgate"]["event"] == "approval.requested"


def test_each_event_has_its_own_delivery_id_and_keeps_its_order(receiver: Receiver) -> None:
    outcomes: list[str] = []
    asyncio.run(send(notifier(receiver.url, outcomes), events=3, from_thread=True))
    assert outcomes == ["delivered"] * 3
    assert [json.loads(b)["fleetgate"]["approval"]["id"] for _, b in receiver.seen] == [
        "apr_0", "apr_1", "apr_2"]
    assert len({h["x-fleetgate-delivery"] for h, _ in receiver.seen}) == 3


def test_a_4xx_is_not_retried(receiver: Receiver) -> None:
    receiver.script = [400]
    outcomes: list[str] = []
    asyncio.run(send(notifier(receiver.url, outcomes)))
    assert outcomes == ["failed"]
    assert len(receiver.seen) == 1


def test_gives_up_after_attempts(receiver: Receiver) -> None:
    receiver.script = [503] * 10
    outcomes: list[str] = []
    asyncio.run(send(notifier(receiver.url, outcomes, attempts=3)))
    assert outcomes == ["retried", "retried", "failed"]
    assert [h["x-fleetgate-attempt"] for h, _ in receiver.seen] == ["1", "2", "3"]


def test_a_receiver_that_is_down_counts_as_failed() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    outcomes: list[str] = []
    asyncio.run(send(notifier(f"http://127.0.0.1:{port}/hook", outcomes, attempts=2)))
    assert outcomes == ["retried", "failed"]


def test_a_full_queue_drops_and_counts(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhook, "QUEUE_MAX", 1)
    outcomes: list[str] = []
    # three events before the sender runs: one fits in the queue
    asyncio.run(send(notifier(receiver.url, outcomes), events=3))
    assert sorted(outcomes) == ["delivered", "dropped", "dropped"]
    assert len(receiver.seen) == 1


def test_without_a_secret_nothing_is_signed(receiver: Receiver) -> None:
    outcomes: list[str] = []
    n = notifier(receiver.url, outcomes)
    n.secret = b""
    asyncio.run(send(n))
    assert outcomes == ["delivered"]
    assert "x-fleetgate-signature" not in receiver.seen[0][0]


def test_without_a_url_nothing_is_sent(receiver: Receiver) -> None:
    outcomes: list[str] = []
    n = notifier("", outcomes)
    assert not n.enabled
    asyncio.run(send(n))
    assert outcomes == [] and receiver.seen == []
