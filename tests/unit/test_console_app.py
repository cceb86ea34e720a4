"""The console as a WSGI app over a real admin listener's routes (fake views and actions):
sign-in, sessions bound to the credential, CSRF, who acts, and hostile strings escaped."""

from __future__ import annotations

import io
from typing import Any
from urllib.parse import urlencode

import pytest

from fleetgate.approvals.model import ApprovalConflict
from fleetgate.approvals.operators import Operator, parse_operators, token_sha256
from fleetgate.console import Console
from fleetgate.console.session import LIFETIME, Signer
from fleetgate.metrics import GatewayMetrics
from fleetgate.runtime.listeners import HttpListener, Routes

ALICE, BOB, SHARED = "alice-token-0123456789", "bob-token-0123456789", "shared-admin-token-0123"
XSS = "<script>alert(1)</script>"
ATTR = '"><img src=x onerror=alert(2)>'


def _users(*pairs: tuple[str, str]) -> str:
    return "operators:\n" + "".join(
        f"- {{name: {n}, groups: [oncall], tokenSha256: {token_sha256(t)}}}\n" for n, t in pairs)


class Clock:
    now = 2_000_000.0

    def __call__(self) -> float:
        return self.now


class Fleet:
    """Stand-ins for the views and actions the real services register."""

    def __init__(self, admin: Routes, health: Routes) -> None:
        self.calls: list[tuple[str, dict[str, Any], Operator | None]] = []
        self.approvals = [{
            "id": "apr_1", "tier": "external-comms", "status": "pending", "agent": "mailer" + ATTR,
            "action": {"kind": "mcp", "method": "POST", "url": "https://x.test/send?q=" + XSS,
                       "tool": "send_" + XSS, "arguments": {"body": XSS, ATTR: 1},
                       "model": "gpt" + ATTR, "excerpt": XSS},
            "identity": {"role": "writer", "session": "s-" + XSS}, "needed": 2,
            "votes": [{"by": "bob", "at": 1_999_000.0, "note": XSS}], "reason": "mail" + XSS,
            "created": 1_999_000.0, "deadline": 2_050_000.0, "escalations": 0}]
        self.deny_with: Exception | None = None
        admin.get("/v1/approvals", self.list_view)
        admin.get("/v1/approvals/{approval_id}", self.show)
        admin.post("/v1/approvals/approve", self.approve, operator=True)
        admin.post("/v1/approvals/deny", self.deny, operator=True)
        admin.get("/v1/status", lambda: {"actions": [{
            "id": "act1", "verb": "stop", "scope": {"kind": "agent", "value": "bad" + XSS,
                                                    "cascade": False},
            "reason": XSS, "by": "bob", "source": "operator", "at": 1_999_500.0}]})
        admin.get("/v1/sessions", lambda: {"sessions": [{
            "session": "s1", "agent": "lead", "role": "coord", "state": "live", "children": [
                {"session": "s2" + ATTR, "agent": "sub", "role": "r", "state": "stopped",
                 "children": []}]}]})
        admin.post("/v1/actions", self.act)
        admin.post("/v1/lift", self.lift)
        health.get("/budgets", lambda: {"budgets": [{
            "budget": "daily", "limit": "$10 per day (UTC)", "hard_usd": 10.0, "hard_tokens": None,
            "spend": [{"key": "agent:lead", "usd": 2.5, "tokens": 100}]}]})

    def list_view(self, status: str = "pending", limit: str = "200") -> dict[str, Any]:
        return {"approvals": [a for a in self.approvals
                              if status == "all" or a["status"] == status]}

    def show(self, approval_id: str) -> dict[str, Any]:
        from fleetgate.errors import NotFound
        for a in self.approvals:
            if a["id"] == approval_id:
                return a
        raise NotFound(approval_id)

    def approve(self, args: dict[str, Any], op: Operator) -> dict[str, Any]:
        self.calls.append(("approve", args, op))
        if op.name == "bob":
            raise ApprovalConflict("bob already approved apr_1; the tier 'external-comms' "
                                   "needs 2 distinct people")
        return {**self.approvals[0], "status": "approved",
                "votes": [*self.approvals[0]["votes"], {"by": op.name}]}

    def deny(self, args: dict[str, Any], op: Operator) -> dict[str, Any]:
        self.calls.append(("deny", args, op))
        if self.deny_with is not None:
            raise self.deny_with
        return {**self.approvals[0], "status": "denied"}

    def act(self, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("act", args, None))
        return {"action": {"id": "a9"}, "cut": []}

    def lift(self, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("lift", args, None))
        return {"lifted": [{"verb": "stop"}]}


