"""Drive fleetgate's whole addon chain, ``pipeline()``, in mitmproxy's test context.

Shared by the addon-level test modules (no test module imports another one). These helpers
reach the addons only through ``pipeline()`` and mitmproxy's hooks, never an addon's
constructor or attributes, so tests written with them hold while the addons are reshaped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mitmproxy import http
from mitmproxy.test import taddons, tflow

from fleetgate.addons.pipeline import pipeline
from fleetgate.identity.mint import mint_token

SECRET = b"addon-test-secret-0123456789abcdef0123"


def basic(token: str) -> str:
    return "Basic " + base64.b64encode(f"agent:{token}".encode()).decode()


@contextlib.contextmanager
def running_chain(tmp_path: Path, rules_text: str) -> Iterator[tuple[Any, list[Any]]]:
    """fleetgate's whole addon chain in a mitmproxy test context, on ``rules_text``."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text)
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    addons = pipeline()
    with taddons.context(*addons) as tctx:
        tctx.options.update(
            fleetgate_rules=str(rules), fleetgate_jwt_secret_file=str(secret),
            fleetgate_metrics_listen="", fleetgate_decision_log="")
        yield tctx, addons


def run_hook(addons: list[Any], hook: str, flow: Any) -> None:
    for addon in addons:
        fn = getattr(addon, hook, None)
        if fn is not None:
            result = fn(flow)
            if inspect.isawaitable(result):  # async hooks (the kill switch's pause) are awaited
                asyncio.run(result)


def run_request(addons: list[Any], flow: Any) -> None:
    """What mitmproxy does for a request: headers hooks, then (body read) request hooks."""
    run_hook(addons, "requestheaders", flow)
    run_hook(addons, "request", flow)


def request_flow(path: str = "/v1/models", host: str = "api.example.com",
                 method: str = "GET", auth: str | None = None) -> Any:
    f = tflow.tflow()
    f.request.host = host
    f.request.port = 443
    f.request.scheme = "https"
    f.request.path = path
    f.request.method = method
    f.request.headers["Host"] = host
    f.client_conn.sni = host
    if auth:
        f.request.headers["Proxy-Authorization"] = auth
    return f


def tok(role: str = "tester", sub: str = "agent-7") -> str:
    return mint_token(SECRET, sub, 600, {"agent_role": role})


def respond(addons: list[Any], flow: Any, body: bytes, headers: dict[str, str],
            status: int = 200, chunk: int = 7) -> bytes:
    """What mitmproxy does with an upstream answer: ``responseheaders`` on the headers alone;
    then a streamed body (``response.stream`` set) goes through the stream callable in
    ``chunk``-byte pieces and is not kept, a buffered one is read whole; then ``response``.
    Returns the bytes the agent receives."""
    flow.response = http.Response.make(status, body, headers)
    if "content-length" not in {k.lower() for k in headers}:
        flow.response.headers.pop("content-length", None)
    flow.response.raw_content = None  # headers only, the body is still on its way
    run_hook(addons, "responseheaders", flow)
    if flow.error is not None:
        return b""
    stream = flow.response.stream
    if not stream:
        flow.response.raw_content = body
        run_hook(addons, "response", flow)
        return bytes(flow.response.raw_content or b"")
    sent = b""
    for piece in [body[i:i + chunk] for i in range(0, len(body), chunk)] + [b""]:
        out = stream(piece) if callable(stream) else piece
        sent += b"".join(out) if isinstance(out, list) else out
    flow.response.raw_content = b""
    run_hook(addons, "response", flow)
    return sent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def started(addons: list[Any]) -> Iterator[None]:
    """The chain's ``running`` hooks on an event loop of their own (listeners, periodic
    tasks), as in mitmdump; ``done`` and the loop's tasks cancelled on the way out."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="chain-loop", daemon=True)
    thread.start()

    async def each(hook: str) -> None:
        for addon in addons:
            fn = getattr(addon, hook, None)
            if fn is not None:
                result = fn()
                if inspect.isawaitable(result):
                    await result

    async def cancel_tasks() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run_coroutine_threadsafe(each("running"), loop).result(10)
        yield
    finally:
        asyncio.run_coroutine_threadsafe(each("done"), loop).result(10)
        asyncio.run_coroutine_threadsafe(cancel_tasks(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
