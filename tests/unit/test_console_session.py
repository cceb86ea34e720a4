"""The console's cookies: signed, expiring, bound to a credential; CSRF tokens bound to one
session; flash messages readable only in their session."""

from __future__ import annotations

import base64
import json

import pytest

from fleetgate.console.session import LIFETIME, Signer


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def signer(clock: Clock) -> Signer:
    return Signer(b"k" * 32, clock=clock)


def test_a_session_cookie_round_trips_and_names_its_operator(signer: Signer) -> None:
    value, issued = signer.issue("alice", "ab" * 32)
    s = signer.verify(value)
    assert s == issued and s.operator == "alice" and s.expires == 1_000_000.0 + LIFETIME


def test_a_session_expires_after_eight_hours(signer: Signer, clock: Clock) -> None:
    value, _ = signer.issue("alice", "ab" * 32)
    clock.now += LIFETIME - 1
    assert signer.verify(value) is not None
    clock.now += 1
    assert signer.verify(value) is None


def test_the_cookie_carries_neither_the_token_nor_its_hash(signer: Signer) -> None:
    digest = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
    value, s = signer.issue("alice", digest)
    payload = base64.urlsafe_b64decode(value.split(".")[0] + "==").decode()
    assert digest not in payload and digest not in value and s.binding in payload
    assert signer.binding(digest) != signer.binding("0" * 64)


def _forge(value: str, **changes: object) -> str:
    payload, mac = value.split(".")
    doc = json.loads(base64.urlsafe_b64decode(payload + "=="))
    doc.update(changes)
    raw = base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()
    return raw + "." + mac


@pytest.mark.parametrize("changes", [{"o": "admin"}, {"e": 9e18}, {"b": "x"}, {"n": "other"}])
def test_a_changed_payload_is_refused(signer: Signer, changes: dict[str, object]) -> None:
    value, _ = signer.issue("alice", "ab" * 32)
    assert signer.verify(_forge(value, **changes)) is None


def test_a_cookie_signed_by_another_process_is_refused(signer: Signer, clock: Clock) -> None:
    value, _ = Signer(b"j" * 32, clock=clock).issue("alice", "ab" * 32)
    assert signer.verify(value) is None
    assert Signer().verify(signer.issue("alice", "ab" * 32)[0]) is None  # random keys differ


@pytest.mark.parametrize("value", [
    None, "", ".", "a.b.c", "not base64!.@@@", "e30.AAAA", "W10." + "A" * 43,
    "x" * 5000 + ".y", "eyJvIjoiYWxpY2UifQ.", "\u00e9.\u00e9",
])
def test_garbage_is_no_session(signer: Signer, value: str | None) -> None:
    assert signer.verify(value) is None


def test_a_well_signed_payload_of_the_wrong_shape_is_no_session(signer: Signer) -> None:
    for doc in ([1], {"o": "", "e": 2e9, "n": "x", "b": "y"},
                {"o": "a", "e": True, "n": "x", "b": "y"}, {"o": "a", "e": "2e9", "n": "x", "b": "y"},
                {"o": "a", "e": 2e9, "n": "x"}, {"o": "a", "e": 2e9, "n": "", "b": "y"}):
        assert signer.verify(signer._seal("session", doc)) is None  # type: ignore[arg-type]


def test_a_csrf_token_belongs_to_one_session(signer: Signer) -> None:
    _, a = signer.issue("alice", "ab" * 32)
    _, b = signer.issue("alice", "ab" * 32)
    token = signer.csrf(a)
    assert signer.check_csrf(a, token)
    assert not signer.check_csrf(b, token)
    assert not signer.check_csrf(a, None) and not signer.check_csrf(a, "")
    assert not signer.check_csrf(a, token[:-1]) and not signer.check_csrf(a, token + "x")


def test_a_flash_is_read_only_in_its_session_and_briefly(signer: Signer, clock: Clock) -> None:
    _, a = signer.issue("alice", "ab" * 32)
    _, b = signer.issue("bob", "cd" * 32)
    value = signer.flash("alice approved apr_1", True, a)
    got = signer.read_flash(value, a)
    assert got is not None and got.text == "alice approved apr_1" and got.ok
    assert signer.read_flash(value, b) is None
    assert signer.read_flash(value.replace(".", "x.", 1), a) is None
    clock.now += 121
    assert signer.read_flash(value, a) is None


def test_a_session_cookie_is_not_a_flash_and_back(signer: Signer) -> None:
    value, s = signer.issue("alice", "ab" * 32)
    assert signer.read_flash(value, s) is None
    assert signer.verify(signer.flash("x", True, s)) is None
