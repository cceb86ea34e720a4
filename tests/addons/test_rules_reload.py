"""A hot reload does not stall the event loop (issue 21, item 3): while the loader's thread
runs, full garbage collections are held back and the GIL switch interval is short; the new
policy is frozen once installed, the replaced policy is freed a slice at a time, and a
reload logs a few warnings, not one per profile."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.test import taddons

from fleetgate.addons import rules as rules_addon
from fleetgate.addons.rules import PolicyStore
from fleetgate.metrics import GatewayMetrics
from fleetgate.runtime.policy import WARNINGS_LOGGED


def fleet(n: int, variant: int = 0) -> str:
    """``n`` profiles, each selecting one agent id without ``has()`` (a lint warning each)."""
    head = f"apiVersion: fleetgate/v1\nkind: Policy\nmetadata: {{name: t, variant: {variant}}}\n"
    return head + "agents:\n" + "".join(
        f"""- name: a{i}
  match: 'jwt.agent_id == "a{i}"'
  egress: {{hosts: [api.example.com]}}
  authorization:
    rules:
    - allow: 'request.method == "GET"'
""" for i in range(n))


def test_a_reload_holds_back_full_collections_shortens_switches_and_freezes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(fleet(3))
    store = PolicyStore(GatewayMetrics())
    seen: list[tuple[int, int, int]] = []
    switches: list[float] = []
    real_load = rules_addon.load_policy

    def load(path: Any) -> Any:  # runs in the loader's thread: what the collector is set to
        seen.append(gc.get_threshold())
        switches.append(sys.getswitchinterval())
        return real_load(path)

    monkeypatch.setattr(rules_addon, "load_policy", load)
    before, switch_before = gc.get_threshold(), sys.getswitchinterval()
    with taddons.context(store) as tctx:
        tctx.options.update(fleetgate_rules=str(rules))
        frozen = gc.get_freeze_count()
        rules.write_text(fleet(3, variant=1))
        try:
            assert asyncio.run(store.reload()) is True
            assert seen[-1][:2] == before[:2] and seen[-1][2] >= 10**9  # no full collection
            assert gc.get_threshold() == before  # restored
            # the event loop waits for the loader's thread to let go of the GIL 1 ms, not 5
            assert switches[-1] == rules_addon.LOAD_SWITCH_INTERVAL
            assert sys.getswitchinterval() == switch_before
            assert gc.get_freeze_count() > frozen  # the new policy is out of the GC's sight
            # an unchanged reload restores the threshold and freezes nothing
            frozen = gc.get_freeze_count()
            assert asyncio.run(store.reload()) is False
            # (frozen objects can still be freed by reference counting: never more, maybe fewer)
            assert gc.get_threshold() == before and gc.get_freeze_count() <= frozen
        finally:
            gc.unfreeze()


def test_the_replaced_policy_is_freed_a_slice_at_a_time(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(fleet(3 * rules_addon.RELEASE_SLICE))
    store = PolicyStore(GatewayMetrics())
    with taddons.context(store) as tctx:
        tctx.options.update(fleetgate_rules=str(rules))
        assert store.policy is not None
        refs = [weakref.ref(p) for p in store.policy.agents]
        rules.write_text(fleet(3 * rules_addon.RELEASE_SLICE, variant=1))
        alive_after_swap: list[int] = []

        async def main() -> bool:
            reload = asyncio.create_task(store.reload())
            while store.policy is None or store.policy.agents[0] is refs[0]():
                await asyncio.sleep(0.001)  # until the swap
            alive_after_swap.append(sum(r() is not None for r in refs))
            return await reload

        try:
            assert asyncio.run(main()) is True
        finally:
            gc.unfreeze()
        # right after the swap most old profiles were still alive: not freed in one go
        assert alive_after_swap[0] >= 2 * rules_addon.RELEASE_SLICE
        assert all(r() is None for r in refs)  # and all of them are freed by the end


def test_a_reload_logs_a_few_warnings_not_one_per_profile(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(fleet(WARNINGS_LOGGED + 30))
    store = PolicyStore(GatewayMetrics())
    with caplog.at_level(logging.WARNING), taddons.context(store) as tctx:
        tctx.options.update(fleetgate_rules=str(rules))
    assert store.policy is not None and len(store.policy.warnings) == WARNINGS_LOGGED + 30
    lines = [r.getMessage() for r in caplog.records if "rules warning" in r.getMessage()]
    assert len(lines) == WARNINGS_LOGGED + 1
    assert "30 more rules warnings not logged; 'fleetgate rules check" in lines[-1]
