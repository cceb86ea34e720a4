"""AmbiguityGuard: refuse a request the gateway and the server could read differently.

First in the chain after ConnectionGuard, on the request headers (nothing of the body read
yet, no identity needed): a value the gateway judges that appears twice, two names for the
destination that disagree, or a path whose percent-decoding does not settle is answered
``400`` at once. Judging one reading while the upstream acts on another is how a policy is
bypassed, so there is no "pick one" here. The rule itself is pure
(:func:`fleetgate.normalize.ambiguity`, :func:`~fleetgate.normalize.path_ambiguity`).

Framing ambiguities (``Content-Length`` twice, with ``Transfer-Encoding``) never get this far:
mitmproxy refuses them itself while ``validate_inbound_headers`` is on, and ConnectionGuard
refuses to start with it off. This addon also declares ``fleetgate_max_json_depth``, the
nesting bound every request-body parser applies (:mod:`fleetgate.bodies`).
"""

from __future__ import annotations

from typing import Any

from mitmproxy import ctx, exceptions, http

from fleetgate import bodies
from fleetgate.addons.flowtools import deny, fail_closed, settled
from fleetgate.normalize import (
    PathError,
    ambiguity,
    normalize_host,
    path_ambiguity,
)


class AmbiguityGuard:
    def load(self, loader: Any) -> None:
        loader.add_option("fleetgate_max_json_depth", int, bodies.DEFAULT_MAX_JSON_DEPTH,
                          "Deepest JSON nesting accepted in a request body the gateway reads "
                          "(LLM, MCP, delegation); deeper is refused with 400.")

    def configure(self, updated: set[str]) -> None:
        if "fleetgate_max_json_depth" in updated:
            try:
                bodies.set_max_json_depth(ctx.options.fleetgate_max_json_depth)
            except ValueError as exc:
                raise exceptions.OptionsError(f"fleetgate_max_json_depth: {exc}") from None

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if settled(flow):
            return
        req = flow.request
        authority = req.authority if (req.is_http2 or req.is_http3) else ""
        reason = ambiguity(list(req.headers.items(multi=True)), authority)
        if reason is None and not (req.is_http2 or req.is_http3) and req.authority:
            reason = self._absolute_form(req)
        if reason:
            deny(flow, 400, "request.ambiguous", reason,
                 hint="send each of these headers once, with one value")
            return
        try:
            reason = path_ambiguity(req.path)  # one decoding pass; PathError if it never settles
        except PathError as exc:
            reason = str(exc)
        if reason:
            deny(flow, 400, "request.path", reason,
                 hint="send the path as clients do: dot segments resolved, no '#', no '\\', "
                      "percent-encoded once")

    @staticmethod
    def _absolute_form(req: http.Request) -> str | None:
        """An HTTP/1 request target naming a host (``GET https://other/x``) must name the
        destination the gateway judges: RFC 9112 servers take it over the Host header."""
        target = req.authority.rsplit(":", 1)
        host = target[0] if not req.authority.endswith("]") else req.authority
        port = int(target[1]) if len(target) == 2 and target[1].isdigit() else req.port
        if normalize_host(host) != normalize_host(req.host) or port != req.port:
            return (f"the request target names {req.authority!r} but the request goes to "
                    f"{req.host}:{req.port}: servers disagree on the destination")
        return None
