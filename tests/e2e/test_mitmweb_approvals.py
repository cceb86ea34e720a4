"""Approvals from mitmweb, end to end: a held request is seen and decided in mitmweb itself.

The gateway runs as ``mitmweb -s addons/gateway.py``. Held flows are read back from mitmweb's
JSON API (``/flows``) and decided with its command API (``POST /commands/<command>``, JSON
``{"arguments": [...]}``), the way mitmweb's own page calls it: the web password as a bearer
token, plus the XSRF cookie mitmweb sets echoed in ``X-XSRFToken``. A command's flow argument
is resolved on the server by ``view.flows.resolve``: ``@<flow id>`` or a filter expression
(``@focus`` is the console's selection, which mitmweb's server does not have).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import Gateway, Upstream, ssl_context, token, wait_until, write_rules

pytestmark = pytest.mark.e2e

WEB_PASSWORD = "e2e-web-password-0123456789"
XSRF_COOKIE = "_mitmproxy_xsrf"
OPERATORS = {"alice": ["oncall"], "bob": ["security"]}
TIER = """
approvals:
- id: external-comms
  when: 'request.path.startsWith("/send")'
  approvers: 1
  approvedBy: [group:oncall]
  hold: 30s
  reason: messages to people need a human
"""


def op_token(name: str) -> str:
    return f"{name}-personal-token-0123456789"


@dataclass
class WebGateway(Gateway):
    """``mitmweb -s addons/gateway.py``, with the port and password of its web UI known."""

    web_port: int = 0

    def argv(self) -> list[str]:
        argv = super().argv()
        self.web_port = int(argv[argv.index("--web-port") + 1])
        return argv

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def flows(self) -> list[dict[str, Any]]:
        r = httpx.get(self.web_url + "/flows", timeout=10,
                      headers={"Authorization": f"Bearer {WEB_PASSWORD}"})
        assert r.status_code == 200, r.text
        return [f for f in r.json()
                if f["type"] == "http" and f["request"]["method"] != "CONNECT"]


class WebOperator:
    """Someone at mitmweb's page: logged in, with the XSRF cookie the page gets."""

    def __init__(self, gw: WebGateway) -> None:
        self.http = httpx.Client(base_url=gw.web_url, timeout=10)
        # the login page sets the XSRF cookie, as it does for a browser
        self.http.get("/")
        self.xsrf = self.http.cookies.get(XSRF_COOKIE)
        assert self.xsrf, "mitmweb set no XSRF cookie"

    def command(self, name: str, *arguments: str, xsrf: bool = True) -> httpx.Response:
        headers = {"Authorization": f"Bearer {WEB_PASSWORD}"}
        if xsrf:
            headers["X-XSRFToken"] = str(self.xsrf)
        return self.http.post(f"/commands/{name}", json={"arguments": list(arguments)},
                              headers=headers)

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def web_gateway(tmp_path: Path, confdir: Path, upstream_ca_file: Path,
                upstream: Upstream) -> Iterator[WebGateway]:
    users = tmp_path / "operators.yaml"
    users.write_text(json.dumps({"operators": [
        {"name": n, "groups": g, "tokenSha256": hashlib.sha256(op_token(n).encode()).hexdigest()}
        for n, g in OPERATORS.items()]}))
    workdir = tmp_path / "web"
    workdir.mkdir()
    gw = WebGateway(rules=write_rules(tmp_path / "rules.yaml", [upstream.port], top=TIER),
                    workdir=workdir, confdir=confdir, upstream_ca=upstream_ca_file,
                    tool="mitmweb", options={
                        "web_password": WEB_PASSWORD,
                        "fleetgate_admin_users_file": str(users),
                        # alice is in group oncall, whom the tier asks
                        "fleetgate_web_operator": "alice"})
    gw.start()
    yield gw
    gw.stop()