class Browser:
    """Calls the WSGI app like a browser: keeps cookies, follows nothing."""

    def __init__(self, app: Console, peer: str = "127.0.0.1") -> None:
        self.app = app
        self.peer = peer
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, form: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, list[str]], str]:
        body = urlencode(form or {}).encode()
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method, "PATH_INFO": path, "REMOTE_ADDR": self.peer,
            "HTTP_HOST": "127.0.0.1:15021", "wsgi.url_scheme": "http",
            "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body),
            "HTTP_COOKIE": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        for k, v in (headers or {}).items():
            environ["HTTP_" + k.upper().replace("-", "_")] = v
        seen: dict[str, Any] = {}

        def start_response(status: str, hdrs: list[tuple[str, str]]) -> None:
            seen["status"] = int(status.split()[0])
            seen["headers"] = {}
            for k, v in hdrs:
                seen["headers"].setdefault(k.lower(), []).append(v)
        text = b"".join(self.app(environ, start_response)).decode()
        for c in seen["headers"].get("set-cookie", []):
            name, _, rest = c.partition("=")
            value = rest.split(";")[0]
            if "Max-Age=0" in c:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return seen["status"], seen["headers"], text

    def csrf(self) -> str:
        _, _, page = self.request("GET", "/console")
        return page.split('name="csrf" value="')[1].split('"')[0]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def listener() -> HttpListener:
    admin = HttpListener(GatewayMetrics(), lambda: {}, admin=True)
    admin.admin_token = SHARED
    admin.operators = parse_operators(_users(("alice", ALICE), ("bob", BOB)))
    return admin


@pytest.fixture
def fleet(listener: HttpListener) -> Fleet:
    health = Routes()
    f = Fleet(listener.routes, health)
    f.health = health  # type: ignore[attr-defined]
    return f


@pytest.fixture
def app(listener: HttpListener, fleet: Fleet, clock: Clock) -> Console:
    return Console(listener, fleet.health, signer=Signer(clock=clock),  # type: ignore[attr-defined]
                   clock=clock)


def signed_in(app: Console, token: str) -> Browser:
    b = Browser(app)
    status, headers, _ = b.request("POST", "/console/login", {"token": token})
    assert status == 303 and headers["location"] == ["/console"]
    return b


def test_without_a_session_every_page_is_the_sign_in_page(app: Console, fleet: Fleet) -> None:
    b = Browser(app)
    for method, path in (("GET", "/console"), ("GET", "/console/approvals"),
                         ("GET", "/console/approvals/apr_1"), ("POST", "/console/approve"),
                         ("POST", "/console/act"), ("GET", "/console/nope")):
        status, _, page = b.request(method, path, {"id": "apr_1"})
        assert status == 401, path
        assert "apr_1" not in page and 'name="token"' in page
    assert fleet.calls == []


def test_sign_in_sets_a_strict_http_only_cookie_without_the_token(app: Console) -> None:
    b = Browser(app)
    status, headers, _ = b.request("POST", "/console/login", {"token": ALICE})
    assert status == 303
    session = next(c for c in headers["set-cookie"] if c.startswith("fleetgate_console="))
    assert "HttpOnly" in session and "SameSite=Strict" in session
    assert "Path=/console" in session and f"Max-Age={int(LIFETIME)}" in session
    assert "Secure" not in session  # plain HTTP here; behind TLS (X-Forwarded-Proto) it is
    assert ALICE not in session and token_sha256(ALICE) not in session
    _, headers, _ = b.request("POST", "/console/login", {"token": ALICE},
                              {"X-Forwarded-Proto": "https"})
    assert all("; Secure" in c for c in headers["set-cookie"])
    status, _, page = b.request("GET", "/console")
    assert status == 200 and 'id="operator">alice<' in page and "signed in as alice" in page


@pytest.mark.parametrize("token", ["", "wrong-token", ALICE + "x", token_sha256(ALICE)])
def test_a_wrong_token_does_not_sign_in(app: Console, token: str) -> None:
    b = Browser(app)
    status, headers, page = b.request("POST", "/console/login", {"token": token})
    assert status == 401 and "set-cookie" not in headers and "apr_1" not in page


def test_the_session_ends_after_eight_hours(app: Console, clock: Clock) -> None:
    b = signed_in(app, ALICE)
    clock.now += LIFETIME - 5
    assert b.request("GET", "/console")[0] == 200
    clock.now += 5
    status, headers, _ = b.request("GET", "/console")
    assert status == 401 and any("Max-Age=0" in c for c in headers["set-cookie"])


