"""CanaryRules: load and hot-reload ``fleetgate_canary_rules`` into the CanaryService.

The canary is a whole policy judged in report mode beside the enforcing one (see
:mod:`fleetgate.runtime.canary`); HttpAuthorization compares the two verdicts. Unlike the
enforcing rules, a canary that is invalid at startup does not stop the gateway: it only
ever reports, so it must never cost traffic.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from mitmproxy import ctx

from fleetgate.policy.loader import PolicyError, fingerprint, iter_problems, load_policy
from fleetgate.runtime.canary import CanaryService
from fleetgate.runtime.policy import PolicyService

log = logging.getLogger(__name__)

__all__ = ["CanaryRules"]


class CanaryRules:
    def __init__(self, canary: CanaryService, policies: PolicyService) -> None:
        self.canary = canary
        self.policies = policies
        self._fingerprint: tuple[Any, ...] = ()
        self._task: asyncio.Task[None] | None = None

    def load(self, loader: Any) -> None:
        loader.add_option(
            "fleetgate_canary_rules", str, "",
            "A second rules file or directory judged in report mode beside fleetgate_rules "
            "(HTTP rules only): where its verdict differs, the decision record gets 'canary' "
            "and fleetgate_canary_disagreements_total counts it. Hot-reloaded like the rules; "
            "an invalid canary never affects traffic ('' disables).")

    def configure(self, updated: set[str]) -> None:
        if "fleetgate_canary_rules" not in updated:
            return
        path = ctx.options.fleetgate_canary_rules
        if not path:
            self.canary.clear()
            return
        self.canary.path = path
        self.policies.add_status("canary", self.canary.status)
        self._load(path)

    def _load(self, path: str) -> bool:
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            self.canary.reject(iter_problems(exc))
            return False
        except OSError as exc:  # load_policy reports files it cannot read; be sure anyway
            self.canary.reject([f"{path}: {exc}"])
            return False
        self._fingerprint = fingerprint(Path(path))
        if self.canary.policy is None or policy.revision != self.canary.policy.revision:
            self.canary.install(policy)
        else:
            self.canary.last_error = None
        return True

    def running(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _watch(self) -> None:
        while True:
            interval = ctx.options.fleetgate_reload_ms / 1000
            await asyncio.sleep(interval if interval > 0 else 1.0)
            path = ctx.options.fleetgate_canary_rules
            if interval <= 0 or not path:
                continue
            try:
                fp = await asyncio.to_thread(fingerprint, Path(path))
                if fp != self._fingerprint:
                    self._fingerprint = fp
                    await asyncio.to_thread(self._load, path)
            except Exception:  # the watcher must survive anything; traffic never notices
                log.exception("fleetgate: canary rules watcher failed; keeping the canary")
