"""The operator console end to end: a real gateway, a real agent whose request is held for
approval, and a human in headless Chromium (the OS's ``chromium`` and ``chromium-driver``)
who signs in with a personal admin token and clicks Approve, Deny, Stop and Resume.

What is asserted is what the agent and the upstream see: the held request completes 200 and
reached upstream exactly once after Approve; Deny answers 403 naming the person and their
reason; a two-person tier refuses the same person twice and passes with a second; Stop makes
the agent's next request 503 (killswitch.stop) and Resume lets it through again.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import GatewayFactory
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from harness import ADMIN_TOKEN, Gateway, Upstream, token, wait_until, write_rules

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.e2e

ALICE = "alice-personal-token-0123456789"
BOB = "bob-personal-token-9876543210"
APPROVALS = """approvals:
- id: external-comms
  when: 'request.path.startsWith("/send")'
  approvers: 1
  hold: 60s
  reason: messages leave the company
- id: two-person
  when: 'request.path.startsWith("/wire")'
  approvers: 2
  hold: 60s
"""


def _sha(tok: str) -> str:
    return hashlib.sha256(tok.encode()).hexdigest()


@pytest.fixture
def console_gateway(make_gateway: GatewayFactory, upstream: Upstream, tmp_path: Path) -> Gateway:
    rules = write_rules(tmp_path / "rules.yaml", [upstream.port], top=APPROVALS)
    users = tmp_path / "operators.yaml"
    users.write_text("operators:\n"
                     f"- {{name: alice, groups: [oncall], tokenSha256: {_sha(ALICE)}}}\n"
                     f"- {{name: bob, groups: [oncall], tokenSha256: {_sha(BOB)}}}\n")
    return make_gateway(rules, fleetgate_admin_users_file=str(users))


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    """Headless Chromium; missing is a failure, not a skip (the console is tested in a real
    browser or not at all): ``apt-get install chromium chromium-driver``."""
    if CHROMIUM is None or not Path(CHROMEDRIVER).exists():
        pytest.fail("the console's e2e tests need the chromium and chromium-driver OS packages")
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1800"):
        opts.add_argument(arg)
    opts.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()


class Agent:
    """One agent request, sent through the gateway in a thread (it is held for approval)."""

    def __init__(self, gw: Gateway, tok: str, url: str, body: dict[str, Any]) -> None:
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                with gw.client(tok, timeout=90) as c:
                    self.response = c.post(url, json=body)
            except BaseException as exc:  # reported by the assertion that reads it
                self.error = exc
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout: float = 30) -> httpx.Response:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the agent's request is still held"
        assert self.error is None, self.error
        assert self.response is not None
        return self.response


def pending(gw: Gateway, path: str) -> dict[str, Any]:
    """The pending approval for ``path``, once the gateway has queued it."""
    found: list[dict[str, Any]] = []

    def look() -> bool:
        items = gw.admin("/v1/approvals?status=pending").json()["approvals"]
        found[:] = [a for a in items if a["action"]["url"].endswith(path)]
        return bool(found)
    assert wait_until(look, 15), gw.admin("/v1/approvals?status=all").text
    return found[0]


def wait(driver: WebDriver, cond: Callable[[WebDriver], Any], timeout: float = 15) -> Any:
    return WebDriverWait(driver, timeout, ignored_exceptions=[StaleElementReferenceException]) \
        .until(cond)


def sign_in(driver: WebDriver, gw: Gateway, tok: str, name: str) -> None:
    driver.get(gw.admin_url + "/console")
    field = wait(driver, lambda d: d.find_element(By.ID, "token"))
    field.send_keys(tok)
    driver.find_element(By.ID, "login").click()
    wait(driver, lambda d: d.find_element(By.ID, "operator").text == name)


def sign_out(driver: WebDriver) -> None:
    driver.find_element(By.CSS_SELECTOR, "header form button").click()
    wait(driver, lambda d: d.find_elements(By.ID, "token"))


def row_for(driver: WebDriver, agent: str, path: str) -> WebElement:
    """The pending approval a human would pick: the row naming the agent and the path."""
    def find(d: WebDriver) -> WebElement | bool:
        for row in d.find_elements(By.CSS_SELECTOR, "tr.approval"):
            if agent in row.text and path in row.text:
                return row
        d.refresh()
        return False
    return wait(driver, find)  # type: ignore[no-any-return]


def flash(driver: WebDriver, needle: str) -> str:
    text: str = wait(driver, lambda d: (e := d.find_elements(By.ID, "flash"))
                     and needle in e[0].text and e[0].text)
    return text


def test_a_human_approves_in_chromium_and_the_held_request_goes_through_once(
        console_gateway: Gateway, upstream: Upstream, browser: WebDriver) -> None:
    gw, driver = console_gateway, browser
    tok = token("mailer-1", session_id="s-mail")
    hostile = "<script>document.title='pwned'</script>"
    agent = Agent(gw, tok, upstream.url + "/send/mail", {"to": "ceo@example.com",
                                                         "text": hostile})
    apr = pending(gw, "/send/mail")

    # no session: the sign-in page, 401, and nothing of the queue
    r = httpx.get(gw.admin_url + "/console", timeout=5)
    assert r.status_code == 401 and apr["id"] not in r.text and "token" in r.text

    sign_in(driver, gw, ALICE, "alice")
    row = row_for(driver, "mailer-1", "/send/mail")
    assert apr["id"] in row.text and "external-comms" in row.text
    assert "0 / 1" in row.find_element(By.CSS_SELECTOR, ".votes").text
    # the agent's text is shown as text, never run
    assert hostile in row.text and driver.title != "pwned"
    assert not driver.find_elements(By.TAG_NAME, "script")
    assert upstream.paths().count("/send/mail") == 0  # held: nothing forwarded yet

    row.find_element(By.NAME, "note").send_keys("checked with the CEO")
    row.find_element(By.CSS_SELECTOR, "button.approve").click()
    assert "alice approved " + apr["id"] in flash(driver, "approved")

    r = agent.result()
    assert r.status_code == 200, r.text
    assert upstream.paths().count("/send/mail") == 1
    decided = gw.admin(f"/v1/approvals/{apr['id']}").json()
    assert decided["status"] == "consumed"
    assert [(v["by"], v["note"]) for v in decided["votes"]] == [("alice", "checked with the CEO")]

    # a second action of the same tier: denied with a reason, the agent told who and why
    other = Agent(gw, tok, upstream.url + "/send/press", {"to": "press@example.com"})
    second = pending(gw, "/send/press")
    driver.get(gw.admin_url + "/console")
    row = row_for(driver, "mailer-1", "/send/press")
    row.find_element(By.NAME, "reason").send_keys("no press contact without comms")
    row.find_element(By.CSS_SELECTOR, "button.deny").click()
    assert "alice denied " + second["id"] in flash(driver, "denied")
    r = other.result()
    assert r.status_code == 403, r.text
    fg = r.json()["fleetgate"]
    assert fg["rule"] == "approvals.denied" and fg["denied_by"] == "alice"
    assert "no press contact without comms" in fg["denial_reason"]
    assert "alice denied this action" in fg["reason"]
    assert "/send/press" not in upstream.paths()

    # the decided page shows both, with who decided
    driver.get(gw.admin_url + "/console/approvals")
    page = wait(driver, lambda d: d.find_element(By.ID, "decided")).text
    assert "approved by alice" in page and "denied by alice: no press contact" in page


def test_a_two_person_tier_refuses_the_same_person_twice_and_passes_with_a_second(
        console_gateway: Gateway, upstream: Upstream, browser: WebDriver) -> None:
    gw, driver = console_gateway, browser
    agent = Agent(gw, token("payer-1", session_id="s-pay"), upstream.url + "/wire/transfer",
                  {"amount": 10_000})
    apr = pending(gw, "/wire/transfer")
    sign_in(driver, gw, ALICE, "alice")
    row_for(driver, "payer-1", "/wire/transfer").find_element(
        By.CSS_SELECTOR, "button.approve").click()
    assert "1 of 2" in flash(driver, "alice approved")
    row = row_for(driver, "payer-1", "/wire/transfer")
    assert "1 / 2" in row.find_element(By.CSS_SELECTOR, ".votes").text
    row.find_element(By.CSS_SELECTOR, "button.approve").click()
    text = flash(driver, "already approved")
    assert f"alice already approved {apr['id']}" in text and "needs 2 distinct people" in text
    assert driver.find_element(By.ID, "flash").get_attribute("class") == "flash err"
    assert agent.thread.is_alive() and "/wire/transfer" not in upstream.paths()

    sign_out(driver)
    sign_in(driver, gw, BOB, "bob")
    row_for(driver, "payer-1", "/wire/transfer").find_element(
        By.CSS_SELECTOR, "button.approve").click()
    assert "bob approved " + apr["id"] in flash(driver, "goes through once")
    r = agent.result()
    assert r.status_code == 200, r.text
    assert upstream.paths().count("/wire/transfer") == 1
    votes = [v["by"] for v in gw.admin(f"/v1/approvals/{apr['id']}").json()["votes"]]
    assert votes == ["alice", "bob"]


def test_stop_then_resume_an_agent_from_the_console(
        console_gateway: Gateway, upstream: Upstream, browser: WebDriver) -> None:
    gw, driver = console_gateway, browser
    tok = token("runner-1", session_id="s-run")
    with gw.client(tok) as c:
        assert c.get(upstream.url + "/ok").status_code == 200  # the session is recorded
    sign_in(driver, gw, ALICE, "alice")

    def agent_row(d: WebDriver) -> WebElement | bool:
        rows = d.find_elements(By.CSS_SELECTOR, 'tr.agent-row[data-agent="runner-1"]')
        if not rows:
            d.refresh()
        return rows[0] if rows else False
    wait(driver, agent_row).find_element(By.CSS_SELECTOR, "button.stop").click()
    assert "alice: stop agent runner-1" in flash(driver, "stop")
    assert wait(driver, agent_row).find_element(By.CSS_SELECTOR, ".state").text == "stopped"
    actions = gw.admin("/v1/status").json()["actions"]
    assert [(a["verb"], a["by"], a["scope"]["value"]) for a in actions] == \
        [("stop", "alice", "runner-1")]

    with gw.client(tok) as c:
        r = c.get(upstream.url + "/after-stop")
    assert r.status_code == 503 and r.json()["fleetgate"]["rule"] == "killswitch.stop"
    assert "/after-stop" not in upstream.paths()

    # the session tree shows the family stopped; Resume in the actions table lifts it
    assert "stopped" in driver.find_element(By.CSS_SELECTOR,
                                            'li.session[data-session="s-run"]').text
    driver.find_element(By.CSS_SELECTOR, "#actions button.resume").click()
    assert "alice resumed agent runner-1" in flash(driver, "resumed")
    assert gw.admin("/v1/status").json()["actions"] == []
    with gw.client(tok) as c:
        assert c.get(upstream.url + "/after-resume").status_code == 200
    assert "/after-resume" in upstream.paths()

    # a family pause from the session tree: the session and its sub-agents wait
    driver.find_element(By.CSS_SELECTOR,
                        'li.session[data-session="s-run"] button.pause').click()
    assert "pause session s-run and its sub-agents" in flash(driver, "pause")
    scopes = [a["scope"] for a in gw.admin("/v1/status").json()["actions"]]
    assert scopes == [{"kind": "session", "value": "s-run", "cascade": True}]


def test_without_a_session_or_csrf_token_nothing_is_done(
        console_gateway: Gateway, upstream: Upstream) -> None:
    gw = console_gateway
    agent = Agent(gw, token("mailer-2", session_id="s-m2"), upstream.url + "/send/x", {"a": 1})
    apr = pending(gw, "/send/x")
    base = gw.admin_url + "/console"
    form = {"id": apr["id"], "note": "", "back": "/console"}
    # no cookie, a forged cookie, the admin token as a cookie: the sign-in page, never data
    for cookie in ("", "fleetgate_console=e30.AAAA", f"fleetgate_console={ADMIN_TOKEN}"):
        r = httpx.post(base + "/approve", data=form, headers={"Cookie": cookie}, timeout=5)
        assert r.status_code == 401 and apr["id"] not in r.text
        r = httpx.get(base + "/approvals", headers={"Cookie": cookie}, timeout=5)
        assert r.status_code == 401 and apr["id"] not in r.text
    # a wrong token does not sign in
    r = httpx.post(base + "/login", data={"token": "not-a-token"}, timeout=5)
    assert r.status_code == 401 and "set-cookie" not in r.headers
    # signed in, but a form without the session's CSRF token (or from another origin)
    with httpx.Client(base_url=gw.admin_url, timeout=5) as c:
        r = c.post("/console/login", data={"token": ALICE})
        assert r.status_code == 303
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
        assert ALICE not in cookie
        assert apr["id"] in c.get("/console").text
        assert c.post("/console/approve", data=form).status_code == 403
        csrf = c.get("/console").text.split('name="csrf" value="')[1].split('"')[0]
        r = c.post("/console/approve", data={**form, "csrf": csrf},
                   headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
        assert gw.admin(f"/v1/approvals/{apr['id']}").json()["status"] == "pending"
        # the real thing works, and its redirect stays on the console
        r = c.post("/console/approve", data={**form, "csrf": csrf, "back": "//evil.example/"})
        assert r.status_code == 303 and r.headers["location"] == "/console"
    assert agent.result().status_code == 200
