"""What the gateway tells an agent whose allowed request's upstream failed (pure table).

The messages are mitmproxy's and the OS's as they reach the ``error`` hook (seen in the e2e
decision logs): the answer must name a rule an agent or operator can act on.
"""

from __future__ import annotations

import pytest

from fleetgate.upstream_failure import classify

DEST = "api.example.com:443"


@pytest.mark.parametrize(("message", "status", "rule", "retry"), [
    ("Connection killed: fleetgate: cannot resolve api.example.com: [Errno -2] Name or service "
     "not known", 502, "upstream.resolve", False),
    ("[Errno -3] Temporary failure in name resolution", 502, "upstream.resolve", False),
    ("[Errno 111] Connect call failed ('127.0.0.1', 9)", 502, "upstream.connect", True),
    ("[Errno 113] No route to host", 502, "upstream.connect", True),
    ("Connection reset by peer", 502, "upstream.connect", True),
    ("TLS handshake failed: certificate verify failed (unable to get local issuer certificate)",
     502, "upstream.tls", False),
    ("[Errno 110] Connection timed out", 504, "upstream.timeout", True),
    ("Connection killed: fleetgate refused to connect to db.internal: 10.0.0.5 is a private "
     "address", 502, "destinations.connect", False),
    ("Connection killed: fleetgate: no policy loaded", 503, "no-policy", True),
    ("Server disconnected unexpectedly.", 502, "upstream.error", True),
    ("", 502, "upstream.error", True),
])
def test_each_failure_is_named_by_a_rule(message: str, status: int, rule: str, retry: bool) -> None:
    failure = classify(message, DEST)
    assert (failure.status, failure.rule, failure.retry) == (status, rule, retry)
    assert failure.reason and failure.hint
    assert "Connection killed" not in failure.reason  # mitmproxy's wrapper, never shown


def test_resolve_reason_names_the_host_once() -> None:
    f = classify("Connection killed: fleetgate: cannot resolve api.example.com: [Errno -2] x", DEST)
    assert f.reason == "cannot resolve api.example.com: [Errno -2] x"
    g = classify("[Errno -2] Name or service not known", DEST)
    assert g.reason == f"cannot resolve {DEST}: [Errno -2] Name or service not known"