def test_a_session_ends_when_its_token_is_rotated_or_its_operator_removed(
        app: Console, listener: HttpListener) -> None:
    alice, bob, admin = signed_in(app, ALICE), signed_in(app, BOB), signed_in(app, SHARED)
    assert 'id="operator">admin<' in admin.request("GET", "/console")[2]
    listener.operators = parse_operators(_users(("alice", "alice-new-token-0123456789")))
    listener.admin_token = "another-shared-token-0123"
    assert alice.request("GET", "/console")[0] == 401  # rotated
    assert bob.request("GET", "/console")[0] == 401  # removed
    assert admin.request("GET", "/console")[0] == 401  # shared token changed


def test_a_session_cookie_from_another_process_is_refused(
        app: Console, listener: HttpListener, fleet: Fleet, clock: Clock) -> None:
    other = Console(listener, fleet.health, signer=Signer(clock=clock))  # type: ignore[attr-defined]
    b = signed_in(other, ALICE)
    b.app = app
    assert b.request("GET", "/console")[0] == 401


def test_a_form_without_its_sessions_csrf_token_does_nothing(app: Console, fleet: Fleet) -> None:
    alice, bob = signed_in(app, ALICE), signed_in(app, BOB)
    bobs = bob.csrf()
    for form in ({"id": "apr_1"}, {"id": "apr_1", "csrf": ""}, {"id": "apr_1", "csrf": bobs}):
        status, _, page = alice.request("POST", "/console/approve", form)
        assert status == 403 and "Nothing was done" in page
    csrf = alice.csrf()
    status, _, _ = alice.request("POST", "/console/approve", {"id": "apr_1", "csrf": csrf},
                                 {"Origin": "https://evil.example"})
    assert status == 403
    status, _, _ = alice.request("POST", "/console/approve", {"id": "apr_1", "csrf": csrf},
                                 {"Origin": "null"})
    assert status == 403
    assert fleet.calls == []


def test_an_approval_is_signed_by_the_session_operator(app: Console, fleet: Fleet) -> None:
    b = signed_in(app, ALICE)
    status, headers, _ = b.request("POST", "/console/approve",
                                   {"id": "apr_1", "note": "ok", "csrf": b.csrf(),
                                    "back": "/console/approvals/apr_1"},
                                   {"Origin": "http://127.0.0.1:15021"})
    assert status == 303 and headers["location"] == ["/console/approvals/apr_1"]
    [(what, args, op)] = fleet.calls
    assert what == "approve" and args == {"id": "apr_1", "note": "ok"}
    assert op == Operator("alice", frozenset({"oncall"}))
    page = b.request("GET", "/console")[2]
    assert "alice approved apr_1 (external-comms, 2 of 2): the action goes through once" in page
    assert "alice approved" not in b.request("GET", "/console")[2]  # a flash shows once


def test_a_refusal_is_flashed_as_an_error(app: Console, fleet: Fleet) -> None:
    b = signed_in(app, BOB)
    b.request("POST", "/console/approve", {"id": "apr_1", "csrf": b.csrf()})
    page = b.request("GET", "/console")[2]
    assert ('class="flash err"' in page and "bob already approved apr_1; the tier "
            "&#x27;external-comms&#x27; needs 2 distinct people" in page)


def test_a_denial_needs_a_reason_and_says_who(app: Console, fleet: Fleet) -> None:
    b = signed_in(app, ALICE)
    b.request("POST", "/console/deny", {"id": "apr_1", "reason": "  ", "csrf": b.csrf()})
    assert "say why" in b.request("GET", "/console")[2] and fleet.calls == []
    b.request("POST", "/console/deny", {"id": "apr_1", "reason": "no " + XSS, "csrf": b.csrf()})
    [(what, args, op)] = fleet.calls
    assert what == "deny" and args["reason"] == "no " + XSS and op is not None
    page = b.request("GET", "/console")[2]
    assert "alice denied apr_1: no &lt;script&gt;" in page and XSS not in page
    fleet.deny_with = RuntimeError("store on fire")
    b.request("POST", "/console/deny", {"id": "apr_1", "reason": "x", "csrf": b.csrf()})
    assert "failed: RuntimeError: store on fire" in b.request("GET", "/console")[2]


