"""``fleetgate replay FLOWS... --rules NEW [--against OLD]``: recorded traffic, new policy.

Reads mitmproxy flow files (``mitmdump -w``, mitmweb's "Save", ``fleetgate run --record``)
with mitmproxy's own reader, and judges every HTTP request offline
(:mod:`fleetgate.offline.replay`) under NEW and under OLD, or under the decision recorded in
the flow when there is no OLD. Prints the flows whose decision changes (method, URL, old
rule -> new rule); ``--fail-on-change`` exits 1 when there is one (a CI gate for a rules
change).

Who sent a flow: the claims the gateway verified (``flow.metadata["fleetgate.claims"]``, in
every flow recorded through fleetgate), else the proxy token (``Proxy-Authorization`` on the
request, or on the CONNECT that opened its tunnel) verified with ``--jwt-secret-file`` or
``--jwks-file``. A flow with neither is reported as "no identity" and not judged.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mitmproxy import http

    from fleetgate.identity.tokens import Verifier
    from fleetgate.offline.replay import Recorded
    from fleetgate.policy.model import Policy

__all__ = ["add_replay_command", "read_flows"]

# A recorded token is judged as of when it was sent: its signature must verify, its age does
# not matter (ten years of leeway on exp and nbf).
REPLAY_LEEWAY = 10 * 365 * 86400.0


def _verifier(args: argparse.Namespace) -> Verifier | None:
    from fleetgate.identity.tokens import Verifier, VerifierConfig, load_jwks

    secret = Path(args.jwt_secret_file).read_bytes().strip() if args.jwt_secret_file else None
    jwks = load_jwks(Path(args.jwks_file).read_text()) if args.jwks_file else None
    if secret is None and jwks is None:
        return None
    return Verifier(VerifierConfig(hs_secret=secret, jwks=jwks, leeway=REPLAY_LEEWAY))


def _claims(flow: http.HTTPFlow, tunnels: dict[str, str], verifier: Verifier | None,
            ) -> tuple[dict[str, Any] | None, str]:
    from fleetgate.identity.tokens import IdentityError, parse_proxy_authorization

    claims = flow.metadata.get("fleetgate.claims")
    if isinstance(claims, dict) and claims:
        return dict(claims), "recorded claims"
    header = (flow.request.headers.get("proxy-authorization")
              or tunnels.get(flow.client_conn.id))
    if not header:
        return None, "no identity recorded and no proxy credentials"
    if verifier is None:
        return None, "proxy token not verified (pass --jwt-secret-file or --jwks-file)"
    try:
        return dict(verifier.verify(parse_proxy_authorization(header)).claims), "proxy token"
    except IdentityError as exc:
        return None, f"proxy token rejected: {exc}"


def _usage(flow: http.HTTPFlow) -> Any:
    from fleetgate.llm.usage import Usage

    tokens = (flow.metadata.get("fleetgate.llm_usage") or {}).get("tokens")
    if not isinstance(tokens, dict):
        return None
    return Usage(input=int(tokens.get("input") or 0), output=int(tokens.get("output") or 0))


def _answer(flow: http.HTTPFlow) -> Any:
    """An MCP list answer to filter again (JSON bodies only; events streams are skipped)."""
    if flow.metadata.get("fleetgate.mcp") is None or flow.response is None:
        return None
    try:
        return json.loads(flow.response.get_content(strict=False) or b"null")
    except ValueError:
        return None


def read_flows(paths: list[Path], verifier: Verifier | None) -> Iterator[Recorded]:
    """Every HTTP request in ``paths`` (CONNECTs only lend their credentials to the
    requests of their tunnel)."""
    from mitmproxy import http, io

    from fleetgate.offline.evaluate import OfflineRequest
    from fleetgate.offline.replay import Recorded

    for path in paths:
        tunnels: dict[str, str] = {}
        with path.open("rb") as fo:
            for flow in io.FlowReader(fo).stream():
                if not isinstance(flow, http.HTTPFlow):
                    continue
                req = flow.request
                if req.method == "CONNECT":
                    auth = req.headers.get("proxy-authorization")
                    if auth:
                        tunnels[flow.client_conn.id] = auth
                    continue
                claims, note = _claims(flow, tunnels, verifier)
                headers = tuple((k.decode("latin-1"), v.decode("latin-1"))  # as mitmproxy does
                                for k, v in req.headers.fields
                                if k.lower() != b"proxy-authorization")
                decision = flow.metadata.get("fleetgate.decision")
                mcp = flow.metadata.get("fleetgate.mcp")
                calls = mcp.get("calls") if isinstance(mcp, dict) else None
                yield Recorded(
                    id=flow.id,
                    request=OfflineRequest(req.method, req.scheme, req.host, req.port, req.path,
                                           headers, req.raw_content),
                    claims=claims, timestamp=req.timestamp_start,
                    decision=decision if isinstance(decision, dict) else None,
                    usage=_usage(flow), mcp_answer=_answer(flow), identity_note=note,
                    mcp_calls=tuple(c for c in calls if isinstance(c, dict))
                    if isinstance(calls, list) else ())


def cmd_replay(args: argparse.Namespace) -> int:
    from mitmproxy.exceptions import FlowReadException

    from fleetgate.offline.replay import replay
    from fleetgate.policy.loader import PolicyError, iter_problems, load_policy

    policies: list[Policy | None] = []
    for what in (args.rules, args.against):
        if not what:
            policies.append(None)
            continue
        try:
            policies.append(load_policy(what))
        except PolicyError as exc:
            for line in iter_problems(exc):
                print(line, file=sys.stderr)
            print(f"fleetgate: {what}: the rules are rejected (fleetgate rules check)",
                  file=sys.stderr)
            return 2
    new, old = policies
    assert new is not None
    try:
        verifier = _verifier(args)
    except (OSError, ValueError) as exc:
        print(f"fleetgate: cannot read the token keys: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        flows = list(read_flows([Path(p) for p in args.flows], verifier))
    except (OSError, FlowReadException) as exc:
        print(f"fleetgate: cannot read flows: {exc}; give files written by mitmdump -w, "
              "mitmweb or fleetgate run --record", file=sys.stderr)
        return 2
    report = replay(flows, new, old)
    took = time.perf_counter() - started
    if args.json:
        print(json.dumps({
            "flows": len(flows), "judged": report.judged, "seconds": round(took, 3),
            "changes": [c.as_dict() for c in report.changes],
            "no_identity": [{"flow": r.id, "method": r.request.method, "url": r.request.url,
                             "why": r.identity_note} for r in report.no_identity],
            "no_baseline": [r.id for r in report.no_baseline]}, indent=2))
    else:
        for c in report.changes:
            print(c.line())
            if args.verbose:
                print(f"    {c.new.reason}")
        for r in report.no_identity:
            print(f"no identity: {r.request.method} {r.request.url} ({r.identity_note})")
        against = args.against or "the decisions recorded in the flows"
        print(f"{len(report.changes)} of {report.judged} flow(s) change decision under "
              f"{args.rules} (against {against}); {len(report.no_identity)} without identity"
              + (f", {len(report.no_baseline)} without a recorded decision"
                 if report.no_baseline else "") + f"; {len(flows)} read in {took:.2f} s")
    return 1 if args.fail_on_change and report.changes else 0


def add_replay_command(sub: Any) -> None:
    r = sub.add_parser(
        "replay", help="judge recorded flows under new rules and print what changes",
        description="Read mitmproxy flow files (mitmdump -w, mitmweb, fleetgate run --record), "
                    "judge every request offline under --rules and under --against (or the "
                    "decision recorded in the flow), and print the flows whose decision "
                    "changes.")
    r.add_argument("flows", nargs="+", metavar="FLOWS", help="mitmproxy flow file(s)")
    r.add_argument("--rules", required=True, help="the new rules (file or directory)")
    r.add_argument("--against", default="",
                   help="the rules to compare with (default: the decision recorded with each "
                        "flow)")
    r.add_argument("--fail-on-change", action="store_true",
                   help="exit 1 when a flow's decision changes (CI)")
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.add_argument("--jwt-secret-file", default="",
                   help="HS256 secret to verify proxy tokens of flows recorded without "
                        "fleetgate's claims")
    r.add_argument("--jwks-file", default="", help="JWKS to verify those tokens")
    r.add_argument("-v", "--verbose", action="store_true", help="print each change's reason")
    r.set_defaults(func=cmd_replay)
