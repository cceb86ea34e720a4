"""Console: the operator console, a WSGI app mounted on the admin listener at ``/console``.

A human signs in with their admin token (personal, from ``fleetgate_admin_users_file``, or
the shared one, which is ``admin``) and gets a session cookie (:mod:`.session`); the token is
checked once with :meth:`HttpListener.authenticate` and never kept. Every page reads the same
JSON views as the admin API and every button calls the same action, as the signed-in
operator (:meth:`Routes.call`): an approval made here is signed by that person, a stop
carries ``by`` = their name. The console adds no power the admin API does not have.

Requests without a valid session get the sign-in page (401) and nothing else; a POST must
carry the CSRF token of its session and, when the browser says where it comes from
(``Origin``), come from this origin. After each POST the answer is a 303 back to the page,
with a flash message (a signed cookie) saying what happened or why not.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fleetgate.approvals.operators import ADMIN, LOCAL, Operator, token_sha256
from fleetgate.console import pages
from fleetgate.console.session import COOKIE, FLASH_COOKIE, Flash, Session, Signer
from fleetgate.errors import NotFound, StateError
from fleetgate.runtime.listeners import HttpListener, Routes

__all__ = ["Console"]

log = logging.getLogger(__name__)

PREFIX = pages.PREFIX
MAX_FORM = 64 * 1024
SCOPE_KINDS = ("agent", "session", "role", "user", "token")  # never "all" from a button
HEADERS = [
    ("Content-Type", "text/html; charset=utf-8"),
    ("Cache-Control", "no-store"),
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
]

StartResponse = Callable[..., Any]


class Console:
    """The console's pages and forms over ``admin``'s routes (and ``health``'s budgets)."""

    def __init__(self, admin: HttpListener, health: Routes | None = None, *,
                 signer: Signer | None = None, refresh: int = 15,
                 clock: Callable[[], float] = time.time) -> None:
        self.listener = admin
        self.routes = admin.routes
        self.health = health
        self.signer = signer or Signer(clock=clock)
        self.refresh = refresh
        self.clock = clock

    # -- WSGI ----------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        cookies = _cookies(environ.get("HTTP_COOKIE", ""))
        if path == PREFIX + "/login":
            if method == "POST":
                return self._login(environ, start_response)
            return _redirect(start_response, PREFIX)
        found = self._session(cookies, environ.get("REMOTE_ADDR", ""))
        if found is None:
            clear = [_cookie(COOKIE, "", environ, 0)] if COOKIE in cookies else []
            return _page(start_response, "401 Unauthorized", pages.login_page(), clear)
        session, op = found
        if method == "POST":
            return self._post(path, environ, start_response, session, op)
        if method not in ("GET", "HEAD"):
            return _page(start_response, "405 Method Not Allowed",
                         pages.message_page("not allowed", f"{method} is not used here"))
        flash = self.signer.read_flash(cookies.get(FLASH_COOKIE), session)
        extra = [_cookie(FLASH_COOKIE, "", environ, 0)] if FLASH_COOKIE in cookies else []
        csrf = self.signer.csrf(session)
        if path in (PREFIX, PREFIX + "/"):
            body = self._overview(op, csrf, flash)
        elif path == PREFIX + "/approvals":
            body = self._decided(op, csrf, flash)
        elif path.startswith(PREFIX + "/approvals/"):
            detail = self._detail(path[len(PREFIX + "/approvals/"):], op, csrf, flash)
            if detail is None:
                return _page(start_response, "404 Not Found", pages.message_page(
                    "not found", "no such approval here", op.name, csrf), extra)
            body = detail
        else:
            return _page(start_response, "404 Not Found", pages.message_page(
                "not found", f"no console page {path}", op.name, csrf), extra)
        return _page(start_response, "200 OK", body, extra)

    # -- sessions ------------------------------------------------------------------------

    def _session(self, cookies: dict[str, str], peer: str) -> tuple[Session, Operator] | None:
        """The session in the cookie and its operator, if both are still good: signed, not
        expired, and opened with a credential the listener still accepts for that name."""
        s = self.signer.verify(cookies.get(COOKIE))
        if s is None:
            return None
        op = self._operator(s, peer)
        return (s, op) if op is not None else None

    def _operator(self, s: Session, peer: str) -> Operator | None:
        lst, bind = self.listener, self.signer.binding
        if s.operator == ADMIN.name:
            if lst.admin_token and _same(s.binding, bind(token_sha256(lst.admin_token))):
                return ADMIN
            return None
        if s.operator == LOCAL.name:
            if (not lst.admin_token and not len(lst.operators) and _is_loopback(peer)
                    and _same(s.binding, bind("local"))):
                return LOCAL
            return None
        for digest, op in lst.operators.by_hash:
            if op.name == s.operator and _same(s.binding, bind(digest)):
                return op
        return None

    def _login(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if not _same_origin(environ):
            return _page(start_response, "403 Forbidden",
                         pages.login_page("that form came from another site"))
        form = _form(environ)
        token = form.get("token", "").strip()
        peer = environ.get("REMOTE_ADDR", "")
        op = self.listener.authenticate(token or None, peer)
        if op is None:
            log.warning("fleetgate console: a sign-in from %s was refused", peer or "?")
            return _page(start_response, "401 Unauthorized", pages.login_page(
                "That is not an admin token of this gateway." if token else
                "Paste your admin token."))
        value, session = self.signer.issue(op.name, token_sha256(token) if token else "local")
        log.info("fleetgate console: %s signed in from %s", op.name, peer or "?")
        flash = self.signer.flash(f"signed in as {op.name}", True, session)
        return _redirect(start_response, PREFIX, [
            _cookie(COOKIE, value, environ, int(self.signer.lifetime)),
            _cookie(FLASH_COOKIE, flash, environ, 120)])

    # -- forms ---------------------------------------------------------------------------

    def _post(self, path: str, environ: dict[str, Any], start_response: StartResponse,
              session: Session, op: Operator) -> Iterable[bytes]:
        form = _form(environ)
        if not _same_origin(environ) or not self.signer.check_csrf(session, form.get("csrf")):
            log.warning("fleetgate console: a form for %s without its CSRF token was refused",
                        op.name)
            return _page(start_response, "403 Forbidden", pages.message_page(
                "refused", "This form does not belong to your session (it came from another "
                "page or an old session). Nothing was done; reload the console and try again.",
                op.name, self.signer.csrf(session)))
        if path == PREFIX + "/logout":
            log.info("fleetgate console: %s signed out", op.name)
            return _redirect(start_response, PREFIX, [_cookie(COOKIE, "", environ, 0),
                                                      _cookie(FLASH_COOKIE, "", environ, 0)])
        handlers = {"/approve": self._approve, "/deny": self._deny, "/act": self._act,
                    "/lift": self._lift}
        handler = handlers.get(path[len(PREFIX):]) if path.startswith(PREFIX) else None
        if handler is None:
            return _page(start_response, "404 Not Found", pages.message_page(
                "not found", f"no console action {path}", op.name, self.signer.csrf(session)))
        try:
            text, ok = handler(form, op)
        except (ValueError, TypeError, NotFound) as exc:
            text, ok = str(exc), False
        except StateError as exc:
            text, ok = f"not done: {exc}", False
        except Exception as exc:  # say so, never pretend it worked
            log.exception("fleetgate console: %s failed for %s", path, op.name)
            text, ok = f"failed: {type(exc).__name__}: {exc}", False
        log.info("fleetgate console: %s: %s", op.name, text)
        flash = self.signer.flash(text, ok, session)
        return _redirect(start_response, _back(form.get("back")),
                         [_cookie(FLASH_COOKIE, flash, environ, 120)])

    def _call(self, path: str, args: dict[str, Any], op: Operator) -> dict[str, Any]:
        if path not in self.routes.actions:
            raise ValueError(f"this gateway has no {path} action")
        return self.routes.call(path, args, op)

    def _approve(self, form: dict[str, str], op: Operator) -> tuple[str, bool]:
        aid = form.get("id", "")
        a = self._call("/v1/approvals/approve", {"id": aid, "note": form.get("note", "")}, op)
        votes, needed = len(a.get("votes") or []), a.get("needed")
        if a.get("status") == "approved":
            return (f"{op.name} approved {aid} ({a.get('tier')}, {votes} of {needed}): the "
                    "action goes through once", True)
        return (f"{op.name} approved {aid}: {votes} of {needed} approvals; it still needs "
                "another person", True)

    def _deny(self, form: dict[str, str], op: Operator) -> tuple[str, bool]:
        aid, reason = form.get("id", ""), form.get("reason", "").strip()
        if not reason:
            return f"{aid} was not denied: say why (the agent is told the reason)", False
        self._call("/v1/approvals/deny", {"id": aid, "reason": reason}, op)
        return f"{op.name} denied {aid}: {reason}", True

    def _act(self, form: dict[str, str], op: Operator) -> tuple[str, bool]:
        verb, scope = form.get("verb", ""), _scope(form)
        if verb not in ("stop", "pause"):
            raise ValueError("the console stops or pauses; throttles are the CLI's")
        reason = form.get("reason", "").strip() or f"{verb} from the console by {op.name}"
        out = self._call("/v1/actions", {"verb": verb, "scope": scope, "reason": reason,
                                         "by": op.name}, op)
        action = out.get("action") or {}
        text = f"{op.name}: {verb} {pages.scope_label(scope)} (action {action.get('id')})"
        cut = out.get("cut")
        if verb == "stop" and isinstance(cut, list):
            text += f"; {len(cut)} live flow(s) cut"
        if out.get("error"):
            return text + f"; in force here but NOT SAVED: {out['error']}", False
        return text, True

    def _lift(self, form: dict[str, str], op: Operator) -> tuple[str, bool]:
        what, scope = form.get("action", ""), _scope(form)
        out = self._call("/v1/lift", {"action": what, "scope": scope, "by": op.name,
                                      "reason": f"lifted from the console by {op.name}"}, op)
        gone = out.get("lifted") or []
        label = pages.scope_label(scope)
        if not gone:
            return f"nothing to lift on {label} (already lifted?)", False
        verbs = ", ".join(sorted({str(a.get("verb")) for a in gone}))
        return f"{op.name} resumed {label} (lifted {verbs})", True

    # -- pages ---------------------------------------------------------------------------

    def _view(self, routes: Routes | None, path: str, **args: str) -> dict[str, Any]:
        found = routes.view_for(path) if routes is not None else None
        if found is None:
            raise LookupError(f"this gateway serves no {path}")
        return found[0](**{**args, **found[1]})

    def _read(self, routes: Routes | None, path: str, key: str, errors: dict[str, str],
              name: str, **args: str) -> Any:
        try:
            return self._view(routes, path, **args).get(key) or []
        except Exception as exc:
            errors[name] = f"cannot read {path}: {type(exc).__name__}: {exc}"
            return []

    def _overview(self, op: Operator, csrf: str, flash: Flash | None) -> str:
        errors: dict[str, str] = {}
        pending = self._read(self.routes, "/v1/approvals", "approvals", errors, "pending",
                             status="pending")
        pending.sort(key=lambda a: float(a.get("created") or 0))
        actions = self._read(self.routes, "/v1/status", "actions", errors, "status")
        sessions = self._read(self.routes, "/v1/sessions", "sessions", errors, "sessions")
        budgets = self._read(self.health, "/budgets", "budgets", errors, "budgets")
        usage = self._read(self.health, "/usage", "agents", {}, "usage")
        agents = pages.agents_of(sessions, actions,
                                 [str(a.get("agent") or "") for a in pending] + list(usage))
        fleet = pages.fleet_section(actions=actions, sessions=sessions, agents=agents,
                                    budgets=budgets, csrf=csrf, back=PREFIX, errors=errors)
        return pages.overview_page(operator=op.name, csrf=csrf, flash=flash, now=self.clock(),
                                   pending=pending, pending_error=errors.get("pending", ""),
                                   fleet=fleet, refresh=self.refresh or None)

    def _decided(self, op: Operator, csrf: str, flash: Flash | None) -> str:
        errors: dict[str, str] = {}
        items = self._read(self.routes, "/v1/approvals", "approvals", errors, "decided",
                           status="all", limit="100")
        return pages.decided_page(operator=op.name, csrf=csrf, flash=flash, now=self.clock(),
                                  approvals=items, error=errors.get("decided", ""))

    def _detail(self, aid: str, op: Operator, csrf: str, flash: Flash | None) -> str | None:
        try:
            a = self._view(self.routes, "/v1/approvals/" + aid)
        except (NotFound, LookupError):
            return None
        return pages.detail_page(operator=op.name, csrf=csrf, flash=flash, now=self.clock(), a=a)


# -- HTTP helpers ------------------------------------------------------------------------


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _cookies(header: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name in (COOKIE, FLASH_COOKIE) and name not in out:
            out[name] = value.strip().strip('"')
    return out


def _cookie(name: str, value: str, environ: dict[str, Any], max_age: int) -> tuple[str, str]:
    secure = (environ.get("wsgi.url_scheme") == "https"
              or environ.get("HTTP_X_FORWARDED_PROTO", "").lower() == "https")
    return ("Set-Cookie", f"{name}={value}; Path={PREFIX}; Max-Age={max_age}; HttpOnly; "
                          f"SameSite=Strict" + ("; Secure" if secure else ""))


def _same_origin(environ: dict[str, Any]) -> bool:
    """No ``Origin`` (older clients, curl) is let through: the CSRF token decides. One that
    names another host:port, or ``null``, is refused. (The pages send ``Referrer-Policy:
    same-origin``: with ``no-referrer`` browsers send ``Origin: null`` on their own forms.)"""
    origin = environ.get("HTTP_ORIGIN")
    if origin is None:
        return True
    host = environ.get("HTTP_HOST", "")
    return bool(host) and urlsplit(origin).netloc == host


def _form(environ: dict[str, Any]) -> dict[str, str]:
    try:
        size = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        size = 0
    raw = environ["wsgi.input"].read(min(size, MAX_FORM)) if size > 0 else b""
    parsed = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in parsed.items()}


def _scope(form: dict[str, str]) -> dict[str, Any]:
    kind, value = form.get("kind", ""), form.get("value", "")
    if kind not in SCOPE_KINDS or not value:
        raise ValueError(f"name what to act on: one of {', '.join(SCOPE_KINDS)} and a value")
    return {"kind": kind, "value": value, "cascade": form.get("cascade") == "1"}


def _back(target: str | None) -> str:
    """Where a form returns: a console page, never elsewhere (no open redirect)."""
    if (not target or not target.startswith(PREFIX) or "//" in target or "\\" in target
            or any(ord(c) < 33 for c in target)):
        return PREFIX
    return target


def _page(start_response: StartResponse, status: str, body: str,
          extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    data = body.encode()
    start_response(status, [*HEADERS, ("Content-Length", str(len(data))), *(extra or [])])
    return [data]


def _redirect(start_response: StartResponse, where: str,
              extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    start_response("303 See Other", [("Location", where), ("Cache-Control", "no-store"),
                                     ("Content-Length", "0"), *(extra or [])])
    return [b""]