def test_stop_and_resume_carry_the_operator_name(app: Console, fleet: Fleet) -> None:
    b = signed_in(app, ALICE)
    b.request("POST", "/console/act", {"verb": "stop", "kind": "session", "value": "s1",
                                       "cascade": "1", "csrf": b.csrf()})
    b.request("POST", "/console/lift", {"action": "unrevoke", "kind": "agent", "value": "bad",
                                        "csrf": b.csrf()})
    (_, act, _), (_, lift, _) = fleet.calls
    assert act == {"verb": "stop", "scope": {"kind": "session", "value": "s1", "cascade": True},
                   "reason": "stop from the console by alice", "by": "alice"}
    assert lift["by"] == "alice" and lift["action"] == "unrevoke"
    assert lift["scope"] == {"kind": "agent", "value": "bad", "cascade": False}
    assert "alice resumed agent bad (lifted stop)" in b.request("GET", "/console")[2]


@pytest.mark.parametrize("form", [
    {"verb": "stop", "kind": "global", "value": "x"}, {"verb": "stop", "kind": "agent", "value": ""},
    {"verb": "throttle", "kind": "agent", "value": "a"}])
def test_the_console_never_stops_everyone_or_throttles(app: Console, fleet: Fleet,
                                                       form: dict[str, str]) -> None:
    b = signed_in(app, ALICE)
    b.request("POST", "/console/act", {**form, "csrf": b.csrf()})
    assert fleet.calls == []
    assert 'class="flash err"' in b.request("GET", "/console")[2]


@pytest.mark.parametrize("back", ["//evil.example/", "https://evil.example/", "/elsewhere",
                                  "/console\\@evil", "/console\r\nX: y", ""])
def test_a_form_returns_only_to_a_console_page(app: Console, back: str) -> None:
    b = signed_in(app, ALICE)
    status, headers, _ = b.request("POST", "/console/approve",
                                   {"id": "apr_1", "csrf": b.csrf(), "back": back})
    assert status == 303 and headers["location"] == ["/console"]


def test_hostile_strings_are_shown_as_text(app: Console) -> None:
    b = signed_in(app, ALICE)
    for path in ("/console", "/console/approvals/apr_1"):
        status, headers, page = b.request("GET", path)
        assert status == 200
        assert "<script" not in page and "<img" not in page and "onerror=alert(2)>" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in page
        csp = headers["content-security-policy"][0]
        assert "default-src 'none'" in csp and "script-src" not in csp
        assert headers["x-frame-options"] == ["DENY"] and headers["cache-control"] == ["no-store"]


def test_the_overview_shows_the_queue_and_the_fleet(app: Console) -> None:
    b = signed_in(app, ALICE)
    page = b.request("GET", "/console")[2]
    assert 'data-id="apr_1"' in page and "1 / 2" in page  # votes so far / needed
    assert "16 min ago" in page and "window ends in 13 h 53 min" in page
    assert 'data-session="s1"' in page and "Stop family" in page and "Pause family" in page
    assert 'data-agent="lead"' in page and 'data-agent="sub"' in page
    assert "$7.5000" in page  # $10 budget, $2.50 spent
    assert 'http-equiv="refresh"' not in page  # a form may be being filled: never reloaded


def test_the_overview_refreshes_itself_while_nothing_waits(app: Console, fleet: Fleet) -> None:
    fleet.approvals.clear()
    page = signed_in(app, ALICE).request("GET", "/console")[2]
    assert '<meta http-equiv="refresh" content="15">' in page
    assert "Nothing is waiting for a decision" in page


def test_a_view_that_fails_is_shown_as_an_error_not_a_crash(app: Console,
                                                            listener: HttpListener) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("redis down")
    listener.routes.views["/v1/sessions"] = broken
    status, _, page = signed_in(app, ALICE).request("GET", "/console")
    assert status == 200 and "cannot read /v1/sessions: RuntimeError: redis down" in page
    assert 'data-id="apr_1"' in page


def test_sign_out_ends_the_session(app: Console) -> None:
    b = signed_in(app, ALICE)
    status, _, _ = b.request("POST", "/console/logout", {"csrf": b.csrf()})
    assert status == 303 and "fleetgate_console" not in b.cookies
    assert b.request("GET", "/console")[0] == 401


def test_with_no_token_configured_only_a_loopback_client_signs_in_as_local(
        listener: HttpListener, fleet: Fleet, clock: Clock) -> None:
    listener.admin_token = ""
    listener.operators = parse_operators("")
    app = Console(listener, fleet.health, signer=Signer(clock=clock))  # type: ignore[attr-defined]
    assert 'id="operator">local<' in signed_in(app, "").request("GET", "/console")[2]
    remote = Browser(app, peer="10.0.0.5")
    assert remote.request("POST", "/console/login", {"token": ""})[0] == 401
