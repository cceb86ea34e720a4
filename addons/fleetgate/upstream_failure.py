"""What to tell an agent when the upstream it was allowed to reach could not be reached.

mitmproxy answers a failed upstream (name does not resolve, connection refused, TLS failure,
timeout, a destination fleetgate refused to dial) with an HTML page no SDK can parse. The
gateway answers instead, in the client's format and with the decision id; this module only
decides *what* to say from mitmproxy's error message (pure, no mitmproxy import).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["CONNECT_TIMEOUT", "UpstreamFailure", "classify", "timed_out"]

# How the connect bound (fleetgate.addons.upstream_connect) starts the error it gives up with.
CONNECT_TIMEOUT = "fleetgate: no connection to"


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    status: int
    rule: str
    reason: str
    hint: str
    retry: bool  # whether the same request may succeed later (SDKs retry 5xx by default)


_KILLED = re.compile(r"^(?:Connection killed: )+")
_RESOLVE = re.compile(r"cannot resolve|name or service not known|nodename nor servname|"
                      r"temporary failure in name resolution|no address associated|getaddrinfo",
                      re.IGNORECASE)
_REFUSED = re.compile(r"refused|unreachable|errno 111|errno 113|reset by peer|connection reset",
                      re.IGNORECASE)
_TLS = re.compile(r"\btls\b|\bssl\b|certificate|handshake|alpn", re.IGNORECASE)
_TIMEOUT = re.compile(r"timed? ?out|timeout", re.IGNORECASE)


def timed_out(destination: str, seconds: float) -> UpstreamFailure:
    """The gateway itself gave up: no response headers within ``seconds`` (whatever error the
    closed connection then produced)."""
    return UpstreamFailure(
        504, "upstream.timeout",
        f"{destination} sent no response within {seconds:g}s (fleetgate_upstream_response_timeout)",
        "Retry later; the upstream is slow or unreachable.", True)


def classify(message: str, destination: str) -> UpstreamFailure:
    """Turn mitmproxy's error message for a flow with no response into an answer."""
    msg = _KILLED.sub("", message.strip()) or "the upstream connection failed"
    if msg.startswith("fleetgate: ") and not msg.startswith("fleetgate: no policy"):
        msg = msg.removeprefix("fleetgate: ")  # our own server_connect message, said once
    if msg.startswith("fleetgate refused to connect"):
        return UpstreamFailure(
            502, "destinations.connect", msg,
            "The destination resolves to an address this gateway does not dial; an operator "
            "can allow it (destinations.allowPrivate) if it is meant to be reached.", False)
    if msg.startswith(CONNECT_TIMEOUT.removeprefix("fleetgate: ")):
        return UpstreamFailure(
            504, "upstream.timeout",
            msg if destination.rsplit(":", 1)[0] in msg else f"{destination}: {msg}",
            "Retry later; the upstream is slow or unreachable.", True)
    if msg.startswith("fleetgate: no policy"):
        return UpstreamFailure(503, "no-policy", msg, "Retry shortly.", True)
    if _RESOLVE.search(msg):
        return UpstreamFailure(
            502, "upstream.resolve",
            msg if msg.startswith("cannot resolve") else f"cannot resolve {destination}: {msg}",
            "Check the host name; the gateway's DNS does not know it.", False)
    if _TIMEOUT.search(msg):
        return UpstreamFailure(
            504, "upstream.timeout", f"{destination} did not answer in time: {msg}",
            "Retry later; the upstream is slow or unreachable.", True)
    if _TLS.search(msg):
        return UpstreamFailure(
            502, "upstream.tls", f"TLS with {destination} failed: {msg}",
            "The upstream's certificate is not trusted by the gateway or the handshake failed; "
            "ask an operator (ssl_verify_upstream_trusted_ca).", False)
    if _REFUSED.search(msg):
        return UpstreamFailure(
            502, "upstream.connect", f"cannot connect to {destination}: {msg}",
            "Retry later; the upstream is down or refusing connections.", True)
    return UpstreamFailure(502, "upstream.error", f"{destination} failed: {msg}",
                           "Retry later.", True)
