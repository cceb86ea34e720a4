"""Limits fail closed: a key or condition that cannot be evaluated denies (and gives back
what other limits took); budget state that cannot be opened stops the gateway."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chain import basic, request_flow, run_request, running_chain, tok
from mitmproxy import exceptions
from mitmproxy.test import taddons

from fleetgate.addons.budgets import BudgetGuard
from fleetgate.addons.limits import RateLimiter
from fleetgate.addons.rules import PolicyStore
from fleetgate.metrics import GatewayMetrics
from fleetgate.runtime.reservations import ReservationBook
from fleetgate.stores.spend import SqliteSpendStore

RULES = """apiVersion: fleetgate/v1
agents:
- name: tester
  match: 'jwt.agent_role == "tester"'
  egress: {hosts: [api.example.com]}
  authorization: {rules: [{allow: 'true'}]}
  policies:
    localRateLimit:
    - {id: plain, maxTokens: 5, tokensPerFill: 5, fillInterval: 1m}
    - {id: by-team, maxTokens: 5, tokensPerFill: 5, fillInterval: 1m, key: 'jwt.team'}
"""


@pytest.fixture
def addons(tmp_path: Path) -> Iterator[list[Any]]:
    with running_chain(tmp_path, RULES) as (_, chain):
        yield chain


def test_a_key_that_cannot_be_evaluated_denies_and_gives_back(addons: list[Any]) -> None:
    f = request_flow(auth=basic(tok()))  # the token has no 'team' claim
    run_request(addons, f)
    assert f.response is not None and f.response.status_code == 500
    body = json.loads(f.response.content)
    assert body["fleetgate"]["rule"] == "by-team"
    assert "denied rather than unlimited" in body["fleetgate"]["reason"]
    limiter = next(a for a in addons if isinstance(a, RateLimiter))
    [bucket] = [b for b in limiter.buckets.snapshot(limiter.clock()) if b["limit"] == "plain"]
    assert bucket["level"] == 5  # what 'plain' took was given back


def test_budget_state_that_cannot_be_opened_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    metrics = GatewayMetrics()
    store = PolicyStore(metrics)  # declares fleetgate_state_dir
    guard = BudgetGuard(store.service, metrics, ReservationBook(SqliteSpendStore(None)))
    with (taddons.context(store, guard) as tctx,
          pytest.raises(exceptions.OptionsError, match="fleetgate_state_dir")):
        tctx.options.update(fleetgate_state_dir=str(blocker))
