"""``fleetgate approvals list|show|approve|deny``: people decide held actions from a shell.

Over the running gateway's admin API (``/v1/approvals``); who approves is who the token
says (a personal token from ``fleetgate_admin_users_file``, or ``admin`` for the shared
token). Formatting is pure (:func:`format_list`, :func:`format_one`), tested on JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from fleetgate.cli_config import add_admin_options
from fleetgate.cli_kill import admin_call, emit, span, table, when

__all__ = ["add_approvals_command", "format_list", "format_one"]


def _what(action: dict[str, Any]) -> str:
    kind = action.get("kind", "http")
    if kind == "mcp" and action.get("tool"):
        return f"mcp {action.get('server', '')} {action['tool']}".replace("  ", " ")
    if kind == "llm":
        return f"llm {action.get('model', '')}"
    if kind == "a2a":
        return f"a2a {action.get('a2a_method', '')} -> {action.get('to', '')}"
    return f"{action.get('method', '')} {action.get('url', '')}"


def format_list(out: dict[str, Any], now: float) -> list[str]:
    items = out.get("approvals") or []
    if not items:
        return ["no approvals (in this state)"]
    rows = []
    for a in items:
        votes = f"{len(a.get('votes') or [])}/{a.get('needed')}"
        due = a.get("deadline") or 0
        left = span(due - now) if due > now else f"overdue (escalated {a.get('escalations', 0)}x)"
        rows.append((a["id"], a["status"], a["tier"], a["agent"], votes,
                     span(now - float(a.get("created") or now)), left,
                     _what(a.get("action") or {})))
    return table(("ID", "STATUS", "TIER", "AGENT", "VOTES", "AGE", "WINDOW LEFT", "ACTION"), rows)


def format_one(a: dict[str, Any]) -> list[str]:
    action = a.get("action") or {}
    ident = a.get("identity") or {}
    lines = [f"approval {a['id']}: {a['status']}",
             f"  tier:      {a['tier']}" + (f" — {a['reason']}" if a.get("reason") else ""),
             f"  agent:     {a['agent']} (role {ident.get('role') or '-'}, session "
             f"{ident.get('session') or '-'}, user {ident.get('user') or '-'})",
             f"  asked:     {when(a.get('created'))}; window ends {when(a.get('deadline'))}"
             + (f"; escalated {a['escalations']}x" if a.get("escalations") else ""),
             f"  needs:     {a['needed']} distinct approver(s)"
             + (f" from {', '.join(a['approved_by'])}" if a.get("approved_by") else "")
             + (f"; second from {', '.join(a['secondary'])}" if a.get("secondary") else ""),
             f"  action:    {action.get('method', '')} {action.get('url', '')}"]
    for key, label in (("model", "model"), ("tool", "tool"), ("to", "to agent"),
                       ("a2a_method", "a2a")):
        if action.get(key):
            lines.append(f"  {label + ':':<10} {action[key]}")
    if action.get("arguments"):
        lines.append(f"  arguments: {json.dumps(action['arguments'], ensure_ascii=False)[:2000]}")
    if action.get("excerpt"):
        lines.append("  body:      " + action["excerpt"].replace("\n", "\n             "))
    for v in a.get("votes") or []:
        lines.append(f"  approved by {v['by']} at {when(v['at'])}"
                     + (f": {v['note']}" if v.get("note") else ""))
    if a.get("denied_by"):
        lines.append(f"  denied by {a['denied_by']}: {a.get('denial_reason')}")
    if a.get("consumed_at"):
        lines.append(f"  forwarded at {when(a['consumed_at'])} (decision "
                     f"{a.get('consumed_by_decision')})")
    if a.get("outcome"):
        lines.append(f"  outcome:   {json.dumps(a['outcome'])}")
    return lines


def _call(args: argparse.Namespace, path: str, body: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    return admin_call(args.admin, path, body, args.token_file)


def cmd_list(args: argparse.Namespace) -> int:
    out = _call(args, f"/v1/approvals?status={args.status}")
    emit([json.dumps(out, indent=2)] if args.json else format_list(out, time.time()))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    out = _call(args, f"/v1/approvals/{args.id}")
    emit([json.dumps(out, indent=2)] if args.json else format_one(out))
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    out = _call(args, "/v1/approvals/approve", {"id": args.id, "note": args.note})
    if args.json:
        emit([json.dumps(out, indent=2)])
        return 0
    votes = len(out.get("votes") or [])
    if out.get("status") == "approved":
        emit([f"{out['id']} approved ({', '.join(v['by'] for v in out['votes'])}): the agent's "
              "held request goes through now, or its next retry does (once)"])
    else:
        emit([f"{out['id']}: your approval is recorded ({votes} of {out.get('needed')}); "
              "it needs another person"])
    return 0


def cmd_deny(args: argparse.Namespace) -> int:
    out = _call(args, "/v1/approvals/deny", {"id": args.id, "reason": args.reason})
    if args.json:
        emit([json.dumps(out, indent=2)])
        return 0
    emit([f"{out['id']} denied by {out.get('denied_by')}: the agent is told, and the action "
          "will not be forwarded"])
    return 0


def add_approvals_command(sub: Any) -> None:
    p = sub.add_parser("approvals", help="actions held for human approval")
    ap = p.add_subparsers(dest="approvals_cmd", required=True)

    ls = ap.add_parser("list", help="approvals (pending by default)")
    ls.add_argument("--status", default="pending",
                    choices=["pending", "approved", "denied", "consumed", "all"],
                    help="which approvals (default: %(default)s)")
    ls.add_argument("--json", action="store_true", help="the admin API's JSON")
    ls.set_defaults(func=cmd_list)
    show = ap.add_parser("show", help="one approval: the action, who asked, who decided")
    show.add_argument("id", help="the approval id (fleetgate approvals list)")
    show.add_argument("--json", action="store_true", help="the admin API's JSON")
    show.set_defaults(func=cmd_show)
    approve = ap.add_parser("approve", help="approve (as the operator your token names)")
    approve.add_argument("id", help="the approval id (fleetgate approvals list)")
    approve.add_argument("--note", default="", help="kept with your approval in the audit log")
    approve.set_defaults(func=cmd_approve)
    deny = ap.add_parser("deny", help="deny, final: the agent is told who and why")
    deny.add_argument("id", help="the approval id (fleetgate approvals list)")
    deny.add_argument("--reason", required=True, help="told to the agent and kept in the log")
    deny.set_defaults(func=cmd_deny)
    for sp in (approve, deny):
        sp.add_argument("--json", action="store_true", help="the admin API's JSON")
    for sp in (ls, show, approve, deny):
        add_admin_options(sp)
