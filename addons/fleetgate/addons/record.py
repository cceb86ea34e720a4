"""FlowRecorder: ``fleetgate_record`` writes every finished flow, secrets masked, for replay.

``fleetgate replay`` judges recorded traffic under new rules; this is how to record it
through the gateway (``fleetgate run --record FILE``). mitmproxy's own ``save_stream_file``
writes the flow as it is, with the agent's and the provider's credentials; a recording is
passed around to review a rules change, so it must hold none.

At ``response`` and ``error`` (after every fleetgate addon, the decision log included, so the
flow carries its identity's claims and its decision) a *copy* of the flow is masked and
appended in mitmproxy's flow format (:class:`mitmproxy.io.FlowWriter`, readable by
``mitmproxy -r``, mitmweb and ``fleetgate replay``). The live flow is never touched: its
request was sent already and its response is still on its way to the agent, Set-Cookie
included. Masked: ``Authorization``, ``Proxy-Authorization``, ``Cookie``, ``Set-Cookie`` and
every header whose name says key, token, secret, password, signature, credential or
session (``x-api-key``, ``x-goog-api-key``, ``api-key``...); the value becomes
``[masked by fleetgate]``. Credentials fleetgate injected are already replaced by
``[injected by fleetgate: <id>]`` in the flow (:mod:`fleetgate.addons.credentials`).
Bodies are kept: replay reads LLM and MCP bodies. The file is created ``0600``; ``+FILE``
appends (as ``save_stream_file`` does). A file that cannot be opened stops the gateway at
startup; a write that fails later is logged as an ERROR for each flow it loses.
"""

from __future__ import annotations

import logging
import os
import re
import weakref
from typing import IO, Any

from mitmproxy import ctx, exceptions, http, io

__all__ = ["MASK", "FlowRecorder", "masked_copy"]

log = logging.getLogger(__name__)

MASK = "[masked by fleetgate]"
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie",
                            "x-amz-security-token"})
SECRET_WORDS = re.compile(r"key|token|secret|passw|signature|credential|session|auth",
                          re.IGNORECASE)
# names that contain those words and carry no secret, kept readable for review
NOT_SECRET = frozenset({"mcp-session-id", "x-fleetgate-decision-id", "keep-alive"})


def _mask_headers(headers: Any) -> None:
    for name in list(headers.keys()):
        low = name.lower()
        if low in NOT_SECRET:
            continue
        if low in SECRET_HEADERS or SECRET_WORDS.search(low):
            headers.set_all(name, [MASK] * len(headers.get_all(name)))


def masked_copy(flow: http.HTTPFlow) -> http.HTTPFlow:
    """A copy of ``flow`` with every credential header masked; ``flow`` is unchanged."""
    copy: http.HTTPFlow = flow.copy()
    _mask_headers(copy.request.headers)
    if copy.response is not None:
        _mask_headers(copy.response.headers)
    return copy


class FlowRecorder:
    def __init__(self) -> None:
        self._file: IO[bytes] | None = None
        self._writer: io.FlowWriter | None = None
        self._done: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()

    def load(self, loader: Any) -> None:
        loader.add_option(
            "fleetgate_record", str, "",
            "Append every finished flow, credential headers masked, to this file in "
            "mitmproxy's flow format (for fleetgate replay). '+FILE' appends to an existing "
            "file; FILE alone starts it afresh.")

    def configure(self, updated: set[str]) -> None:
        if "fleetgate_record" not in updated:
            return
        self._close()
        spec = ctx.options.fleetgate_record
        if not spec:
            return
        append = spec.startswith("+")
        path = os.path.expanduser(spec[1:] if append else spec)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC),
                         0o600)
        except OSError as exc:
            raise exceptions.OptionsError(f"fleetgate_record: cannot open {path!r} for "
                                          f"writing: {exc}") from None
        self._file = os.fdopen(fd, "ab" if append else "wb")
        self._writer = io.FlowWriter(self._file)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._writer = None

    def done(self) -> None:
        self._close()

    def _record(self, flow: http.HTTPFlow) -> None:
        if self._writer is None or flow in self._done:
            return
        self._done.add(flow)
        try:
            copy = masked_copy(flow)
        except Exception:  # never write what could not be masked
            log.exception("fleetgate_record: flow %s not recorded: masking it failed", flow.id)
            return
        try:
            self._writer.add(copy)
            assert self._file is not None
            self._file.flush()
        except (OSError, ValueError) as exc:
            log.error("fleetgate_record: flow %s not recorded: %s", flow.id, exc)

    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow)
