"""The kill-switch CLI: ``fleetgate stop|kill|pause|throttle|resume|unrevoke|status|sessions
|killlog``, all over the running gateway's admin API (``fleetgate_admin_listen``).

The admin URL and token are found as :mod:`fleetgate.cli_config` says (flag, environment,
config file, ``state/admin-token``).

What the read commands print is made by pure functions (:func:`format_status`,
:func:`format_log_row`, :func:`format_tree`) over the admin API's JSON, so it is tested on
real payloads without a gateway; ``--json`` prints that JSON as the API returned it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from fleetgate.cli_config import DEFAULT_ADMIN, DEFAULT_TOKEN_FILE, add_admin_options, resolve_admin

__all__ = ["DEFAULT_ADMIN", "DEFAULT_TOKEN_FILE", "add_kill_commands", "admin_call", "emit",
           "format_log_row", "format_status", "format_tree", "span", "table", "when"]


def admin_call(url: str | None, path: str, body: dict[str, Any] | None = None,
               token_file: str | None = None) -> dict[str, Any]:
    """GET (or POST ``body`` to) the running gateway's admin API; exits with its error.
    ``url``/``token_file``: the ``--admin``/``--token-file`` flags (``None``: not given), see
    :func:`fleetgate.cli_config.resolve_admin`."""
    import urllib.error
    import urllib.request

    target = resolve_admin(url, token_file)
    base = target.url.rstrip("/")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data,
                                 headers={"Content-Type": "application/json"})
    if target.token:
        req.add_header("Authorization", f"Bearer {target.token}")
    try:
        with urllib.request.urlopen(req, timeout=35) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        hint = f"; {target.token_hint()}" if exc.code in (401, 403) else ""
        raise SystemExit(f"fleetgate: {base}{path}: HTTP {exc.code}: {detail}{hint}") from None
    except OSError as exc:
        raise SystemExit(f"fleetgate: cannot reach the gateway's admin API at {base} (from "
                         f"{target.url_from}): {exc}") from None


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
    if args.json:
        emit([json.dumps(out, indent=2)])
        return 1 if out.get("error") else 0
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
    if args.json:
        emit([json.dumps(out, indent=2)])
        return 0
    print(f"{args.cmd}: lifted {len(out['lifted'])} action(s)")
    for a in out["lifted"]:
        print(f"  {a['verb']} {a['id']} ({a['source']}): {a['reason']}")
    return 0


def emit(lines: Iterable[str]) -> None:
    """Print ``lines``; a reader that went away (``fleetgate killlog | head``) ends the
    command quietly instead of with a BrokenPipeError traceback."""
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that flush succeeds
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(0) from None


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """Columns aligned on the widest cell; the last column (free text) is not padded."""
    cells = [[str(c) for c in headers], *([("-" if c is None or c == "" else str(c))
                                          for c in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers) - 1)]
    return ["  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
            for r in cells]


def when(epoch: float | None) -> str:
    """An epoch time as UTC, to the second (the kill log's and the decision log's clock)."""
    if not epoch:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(epoch))


def span(seconds: float) -> str:
    """A duration an operator reads at a glance: ``45s``, ``9m58s``, ``2h03m``, ``3d04h``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def scope_label(scope: dict[str, Any]) -> str:
    """``session:s-1+descendants``, ``agent:x``, ``global``: the scope as the CLI takes it."""
    kind = str(scope.get("kind") or "?")
    value = scope.get("value")
    return kind + (f":{value}" if value else "") + \
        ("+descendants" if scope.get("cascade") else "")


def _verb(action: dict[str, Any]) -> str:
    thr = action.get("throttle")
    if action.get("verb") == "throttle" and isinstance(thr, dict):
        return f"throttle {thr.get('requests')}/{span(float(thr.get('per') or 0))}"
    return str(action.get("verb"))


