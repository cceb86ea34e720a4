"""Three A2A agents built with the official ``a2a-sdk`` (1.x) server, for the e2e tests.

Each agent is a Starlette app (the SDK's agent-card and JSON-RPC routes) served by uvicorn
over TLS on 127.0.0.1 in a thread of its own, reached BY NAME (``<name>.a2a.fleetgate.test``,
registered with :func:`harness.register_name` so gateways resolve it). Agents talk to each
other only through the gateway, each with its own token, with the SDK's client (httpx with
the gateway as proxy and the gateway's CA trusted).

What an agent does with a message is in the message's text:

- ``echo ...``: answers ``<name>: echo ...``;
- ``ask <agent> ...``: messages ``<agent>`` with the rest, answers ``<name> < <its answer>``;
- ``loop``: messages the next agent of the ring with ``loop`` (same context unless the
  agent was built with ``new_context``; ``depth: 0`` in the message metadata when built
  with ``claim_zero``), answers ``<name> > <its answer>``;
- a hop the gateway refuses is answered ``refused: <the error the SDK raised>``;
- ``stream N``: a task with N status updates 0.4 s apart, then completed.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import trustme
import uvicorn
from a2a.client import ClientConfig, create_client
from a2a.helpers.proto_helpers import new_task_from_user_message, new_text_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    Message,
    Part,
    Role,
    SendMessageRequest,
    TaskState,
)
from google.protobuf.struct_pb2 import Struct
from starlette.applications import Starlette

from harness import register_name, token, unregister_names

__all__ = ["A2aAgent", "ask", "hostname"]


def hostname(name: str) -> str:
    return f"{name}.a2a.fleetgate.test"


def text_of(msg: Message) -> str:
    return "\n".join(p.text for p in msg.parts if p.HasField("text"))


async def ask(url: str, text: str, *, proxy: str, ca: Path, context_id: str = "",
              claim: int | None = None, streaming: bool = False) -> list[Any]:
    """Send ``text`` to the agent at ``url`` through the gateway with the SDK's client; the
    stream responses (one for a plain send), each with the time it arrived."""
    http = httpx.AsyncClient(proxy=proxy, verify=ssl.create_default_context(cafile=str(ca)),
                             timeout=30)
    try:
        client = await create_client(url, ClientConfig(
            httpx_client=http, streaming=streaming, supported_protocol_bindings=["JSONRPC"]))
        msg = Message(message_id=str(uuid.uuid4()), role=Role.ROLE_USER,
                      parts=[Part(text=text)], context_id=context_id or None)
        if claim is not None:
            meta = Struct()
            meta.update({"depth": claim})
            msg.metadata.CopyFrom(meta)
        out = []
        async for event in client.send_message(SendMessageRequest(message=msg)):
            out.append((time.monotonic(), event))
        return out
    finally:
        await http.aclose()


def answer_text(events: list[Any]) -> str:
    """The text of a plain send's answer (a Message, or a Task's status message)."""
    (_, event), = events
    if event.HasField("message"):
        return text_of(event.message)
    return text_of(event.task.status.message)


class Executor(AgentExecutor):
    def __init__(self, agent: A2aAgent) -> None:
        self.agent = agent

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.message is not None
        agent, text = self.agent, text_of(context.message)
        agent.received.append(text)
        ctx_id = context.context_id or ""
        if text.startswith("stream"):
            task = new_task_from_user_message(context.message)
            await event_queue.enqueue_event(task)
            updater = TaskUpdater(event_queue, task.id, task.context_id)
            for i in range(int(text.split()[1])):
                await asyncio.sleep(0.4)
                await updater.update_status(TaskState.TASK_STATE_WORKING, new_text_message(
                    f"{agent.name}: chunk {i}", context_id=task.context_id, task_id=task.id))
            await updater.complete(new_text_message(f"{agent.name}: done",
                                                    context_id=task.context_id, task_id=task.id))
            return
        if text.startswith("ask "):
            _, target, rest = text.split(" ", 2)
            reply = f"{agent.name} < {await agent.forward(target, rest, ctx_id)}"
        elif text == "loop":
            reply = f"{agent.name} > {await agent.forward(agent.next, 'loop', ctx_id)}"
        else:
            reply = f"{agent.name}: {text}"
        await event_queue.enqueue_event(new_text_message(reply, context_id=ctx_id or None))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        raise NotImplementedError


class A2aAgent:
    """One SDK agent on 127.0.0.1 (TLS), named ``name``, messaging others via the gateway."""

    def __init__(self, ca: trustme.CA, name: str, workdir: Path) -> None:
        self.name, self.next = name, ""
        self.received: list[str] = []
        self.gateway: Any = None  # harness.Gateway, set once it runs
        self.new_context = False  # loop hops in a fresh context each time
        self.claim: int | None = None  # depth written into forwarded messages
        self.peers: dict[str, A2aAgent] = {}
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.host = hostname(name)
        self.url = f"https://{self.host}:{self.port}/a2a"
        pem = workdir / f"{name}.pem"
        ca.issue_cert(self.host).private_key_and_cert_chain_pem.write_to_path(str(pem))
        card = AgentCard(
            name=name, description=f"test agent {name}", version="1.0",
            supported_interfaces=[AgentInterface(url=self.url, protocol_binding="JSONRPC",
                                                 protocol_version="1.0")],
            capabilities=AgentCapabilities(streaming=True),
            skills=[AgentSkill(id="chat", name="chat", description="answers", tags=["test"])],
            default_input_modes=["text/plain"], default_output_modes=["text/plain"])
        handler = DefaultRequestHandler(agent_executor=Executor(self),
                                        task_store=InMemoryTaskStore(), agent_card=card)
        app = Starlette(routes=[*create_agent_card_routes(card),
                                *create_jsonrpc_routes(handler, "/a2a")])
        config = uvicorn.Config(app, ssl_certfile=str(pem), ssl_keyfile=str(pem),
                                log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        register_name(self.host, self.port, self.port)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started, f"A2A agent {name} did not start"

    async def forward(self, target: str, text: str, context_id: str) -> str:
        gw, peer = self.gateway, self.peers[target]
        try:
            events = await ask(peer.url.removesuffix("/a2a"), text,
                               proxy=gw.proxy_url(token(sub=self.name, role="agent")),
                               ca=gw.ca_cert,
                               context_id="" if self.new_context else context_id,
                               claim=self.claim)
            return answer_text(events)
        except Exception as exc:  # the gateway refused the hop: say so, end the chain
            return f"refused: {exc}"

    def stop(self) -> None:
        unregister_names(self.port)
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
