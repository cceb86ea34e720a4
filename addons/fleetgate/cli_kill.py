"""The kill-switch CLI: ``fleetgate stop|kill|pause|throttle|resume|unrevoke|status|sessions
|killlog``, all over the running gateway's admin API (``fleetgate_admin_listen``).

The admin URL comes from ``--admin`` or ``$FLEETGATE_ADMIN_URL`` (default
``http://127.0.0.1:15021``); the token from ``$FLEETGATE_ADMIN_TOKEN``, ``--token-file`` or
``state/admin-token`` (what ``fleetgate run`` creates).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

DEFAULT_ADMIN = "http://127.0.0.1:15021"
DEFAULT_TOKEN_FILE = Path("state/admin-token")


def admin_call(url: str, path: str, body: dict[str, Any] | None = None,
               token_file: str | None = None) -> dict[str, Any]:
    """GET (or POST ``body`` to) the running gateway's admin API; exits with its error."""
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data,
                                 headers={"Content-Type": "application/json"})
    token = os.environ.get("FLEETGATE_ADMIN_TOKEN")
    tf = Path(token_file) if token_file else DEFAULT_TOKEN_FILE
    if not token and tf.exists():
        token = tf.read_text().strip()
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=35) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise SystemExit(f"fleetgate: {url}{path}: HTTP {exc.code}: {detail}") from None
    except OSError as exc:
        raise SystemExit(f"fleetgate: cannot reach the gateway's admin API at {url}: {exc}") from None


def _scope(args: argparse.Namespace) -> dict[str, Any]:
    if args.all or args.kind in ("all", "global"):
        return {"kind": "global", "value": None, "cascade": False}
    if not args.kind or not args.value:
        raise SystemExit("fleetgate: name a scope: agent|token|session|role|user VALUE, or --all")
    return {"kind": args.kind, "value": args.value, "cascade": bool(args.cascade)}


def _call(args: argparse.Namespace, path: str, body: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    return admin_call(args.admin, path, body, args.token_file)


def cmd_act(args: argparse.Namespace) -> int:
    verb = "stop" if args.cmd in ("stop", "kill") else args.cmd
    body: dict[str, Any] = {"verb": verb, "scope": _scope(args), "by": args.by,
                            "reason": args.reason}
    if verb == "throttle":
        from fleetgate.identity.mint import parse_ttl
        body.update(requests=args.requests, per=parse_ttl(args.per))
    if getattr(args, "for_", None):
        from fleetgate.identity.mint import parse_ttl
        body["for"] = parse_ttl(args.for_)
    out = _call(args, "/v1/actions", body)
    a = out["action"]
    label = a["scope"]["kind"] + (f":{a['scope']['value']}" if a["scope"]["value"] else "") + \
        ("+descendants" if a["scope"]["cascade"] else "")
    print(f"{a['verb']} {label}: action {a['id']} ({'applied' if out['new'] else 'already in force'})")
    print(f"  reaches {len(out['sessions'])} session(s) and {len(out['descendants'])} "
          f"descendant session(s)")
    if verb == "stop":
        print(f"  cut {len(out['cut'])} in-flight flow(s)/tunnel(s) in {out['cut_ms']:.1f} ms")
        for c in out["cut"]:
            print(f"    {c.get('agent')}  {c.get('method', '')} {c.get('host', '')}"
                  f"{c.get('path', '')}  {c.get('phase')}")
    if out.get("error"):
        print(f"  WARNING: {out['error']}")
        return 1
    return 0


def cmd_lift(args: argparse.Namespace) -> int:
    out = _call(args, "/v1/lift", {"action": args.cmd, "scope": _scope(args), "by": args.by,
                                   "reason": args.reason})
    print(f"{args.cmd}: lifted {len(out['lifted'])} action(s)")
    for a in out["lifted"]:
        print(f"  {a['verb']} {a['id']} ({a['source']}): {a['reason']}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    out = _call(args, "/v1/status")
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    acts = out["actions"]
    print(f"{len(acts)} action(s) in force; {out['sessions']} session(s) known; "
          f"{out['live_flows']} flow(s) in flight")
    for a in acts:
        s = a["scope"]
        label = s["kind"] + (f":{s['value']}" if s["value"] else "") + \
            ("+descendants" if s["cascade"] else "")
        left = f" ({a['remaining']:.0f}s left)" if a.get("remaining") else ""
        print(f"  {a['verb']:<8} {label:<40} {a['id']}  {a['source']}/{a['by']}{left}: "
              f"{a['reason']}")
    for t in out.get("triggers") or []:
        print(f"  trigger {t}")
    return 0


def _print_tree(nodes: list[dict[str, Any]], indent: str = "") -> None:
    for n in nodes:
        extra = f" [{n['state']} {n['action']}]" if n.get("state") != "live" else ""
        print(f"{indent}{n['session']}  {n['agent']} ({n.get('role') or '-'}){extra}")
        _print_tree(n["children"], indent + "  ")


def cmd_sessions(args: argparse.Namespace) -> int:
    out = _call(args, "/v1/sessions" + (f"?root={args.root}" if args.root else ""))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print_tree(out["sessions"])
    return 0


def cmd_killlog(args: argparse.Namespace) -> int:
    q = f"?limit={args.limit}" + (f"&action={args.action}" if args.action else "")
    out = _call(args, "/v1/log" + q)
    for row in out["log"]:
        if args.json:
            print(json.dumps(row))
            continue
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["at"]))
        if row["event"] == "cut":
            print(f"{when}  cut     {row.get('action') or '-'}  {row.get('agent')}  "
                  f"{row.get('method', '')} {row.get('host', '')}{row.get('path', '')}  "
                  f"{row.get('phase')}  sent {row.get('bytes_sent', 0)} B, received "
                  f"{row.get('bytes_received', 0)} B")
        elif row["event"] == "action":
            s = row["scope"]
            print(f"{when}  {row['verb']:<7} {row.get('action')}  {s['kind']}:{s['value']}"
                  f"{'+descendants' if s['cascade'] else ''} by {row['by']} ({row['source']}): "
                  f"{row['reason']}; sessions {row.get('sessions')} + {row.get('descendants')}")
        else:
            rest = {k: v for k, v in row.items() if k not in ("seq", "at", "event", "action")}
            print(f"{when}  {row['event']:<7} {row.get('action') or '-'}  {json.dumps(rest)}")
    return 0