def format_status(out: dict[str, Any], now: float) -> list[str]:
    """``fleetgate status``: a summary line, the actions in force, the triggers' states, then
    anything else the endpoint returned (a newer gateway's fields are shown, not dropped)."""
    acts = out.get("actions") or []
    lines = [f"{len(acts)} action(s) in force; {out.get('sessions', 0)} session(s) known; "
             f"{out.get('live_flows', 0)} flow(s) in flight; "
             f"{out.get('bound_tunnels', 0)} tunnel(s) bound"]
    if acts:
        lines += ["", "ACTIONS IN FORCE"]
        lines += table(
            ["ID", "ACTION", "SCOPE", "BY", "SOURCE", "SINCE", "EXPIRES", "REASON"],
            [[a.get("id"), _verb(a), scope_label(a.get("scope") or {}), a.get("by"),
              a.get("source"),
              f"{when(a.get('at'))} ({span(now - a['at'])} ago)" if a.get("at") else None,
              "never" if a.get("until") is None else
              f"in {span(a['remaining'] if a.get('remaining') is not None else a['until'] - now)}",
              a.get("reason")] for a in acts])
    triggers = out.get("triggers") or []
    if triggers:
        lines += ["", "TRIGGERS"]
        lines += table(
            ["TRIGGER", "METRIC", "PER", "KEY", "STATE", "VALUE", "ABOVE", "SINCE"],
            [[t.get("trigger"), t.get("metric"), t.get("per"), t.get("key"),
              "watching" if t.get("step") is None else f"{t.get('verb')} (step {t['step'] + 1})",
              f"{t['value']:g}" if isinstance(t.get("value"), int | float) else t.get("value"),
              f"{t['above']:g}" if isinstance(t.get("above"), int | float) else t.get("above"),
              f"{span(now - t['since'])} ago" if t.get("since") else None]
             for t in triggers])
    known = {"actions", "sessions", "live_flows", "bound_tunnels", "triggers"}
    rest = {k: v for k, v in out.items() if k not in known}
    if rest:
        lines.append("")
        lines += [f"{k}: {v if isinstance(v, str | int | float) else json.dumps(v)}"
                  for k, v in sorted(rest.items())]
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    out = _call(args, "/v1/status")
    emit([json.dumps(out, indent=2)] if args.json else format_status(out, time.time()))
    return 0


def format_tree(nodes: list[dict[str, Any]], indent: str = "") -> list[str]:
    """The session tree, one line a session, children indented below their parent."""
    lines = []
    for n in nodes:
        extra = f" [{n['state']} {n['action']}]" if n.get("state") != "live" else ""
        lines.append(f"{indent}{n['session']}  {n['agent']} ({n.get('role') or '-'}){extra}")
        lines += format_tree(n.get("children") or [], indent + "  ")
    return lines


def cmd_sessions(args: argparse.Namespace) -> int:
    out = _call(args, "/v1/sessions" + (f"?root={args.root}" if args.root else ""))
    emit([json.dumps(out, indent=2)] if args.json else format_tree(out["sessions"]))
    return 0


def llm_usage_text(llm: dict[str, Any]) -> str:
    """A cut LLM call's usage so far, as mitmweb's comment says it: ``openai gpt-4o: 12 in /
    30 out tokens (estimated), $0.000400``."""
    tokens = llm.get("tokens") or {}
    cost = llm.get("cost_usd")
    price = "unpriced" if cost is None else f"${cost:.6f}"
    est = " (estimated)" if llm.get("estimated") else ""
    return (f"{llm.get('provider')} {llm.get('model') or llm.get('response_model') or '?'}: "
            f"{tokens.get('input', 0)} in / {tokens.get('output', 0)} out tokens{est}, {price}")