def send_in_background(gw: Gateway, url: str, text: str) -> tuple[threading.Thread, dict[str, Any]]:
    """An agent's POST through the gateway, in a thread (it is held while people decide)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            with httpx.Client(proxy=gw.proxy_url(token("writer-1")),
                              verify=ssl_context(gw.ca_cert), timeout=60) as c:
                out["response"] = c.post(url, json={"to": "board", "text": text})
        except BaseException as exc:
            out["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def held_flow(gw: WebGateway, path: str) -> dict[str, Any]:
    """The flow of ``path`` as mitmweb shows it, once it is marked held."""
    found: list[dict[str, Any]] = []

    def ready() -> bool:
        found[:] = [f for f in gw.flows() if f["request"]["path"] == path
                    and f["marked"] == "\u231b"]
        return bool(found)
    assert wait_until(ready, 15), gw.flows()
    [flow] = found
    return flow


def sends(upstream: Upstream, path: str) -> int:
    return upstream.paths().count(path)


def test_a_held_request_is_shown_in_mitmweb_and_approved_there(
        web_gateway: WebGateway, upstream: Upstream) -> None:
    gw = web_gateway
    with gw.client(token("writer-1")) as c:  # a flow in no tier: nothing to approve on it
        assert c.get(upstream.url + "/status").status_code == 200
    t, out = send_in_background(gw, upstream.url + "/send/status", "all green")
    flow = held_flow(gw, "/send/status")
    # held: the hourglass, and a comment naming the approval and its tier
    [approval] = gw.admin("/v1/approvals?status=pending").json()["approvals"]
    approval_id = approval["id"]
    assert f"held for approval {approval_id} (external-comms)" in flow["comment"], flow
    assert "response" not in flow  # mitmweb has no answer to show yet
    assert sends(upstream, "/send/status") == 0 and t.is_alive()

    web = WebOperator(gw)
    try:
        # mitmweb refuses a command without the XSRF token: nothing is approved
        forged = web.command("fleetgate.approve", f"@{flow['id']}", xsrf=False)
        assert forged.status_code == 403
        assert gw.admin(f"/v1/approvals/{approval_id}").json()["status"] == "pending"
        # a flow that is not held: an error in the command bar, not a silent no-op
        [plain] = [f for f in gw.flows() if f["request"]["path"] == "/status"]
        wrong = web.command("fleetgate.approve", f"@{plain['id']}")
        assert wrong.status_code == 200
        assert "is held for approval" in wrong.json()["error"], wrong.text
        assert gw.admin(f"/v1/approvals/{approval_id}").json()["status"] == "pending"
        # approve the held flow, named by its id as mitmweb's page knows it
        done = web.command("fleetgate.approve", f"@{flow['id']}")
        assert done.status_code == 200, done.text
        assert done.json() == {"value": f"{approval_id}: approved (alice)"}
    finally:
        web.close()

    t.join(20)
    assert not t.is_alive() and "error" not in out, out
    assert out["response"].status_code == 200, out["response"].text
    assert out["response"].json()["path"] == "/send/status"
    assert sends(upstream, "/send/status") == 1  # forwarded once
    record = gw.admin(f"/v1/approvals/{approval_id}").json()
    assert record["status"] == "consumed"
    assert [v["by"] for v in record["votes"]] == ["alice"]  # fleetgate_web_operator
    assert record["votes"][0]["note"] == "from mitmweb"
    # mitmweb shows it done: no longer held, the comment says who approved
    assert wait_until(lambda: any(
        f["request"]["path"] == "/send/status" and f["marked"] != "\u231b"
        and f"approved by alice ({approval_id})" in f["comment"]
        and (f.get("response") or {}).get("status_code") == 200 for f in gw.flows()), 10), \
        gw.flows()
    rec = gw.wait_for_decision(lambda d: (d.get("approval") or {}).get("id") == approval_id
                               and d.get("status") == 200)
    assert rec["approval"]["status"] == "approved" and rec["approval"]["by"] == ["alice"]


def test_a_held_request_denied_in_mitmweb_is_refused_with_who_and_why(
        web_gateway: WebGateway, upstream: Upstream) -> None:
    gw = web_gateway
    t, out = send_in_background(gw, upstream.url + "/send/offer", "50% off")
    flow = held_flow(gw, "/send/offer")
    [approval] = gw.admin("/v1/approvals?status=pending").json()["approvals"]
    approval_id = approval["id"]
    assert approval_id in flow["comment"]

    web = WebOperator(gw)
    try:
        # a filter expression names the flow too: every flow held on this approval
        done = web.command("fleetgate.deny", f"~comment {approval_id}", "no discounts this week")
        assert done.status_code == 200, done.text
        assert done.json() == {"value": f"{approval_id}: denied (alice)"}
    finally:
        web.close()

    t.join(20)
    assert not t.is_alive() and "error" not in out, out
    r = out["response"]
    assert r.status_code == 403, r.text
    body = r.json()["fleetgate"]
    assert body["rule"] == "approvals.denied" and body["approval_id"] == approval_id
    assert body["denied_by"] == "alice" and body["denial_reason"] == "no discounts this week"
    assert "alice denied this action" in body["reason"]
    assert "no discounts this week" in body["reason"]
    assert r.headers["fleetgate-approval-id"] == approval_id
    assert sends(upstream, "/send/offer") == 0  # never forwarded
    record = gw.admin(f"/v1/approvals/{approval_id}").json()
    assert record["status"] == "denied" and record["denied_by"] == "alice"