def add_kill_commands(sub: Any) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--admin", default=os.environ.get("FLEETGATE_ADMIN_URL", DEFAULT_ADMIN),
                       help="admin API URL (default $FLEETGATE_ADMIN_URL or %(default)s)")
        p.add_argument("--token-file", help=f"admin token file (default $FLEETGATE_ADMIN_TOKEN "
                       f"or {DEFAULT_TOKEN_FILE})")

    def scoped(p: argparse.ArgumentParser) -> None:
        p.add_argument("kind", nargs="?", choices=["agent", "token", "session", "role", "user",
                                                   "all", "global"])
        p.add_argument("value", nargs="?")
        p.add_argument("--all", action="store_true", help="every agent of the fleet")
        p.add_argument("--cascade", action="store_true",
                       help="and every sub-agent session below the sessions it reaches")
        p.add_argument("--by", default=os.environ.get("USER", "operator"))
        common(p)

    for name, helptext in (("stop", "stop: refuse new requests (503), cut in-flight flows"),
                           ("kill", "same as stop"),
                           ("pause", "pause: new requests wait until resume"),
                           ("throttle", "throttle: a rate ceiling on the scope")):
        p = sub.add_parser(name, help=helptext)
        scoped(p)
        p.add_argument("--reason", required=True, help="goes to the kill log and the agent")
        if name in ("pause", "throttle"):
            p.add_argument("--for", dest="for_", help="lift itself after this long (e.g. 10m)")
        if name == "throttle":
            p.add_argument("--requests", type=int, required=True)
            p.add_argument("--per", required=True, help="period, e.g. 10s or 1m")
        p.set_defaults(func=cmd_act)
    for name, helptext in (("resume", "lift pauses and throttles on exactly this scope"),
                           ("unrevoke", "lift stops on exactly this scope")):
        p = sub.add_parser(name, help=helptext)
        scoped(p)
        p.add_argument("--reason", default="")
        p.set_defaults(func=cmd_lift)
    st = sub.add_parser("status", help="kill-switch actions in force")
    st.add_argument("--json", action="store_true")
    common(st)
    st.set_defaults(func=cmd_status)
    ss = sub.add_parser("sessions", help="the session graph").add_subparsers(
        dest="sessions_cmd", required=True)
    tree = ss.add_parser("tree", help="sessions and their sub-agents, with their state")
    tree.add_argument("--root")
    tree.add_argument("--json", action="store_true")
    common(tree)
    tree.set_defaults(func=cmd_sessions)
    kl = sub.add_parser("killlog", help="the append-only kill log (actions, lifts, cut flows)")
    kl.add_argument("--action", help="only rows of this action id")
    kl.add_argument("--limit", type=int, default=100)
    kl.add_argument("--json", action="store_true")
    common(kl)
    kl.set_defaults(func=cmd_killlog)
