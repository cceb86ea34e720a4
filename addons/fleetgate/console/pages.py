"""The console's HTML: pure functions from the admin API's JSON views to a page. No I/O.

Everything that comes from outside (agent ids, URLs, tool arguments, notes, reasons) goes
through :func:`esc` (``html.escape``, quotes too) at the one place it is written into the
page; nothing is marked safe. No script: forms POST, the server answers 303 and the next
page says what happened. The pages work without JavaScript and the CSP forbids it.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from fleetgate.console.session import Flash

__all__ = ["agents_of", "decided_page", "detail_page", "esc", "login_page", "message_page",
           "overview_page", "scope_label"]

PREFIX = "/console"
STATES = {"stop": "stopped", "pause": "paused", "throttle": "throttled"}
MAX_ARGS = 4000  # characters of tool arguments shown on the overview (the detail page: all)

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2433;background:#f6f7f9}
header{background:#1d2433;color:#fff;padding:.6em 1em;display:flex;gap:1em;align-items:center}
header a{color:#cfe0ff}header .who{margin-left:auto}
main{padding:1em;max-width:1200px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:.8em 1em;margin:0 0 1em}
h1{font-size:1.1em;margin:0}h2{font-size:1.05em;margin:0 0 .5em}
table{border-collapse:collapse;width:100%}td,th{border-top:1px solid #eceff3;padding:.35em;
text-align:left;vertical-align:top}th{font-weight:600;color:#4a5366}
pre{white-space:pre-wrap;word-break:break-all;margin:0;max-height:16em;overflow:auto;
background:#f2f4f7;padding:.3em}
.flash{padding:.6em 1em;border-radius:6px;margin:0 0 1em}.ok{background:#e3f6e8}
.err{background:#fde8e8}.muted{color:#6b7487}.approval{border-left:4px solid #e0a800}
form.inline{display:inline}input[type=text]{width:14em}button{cursor:pointer}
button.stop{background:#b42318;color:#fff;border:0;padding:.25em .6em;border-radius:4px}
button.go{background:#067647;color:#fff;border:0;padding:.25em .6em;border-radius:4px}
ul.tree{margin:.2em 0;padding-left:1.2em}.state-stopped{color:#b42318;font-weight:600}
.state-paused,.state-throttled{color:#b54708;font-weight:600}
"""