def format_log_row(row: dict[str, Any]) -> str:
    """One kill-log row as one line: when, event, action id, then what the event says."""
    head = f"{when(row.get('at'))}  {row.get('event', '?'):<7} {row.get('action') or '-':<12}"
    event = row.get("event")
    if event == "cut" and row.get("tunnel") is not None:
        return f"{head}  {row.get('agent')}  tunnel {row['tunnel']}  {row.get('phase')}"
    if event == "cut":
        text = (f"{head}  {row.get('agent')}  {row.get('method', '')} {row.get('host', '')}"
                f"{row.get('path', '')}  {row.get('phase')}  sent {row.get('bytes_sent', 0)} B, "
                f"received {row.get('bytes_received', 0)} B")
        if row.get("mcp_tools"):
            text += f"  tools {', '.join(map(str, row['mcp_tools']))}"
        if isinstance(row.get("llm"), dict):
            text += f"  {llm_usage_text(row['llm'])}"
        return text
    if event in ("action", "lift", "expire") and isinstance(row.get("scope"), dict):
        text = (f"{head}  {row.get('verb')} {scope_label(row['scope'])} by {row.get('by')} "
                f"({row.get('source')}): {row.get('reason')}")
        if event == "action":
            text += f"; sessions {row.get('sessions')} + {row.get('descendants')}"
        return text
    if event == "delegate":
        return (f"{head}  {row.get('parent_agent')} ({row.get('parent_session')}) -> "
                f"{row.get('child_agent')} ({row.get('child_session')}) as {row.get('role')}, "
                f"depth {row.get('depth')}, expires {when(row.get('exp'))}")
    rest = {k: v for k, v in row.items() if k not in ("seq", "at", "event", "action")}
    return f"{head}  {json.dumps(rest)}"


def cmd_killlog(args: argparse.Namespace) -> int:
    q = f"?limit={args.limit}" + (f"&action={args.action}" if args.action else "")
    out = _call(args, "/v1/log" + q)
    emit(json.dumps(row) if args.json else format_log_row(row) for row in out["log"])
    return 0


def add_kill_commands(sub: Any) -> None:
    common = add_admin_options

    def scoped(p: argparse.ArgumentParser) -> None:
        p.add_argument("kind", nargs="?", choices=["agent", "token", "session", "role", "user",
                                                   "all", "global"],
                       help="what the scope names (all/global: the whole fleet)")
        p.add_argument("value", nargs="?",
                       help="the agent id, token id (jti), session id, role or user")
        p.add_argument("--all", action="store_true", help="every agent of the fleet")
        p.add_argument("--cascade", action="store_true",
                       help="and every sub-agent session below the sessions it reaches")
        p.add_argument("--by", default=os.environ.get("USER", "operator"),
                       help="who acts, for the kill log (default: $USER)")
        p.add_argument("--json", action="store_true", help="print the admin API's JSON")
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
            p.add_argument("--requests", type=int, required=True,
                           help="requests allowed per --per period")
            p.add_argument("--per", required=True, help="period, e.g. 10s or 1m")
        p.set_defaults(func=cmd_act)
    for name, helptext in (("resume", "lift pauses and throttles on exactly this scope"),
                           ("unrevoke", "lift stops on exactly this scope")):
        p = sub.add_parser(name, help=helptext)
        scoped(p)
        p.add_argument("--reason", default="", help="goes to the kill log")
        p.set_defaults(func=cmd_lift)
    st = sub.add_parser("status", help="kill-switch actions in force")
    st.add_argument("--json", action="store_true", help="print the admin API's JSON")
    common(st)
    st.set_defaults(func=cmd_status)
    ss = sub.add_parser("sessions", help="the session graph").add_subparsers(
        dest="sessions_cmd", required=True)
    tree = ss.add_parser("tree", help="sessions and their sub-agents, with their state")
    tree.add_argument("--root", help="only this session and the sessions below it")
    tree.add_argument("--json", action="store_true", help="print the admin API's JSON")
    common(tree)
    tree.set_defaults(func=cmd_sessions)
    kl = sub.add_parser("killlog", help="the append-only kill log (actions, lifts, cut flows)")
    kl.add_argument("--action", help="only rows of this action id")
    kl.add_argument("--limit", type=int, default=100,
                    help="the newest N rows (default: %(default)s)")
    kl.add_argument("--json", action="store_true", help="one JSON object per row (JSON lines)")
    common(kl)
    kl.set_defaults(func=cmd_killlog)
