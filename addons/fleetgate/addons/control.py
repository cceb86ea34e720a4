"""ControlEndpoint: the gateway's own HTTPS host, reached through the proxy with no setup.

An agent already sends everything through ``HTTPS_PROXY`` and already trusts the gateway's
CA, so ``https://fleetgate.internal/...`` (``fleetgate_control_host``) needs no DNS entry, no
extra secret and no sidecar: KillSwitch has already checked the requester is live, and this
addon answers the request itself; nothing is ever dialled.

* ``POST /v1/delegate`` ``{"role": "security", "name": "scan-1", "ttl": 600}``: a child token
  (see :mod:`fleetgate.kill.delegation` for how its scope narrows); the parent-to-child edge
  is recorded in the session graph before the token is returned.
* ``GET /v1/whoami``: the requester's identity, its place in the session graph and whether
  anything (stop, pause, throttle) applies to it.

Only a request whose destination *is* the control host is answered: the tunnel's CONNECT
target (or the absolute URL of a plain-HTTP request), with Host and SNI agreeing. A
``Host: fleetgate.internal`` inside a tunnel to another host is domain fronting, left to
HttpAuthorization (``403 host-mismatch``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from mitmproxy import ctx, exceptions, http

from fleetgate.addons.flowtools import deny, fail_closed, settled
from fleetgate.addons.kill_flows import DELEGATION, subject_of
from fleetgate.addons.state import HEADER, claims_of, decision_id, record_decision, set_comment
from fleetgate.bodies import BodyError, parse_json
from fleetgate.errors import StateError
from fleetgate.kill.delegation import DelegationError
from fleetgate.kill.graph import GraphError
from fleetgate.kill.model import Subject
from fleetgate.metrics import GatewayMetrics
from fleetgate.normalize import normalize_host
from fleetgate.runtime.identity import IdentityRegistry
from fleetgate.runtime.kill import KillService
from fleetgate.runtime.policy import PolicyService

log = logging.getLogger(__name__)


class ControlEndpoint:
    """Talks to the kill service (session graph, kill log) and the identity registry (the
    HS256 secret child tokens are signed with when no delegation key is set)."""

    def __init__(self, kill: KillService, identities: IdentityRegistry, store: PolicyService,
                 metrics: GatewayMetrics) -> None:
        self.kill = kill
        self.identities = identities
        self.store = store
        self.metrics = metrics
        self.host = "fleetgate.internal"
        self._key: tuple[Any, str, str | None] | None = None  # (key, alg, kid)

    def load(self, loader: Any) -> None:
        loader.add_option("fleetgate_control_host", str, "fleetgate.internal",
                          "Host name agents use through the proxy for the gateway's own "
                          "endpoints (delegation, whoami). Never dialled.")
        loader.add_option("fleetgate_delegation_key_file", str, "",
                          "PEM private key (RSA, EC P-256 or Ed25519) child tokens are signed "
                          "with; its public key must be in fleetgate_jwks_file. '' signs with "
                          "the HS256 secret.")
        loader.add_option("fleetgate_delegation_kid", str, "",
                          "'kid' header of child tokens signed with fleetgate_delegation_key_file.")

    def configure(self, updated: set[str]) -> None:
        if "fleetgate_control_host" in updated:
            self.host = ctx.options.fleetgate_control_host.strip().lower()
        if {"fleetgate_delegation_key_file", "fleetgate_delegation_kid"} & updated:
            path = ctx.options.fleetgate_delegation_key_file
            if not path:
                self._key = None
                return
            try:
                key = load_pem_private_key(Path(path).read_bytes(), password=None)
            except (OSError, ValueError, TypeError) as exc:
                raise exceptions.OptionsError(
                    f"fleetgate_delegation_key_file: cannot load {path}: {exc}") from None
            if isinstance(key, rsa.RSAPrivateKey):
                alg = "RS256"
            elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1":
                alg = "ES256"
            elif isinstance(key, ed25519.Ed25519PrivateKey):
                alg = "EdDSA"
            else:
                raise exceptions.OptionsError(
                    "fleetgate_delegation_key_file must hold an RSA, EC P-256 or Ed25519 key")
            self._key = (key, alg, ctx.options.fleetgate_delegation_kid or None)

    def _addressed(self, flow: http.HTTPFlow) -> bool:
        """The destination, and every name the request gives for it, is the control host."""
        req = flow.request
        if normalize_host(req.host) != self.host:
            return False  # pretty_host would trust the Host header: not the destination
        header = req.host_header
        if header and normalize_host(header.rsplit(":", 1)[0]
                                     if not header.endswith("]") else header) != self.host:
            return False
        sni = flow.client_conn.sni
        return not sni or normalize_host(sni) == self.host

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if settled(flow) or not self._addressed(flow):
            return
        subject = subject_of(flow)
        if subject is None:
            return  # HttpAuthorization answers 407
        path = flow.request.path.split("?", 1)[0]
        method = flow.request.method
        if path == "/v1/delegate" and method == "POST":
            self._delegate(flow, subject, claims_of(flow))
        elif path == "/v1/whoami" and method == "GET":
            self._whoami(flow, subject)
        else:
            deny(flow, 404, "control.not-found", f"{method} {path} is not a fleetgate endpoint",
                 hint="use POST /v1/delegate or GET /v1/whoami")

    def _answer(self, flow: http.HTTPFlow, body: dict[str, Any], rule: str) -> None:
        flow.response = http.Response.make(
            200, json.dumps(body).encode(),
            {"Content-Type": "application/json", HEADER: decision_id(flow),
             "Cache-Control": "no-store"})
        record_decision(flow, True, rule, "answered by the gateway", 200)

    def _delegate(self, flow: http.HTTPFlow, parent: Subject, claims: dict[str, Any]) -> None:
        policy = self.store.policy
        if policy is None:
            deny(flow, 503, "no-policy", "the gateway has no valid policy loaded")
            return
        try:
            req = parse_json(flow.request.get_content(strict=False) or b"{}")
            if not isinstance(req, dict):
                raise ValueError
        except (BodyError, ValueError, UnicodeDecodeError):
            self.metrics.delegations.labels(result="bad_request").inc()
            deny(flow, 400, "delegation.bad_request", "the body must be a JSON object such as "
                 '{"role": "security"}')
            return
        try:
            child = self.kill.child_claims(claims, req, policy.delegation)
            token = self._sign(child)
            subject = Subject(agent=child["sub"], session=child["session_id"],
                              role=child["agent_role"], jti=child["jti"],
                              user=child.get("user"))
            self.kill.observe(subject, child["parent_session"], float(child["exp"]),
                              via="delegation")
        except DelegationError as exc:
            self.metrics.delegations.labels(result=exc.code).inc()
            deny(flow, exc.status, exc.code, exc.message,
                 hint="see the rules' delegation section")
            return
        except GraphError as exc:
            self.metrics.delegations.labels(result=f"delegation.{exc.code}").inc()
            deny(flow, 409, f"delegation.{exc.code}", str(exc))
            return
        try:
            fanout = self.kill.record_delegation(parent, child)
        except StateError as exc:  # a child the kill switch cannot record is not issued
            self.metrics.delegations.labels(result="killswitch.state").inc()
            deny(flow, 503, "killswitch.state", str(exc),
                 hint="retry shortly; an operator should check the gateway's state directory",
                 headers={"Retry-After": "1"})
            return
        self.metrics.delegations.labels(result="issued").inc()
        log.info("fleetgate: %s (session %s) delegated to %s (%s, session %s)", parent.agent,
                 parent.session, child["sub"], child["agent_role"], child["session_id"])
        set_comment(flow, f"delegated {child['agent_role']} child {child['sub']}")
        self._answer(flow, {"token": token, "agent": child["sub"], "role": child["agent_role"],
                            "session": child["session_id"], "parent_session":
                            child["parent_session"], "depth": child["delegation_depth"],
                            "expires_at": child["exp"], "jti": child["jti"]}, "delegation")
        if parent.session:  # KillWatch feeds these to the delegation triggers
            flow.metadata[DELEGATION] = (child["delegation_depth"], fanout)

    def _sign(self, claims: dict[str, Any]) -> str:
        if self._key is not None:
            key, alg, kid = self._key
            return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid} if kid else None)
        secret = self.identities.hs_secret()
        if not secret:
            raise DelegationError(503, "delegation.no_key",
                                  "the gateway has no signing key for child tokens (set "
                                  "fleetgate_delegation_key_file)")
        return jwt.encode(claims, secret, algorithm="HS256")

    def _whoami(self, flow: http.HTTPFlow, subject: Subject) -> None:
        node = self.kill.node(subject.session)
        v = self.kill.verdict(subject)
        self._answer(flow, {
            "agent": subject.agent, "role": subject.role, "session": subject.session,
            "user": subject.user, "parent_session": node.parent if node else None,
            "depth": node.depth if node else 0,
            "children": list(node.children) if node else [],
            "applies": None if v is None else {"verb": v.action.verb.value,
                                               "reason": v.reason, "action": v.action.id}},
            "whoami")