def esc(value: Any) -> str:
    """Text for HTML (element content and quoted attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def when(epoch: Any) -> str:
    if not isinstance(epoch, int | float):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


# -- pieces -----------------------------------------------------------------------------


def _form(action: str, csrf: str, back: str, fields: Mapping[str, Any], inner: str,
          cls: str = "inline") -> str:
    hidden = "".join(f'<input type="hidden" name="{esc(k)}" value="{esc(v)}">'
                     for k, v in {**fields, "csrf": csrf, "back": back}.items())
    return (f'<form class="{cls}" method="post" action="{PREFIX}/{esc(action)}">'
            f"{hidden}{inner}</form>")


def _pre(value: Any, limit: int | None = MAX_ARGS) -> str:
    if value is None or value == "" or value == {}:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, indent=2, sort_keys=True,
                                                             default=str)
    if limit is not None and len(text) > limit:
        text = text[:limit] + f"\n... ({len(text) - limit} more characters on the detail page)"
    return f"<pre>{esc(text)}</pre>"


def _flash(flash: Flash | None) -> str:
    if flash is None:
        return ""
    return (f'<div class="flash {"ok" if flash.ok else "err"}" role="status" id="flash">'
            f"{esc(flash.text)}</div>")


def layout(title: str, body: str, *, operator: str = "", csrf: str = "", flash: Flash | None = None,
           refresh: int | None = None) -> str:
    meta = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh else ""
    nav = ""
    if operator:
        logout = _form("logout", csrf, PREFIX, {}, '<button type="submit">Log out</button>')
        nav = (f'<a href="{PREFIX}">Overview</a><a href="{PREFIX}/approvals">Decided approvals</a>'
               f'<span class="who">signed in as <b id="operator">{esc(operator)}</b> '
               f"{logout}</span>")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{esc(title)} · fleetgate</title><style>{CSS}</style></head><body>"
            f"<header><h1>fleetgate console</h1>{nav}</header><main>{_flash(flash)}{body}"
            f"</main></body></html>")


def login_page(error: str = "") -> str:
    err = f'<div class="flash err" id="flash">{esc(error)}</div>' if error else ""
    body = (f"<section><h2>Sign in</h2>{err}<p>Paste your personal admin token (or the "
            f"shared one, which signs as <code>admin</code>). It is checked once and never "
            f"stored; the session lasts 8 hours.</p>"
            f'<form method="post" action="{PREFIX}/login">'
            f'<input type="password" name="token" id="token" autocomplete="off" '
            f'autofocus size="48"> <button type="submit" id="login">Sign in</button>'
            f"</form></section>")
    return layout("sign in", body)


def message_page(title: str, text: str, operator: str = "", csrf: str = "") -> str:
    return layout(title, f"<section><h2>{esc(title)}</h2><p>{esc(text)}</p>"
                         f'<p><a href="{PREFIX}">Back to the console</a></p></section>',
                  operator=operator, csrf=csrf)


# -- approvals --------------------------------------------------------------------------


def _action_cells(a: Mapping[str, Any], limit: int | None) -> str:
    act = a.get("action") or {}
    what = " ".join(str(x) for x in (act.get("method"), act.get("url")) if x)
    parts = [f'<div class="target">{esc(act.get("kind") or "")} {esc(what)}</div>']
    if act.get("tool"):
        parts.append(f'<div>tool <b class="tool">{esc(act["tool"])}</b></div>')
    if act.get("arguments") not in (None, "", {}):
        parts.append(f'<div class="arguments">{_pre(act.get("arguments"), limit)}</div>')
    if act.get("model"):
        parts.append(f'<div>model <b>{esc(act["model"])}</b></div>')
    if act.get("to"):
        parts.append(f'<div>to <b>{esc(act["to"])}</b></div>')
    if act.get("excerpt"):
        parts.append(f'<div class="excerpt">{_pre(act.get("excerpt"), limit)}</div>')
    return "".join(parts)


def _votes(a: Mapping[str, Any]) -> str:
    votes = a.get("votes") or []
    names = ", ".join(f"{v.get('by')}" + (f" ({v.get('note')})" if v.get("note") else "")
                      for v in votes)
    return f"{len(votes)} / {esc(a.get('needed'))}" + (f"<br>{esc(names)}" if names else "")


def _who(a: Mapping[str, Any]) -> str:
    ident = a.get("identity") or {}
    extra = ", ".join(f"{k} {ident[k]}" for k in ("role", "session", "user") if ident.get(k))
    return (f'<b class="agent">{esc(a.get("agent"))}</b>'
            + (f'<br><span class="muted">{esc(extra)}</span>' if extra else ""))


def _decide_forms(a: Mapping[str, Any], csrf: str, back: str) -> str:
    aid = a.get("id")
    approve = _form("approve", csrf, back, {"id": aid},
                    '<input type="text" name="note" placeholder="note (optional)"> '
                    '<button type="submit" class="go approve">Approve</button>', "decide")
    deny = _form("deny", csrf, back, {"id": aid},
                 '<input type="text" name="reason" placeholder="reason (required)" required> '
                 '<button type="submit" class="stop deny">Deny</button>', "decide")
    return approve + deny


def pending_section(approvals: list[dict[str, Any]], csrf: str, back: str, now: float,
                    error: str = "") -> str:
    if error:
        return f'<section id="pending"><h2>Pending approvals</h2><p class="err">{esc(error)}</p></section>'
    if not approvals:
        return ('<section id="pending"><h2>Pending approvals</h2>'
                '<p class="muted">Nothing is waiting for a decision.</p></section>')
    rows = []
    for a in approvals:
        aid = str(a.get("id") or "")
        deadline = a.get("deadline")
        due = (f"in {ago(deadline - now)}" if isinstance(deadline, int | float) and deadline > now
               else "passed")
        esc_n = int(a.get("escalations") or 0)
        rows.append(
            f'<tr class="approval" id="approval-{esc(aid)}" data-id="{esc(aid)}">'
            f'<td><a href="{PREFIX}/approvals/{esc(aid)}">{esc(aid)}</a><br>'
            f'tier <b class="tier">{esc(a.get("tier"))}</b>'
            + (f'<br><span class="muted">{esc(a.get("reason"))}</span>' if a.get("reason") else "")
            + f"</td><td>{_who(a)}</td><td>{_action_cells(a, MAX_ARGS)}</td>"
            f'<td class="votes">{_votes(a)}</td>'
            f'<td>{ago(now - float(a.get("created") or now))} ago<br>'
            f'<span class="muted">window ends {due}'
            + (f"; escalated {esc_n}x" if esc_n else "") + "</span></td>"
            f"<td>{_decide_forms(a, csrf, back)}</td></tr>")
    return ('<section id="pending"><h2>Pending approvals</h2><table><tr><th>approval</th>'
            "<th>agent</th><th>action</th><th>votes</th><th>age</th><th></th></tr>"
            + "".join(rows) + "</table></section>")


def decided_section(approvals: list[dict[str, Any]], now: float, error: str = "") -> str:
    title = "<h2>Recently decided</h2>"
    if error:
        return f'<section id="decided">{title}<p class="err">{esc(error)}</p></section>'
    done = [a for a in approvals if a.get("status") != "pending"]
    done.sort(key=lambda a: float(a.get("decided_at") or a.get("created") or 0), reverse=True)
    if not done:
        return f'<section id="decided">{title}<p class="muted">None yet.</p></section>'
    rows = []
    for a in done:
        status = str(a.get("status") or "")
        if status == "denied":
            by = f"denied by {a.get('denied_by')}: {a.get('denial_reason')}"
        else:
            by = "approved by " + ", ".join(str(v.get("by")) for v in a.get("votes") or [])
        out = a.get("outcome") or {}
        outcome = f"upstream answered {out['status']}" if out.get("status") else ""
        rows.append(
            f'<tr class="decided" data-id="{esc(a.get("id"))}"><td>'
            f'<a href="{PREFIX}/approvals/{esc(a.get("id"))}">{esc(a.get("id"))}</a><br>'
            f'{esc(a.get("tier"))}</td><td>{_who(a)}</td><td>{_action_cells(a, 600)}</td>'
            f'<td class="status">{esc(status)}<br>{esc(by)}<br>'
            f'<span class="muted">{esc(outcome)}</span></td>'
            f'<td>{esc(when(a.get("decided_at")))}</td></tr>')
    return (f'<section id="decided">{title}<table><tr><th>approval</th><th>agent</th>'
            "<th>action</th><th>decision</th><th>decided</th></tr>" + "".join(rows)
            + "</table></section>")


# -- fleet ------------------------------------------------------------------------------


def scope_label(scope: Mapping[str, Any]) -> str:
    kind = scope.get("kind")
    if kind == "global":
        return "everyone"
    return f"{kind} {scope.get('value')}" + (" and its sub-agents" if scope.get("cascade") else "")


def _lift_form(action: Mapping[str, Any], csrf: str, back: str) -> str:
    scope = action.get("scope") or {}
    lift = "unrevoke" if action.get("verb") == "stop" else "resume"
    return _form("lift", csrf, back,
                 {"action": lift, "kind": scope.get("kind"), "value": scope.get("value") or "",
                  "cascade": "1" if scope.get("cascade") else ""},
                 '<button type="submit" class="go resume">Resume</button>')


def _act_forms(kind: str, value: str, cascade: bool, csrf: str, back: str) -> str:
    out = []
    for verb, label, cls in (("stop", "Stop", "stop"), ("pause", "Pause", "")):
        out.append(_form("act", csrf, back,
                         {"verb": verb, "kind": kind, "value": value,
                          "cascade": "1" if cascade else ""},
                         f'<button type="submit" class="{cls} {verb}">{label}'
                         + (" family" if cascade else "") + "</button>"))
    return " ".join(out)


def _matches(action: Mapping[str, Any], kind: str, value: str, cascade: bool) -> bool:
    scope = action.get("scope") or {}
    return (scope.get("kind") == kind and scope.get("value") == value
            and bool(scope.get("cascade")) == cascade)


def agents_of(sessions: Iterable[Mapping[str, Any]], actions: Iterable[Mapping[str, Any]],
              extra: Iterable[str] = ()) -> list[str]:
    """Every agent the console knows of: in a session tree, named by an action, or asking."""
    names: set[str] = {a for a in extra if a}

    def walk(nodes: Iterable[Mapping[str, Any]]) -> None:
        for n in nodes:
            if n.get("agent"):
                names.add(str(n["agent"]))
            walk(n.get("children") or [])
    walk(sessions)
    for a in actions:
        scope = a.get("scope") or {}
        if scope.get("kind") == "agent" and scope.get("value"):
            names.add(str(scope["value"]))
    return sorted(names)


def _actions_table(actions: list[dict[str, Any]], csrf: str, back: str) -> str:
    if not actions:
        return '<p class="muted" id="no-actions">No stop, pause or throttle is in force.</p>'
    rows = []
    for a in actions:
        verb = str(a.get("verb") or "")
        thr = a.get("throttle") or {}
        rate = f" ({thr.get('requests')} per {thr.get('per')} s)" if thr else ""
        left = a.get("remaining")
        rows.append(
            f'<tr class="action" data-id="{esc(a.get("id"))}">'
            f'<td class="state-{esc(STATES.get(verb, verb))}">{esc(verb)}{esc(rate)}</td>'
            f'<td class="scope">{esc(scope_label(a.get("scope") or {}))}</td>'
            f'<td>{esc(a.get("reason"))}</td><td>{esc(a.get("by"))}'
            f' <span class="muted">({esc(a.get("source"))})</span></td>'
            f'<td>{esc(when(a.get("at")))}'
            + (f"<br>lifts itself in {ago(left)}" if isinstance(left, int | float) else "")
            + f"</td><td>{_lift_form(a, csrf, back)}</td></tr>")
    return ("<table><tr><th>action</th><th>scope</th><th>reason</th><th>by</th><th>since</th>"
            "<th></th></tr>" + "".join(rows) + "</table>")


def _agents_table(agents: list[str], actions: list[dict[str, Any]], csrf: str,
                  back: str) -> str:
    if not agents:
        return '<p class="muted">No agent seen yet.</p>'
    rows = []
    for name in agents:
        mine = [a for a in actions if _matches(a, "agent", name, False)]
        state = ", ".join(sorted({STATES.get(str(a.get("verb")), str(a.get("verb")))
                                  for a in mine})) or "live"
        buttons = _act_forms("agent", name, False, csrf, back)
        buttons += "".join(" " + _lift_form(a, csrf, back) for a in mine)
        rows.append(f'<tr class="agent-row" data-agent="{esc(name)}"><td>{esc(name)}</td>'
                    f'<td class="state state-{esc(state)}">{esc(state)}</td><td>{buttons}</td></tr>')
    return ("<table><tr><th>agent</th><th>state</th><th></th></tr>" + "".join(rows)
            + "</table>")


def _tree(nodes: list[dict[str, Any]], actions: list[dict[str, Any]], csrf: str,
          back: str) -> str:
    items = []
    for n in nodes:
        session = str(n.get("session") or "")
        state = str(n.get("state") or "live")
        mine = [a for a in actions if _matches(a, "session", session, True)]
        buttons = _act_forms("session", session, True, csrf, back)
        buttons += "".join(" " + _lift_form(a, csrf, back) for a in mine)
        items.append(
            f'<li class="session" data-session="{esc(session)}">session <b>{esc(session)}</b>'
            f' · agent {esc(n.get("agent"))} · role {esc(n.get("role") or "-")}'
            + (f" · user {esc(n['user'])}" if n.get("user") else "")
            + f' · <span class="state-{esc(state)}">{esc(state)}</span> {buttons}'
            + (_tree(n.get("children") or [], actions, csrf, back) if n.get("children") else "")
            + "</li>")
    return '<ul class="tree">' + "".join(items) + "</ul>"


def _budgets(budgets: list[dict[str, Any]]) -> str:
    if not budgets:
        return '<p class="muted">The rules set no budgets.</p>'
    rows = []
    for b in budgets:
        spend = b.get("spend") or []
        if not spend:
            rows.append(f"<tr><td>{esc(b.get('budget'))}</td><td>{esc(b.get('limit'))}</td>"
                        '<td colspan="3" class="muted">nothing spent yet</td></tr>')
        for s in spend:
            left = []
            if isinstance(b.get("hard_usd"), int | float):
                left.append(f"${max(0.0, b['hard_usd'] - float(s.get('usd') or 0)):.4f}")
            if isinstance(b.get("hard_tokens"), int):
                left.append(f"{max(0, b['hard_tokens'] - int(s.get('tokens') or 0)):,} tokens")
            rows.append(f"<tr><td>{esc(b.get('budget'))}</td><td>{esc(b.get('limit'))}</td>"
                        f"<td>{esc(s.get('key'))}</td>"
                        f"<td>${float(s.get('usd') or 0):.4f} / {int(s.get('tokens') or 0):,} tokens</td>"
                        f"<td>{esc(' and '.join(left) or 'no hard limit')}</td></tr>")
    return ("<table><tr><th>budget</th><th>limit</th><th>key</th><th>spent</th>"
            "<th>remaining</th></tr>" + "".join(rows) + "</table>")


def fleet_section(*, actions: list[dict[str, Any]], sessions: list[dict[str, Any]],
                  agents: list[str], budgets: list[dict[str, Any]], csrf: str, back: str,
                  errors: Mapping[str, str]) -> str:
    def part(key: str, body: str) -> str:
        return f'<p class="err">{esc(errors[key])}</p>' if key in errors else body
    trees = _tree(sessions, actions, csrf, back) if sessions else \
        '<p class="muted">No session recorded.</p>'
    return (f'<section id="actions"><h2>Actions in force</h2>'
            f'{part("status", _actions_table(actions, csrf, back))}</section>'
            f'<section id="agents"><h2>Agents</h2>'
            f'{part("agents", _agents_table(agents, actions, csrf, back))}</section>'
            f'<section id="sessions"><h2>Session trees</h2><p class="muted">A family button '
            f"acts on the session and every sub-agent it started.</p>"
            f'{part("sessions", trees)}</section>'
            f'<section id="budgets"><h2>Budgets remaining</h2>'
            f'{part("budgets", _budgets(budgets))}</section>')


# -- pages ------------------------------------------------------------------------------


def overview_page(*, operator: str, csrf: str, flash: Flash | None, now: float,
                  pending: list[dict[str, Any]], pending_error: str, fleet: str,
                  refresh: int | None) -> str:
    note = ('<p class="muted">This page refreshes itself every '
            f"{refresh} s while no approval is waiting (a form being filled is never "
            f'reloaded). <a href="{PREFIX}">Refresh now</a></p>') if refresh else \
        f'<p class="muted"><a href="{PREFIX}">Refresh</a></p>'
    body = note + pending_section(pending, csrf, PREFIX, now, pending_error) + fleet
    return layout("overview", body, operator=operator, csrf=csrf, flash=flash,
                  refresh=refresh if not pending else None)


def decided_page(*, operator: str, csrf: str, flash: Flash | None, now: float,
                 approvals: list[dict[str, Any]], error: str) -> str:
    return layout("decided approvals", decided_section(approvals, now, error),
                  operator=operator, csrf=csrf, flash=flash)


def detail_page(*, operator: str, csrf: str, flash: Flash | None, now: float,
                a: dict[str, Any]) -> str:
    aid = str(a.get("id") or "")
    back = f"{PREFIX}/approvals/{aid}"
    forms = _decide_forms(a, csrf, back) if a.get("status") == "pending" else ""
    body = (f'<section id="approval"><h2>Approval {esc(aid)} · {esc(a.get("status"))}</h2>'
            f"<table><tr><th>tier</th><td>{esc(a.get('tier'))} "
            f'<span class="muted">{esc(a.get("reason"))}</span></td></tr>'
            f"<tr><th>agent</th><td>{_who(a)}</td></tr>"
            f"<tr><th>action</th><td>{_action_cells(a, None)}</td></tr>"
            f'<tr><th>votes</th><td class="votes">{_votes(a)}</td></tr>'
            f"<tr><th>asked</th><td>{esc(when(a.get('created')))} "
            f"({ago(now - float(a.get('created') or now))} ago)</td></tr>"
            f"<tr><th>window ends</th><td>{esc(when(a.get('deadline')))}</td></tr>"
            + (f"<tr><th>denied</th><td>by {esc(a.get('denied_by'))}: "
               f"{esc(a.get('denial_reason'))}</td></tr>" if a.get("denied_by") else "")
            + (f"<tr><th>outcome</th><td>{_pre(a.get('outcome'))}</td></tr>"
               if a.get("outcome") else "")
            + f"</table>{forms}</section>")
    return layout(f"approval {aid}", body, operator=operator, csrf=csrf, flash=flash)
