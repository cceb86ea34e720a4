"""The canary policy: a second policy judged beside the enforcing one, never enforced.

``fleetgate_canary_rules`` names a rules file or directory that is loaded and hot-reloaded
like ``fleetgate_rules`` (:class:`~fleetgate.addons.canary.CanaryRules` is the only writer).
Every request the HTTP rules judge is also judged by the canary with the same pure
:func:`~fleetgate.policy.decide.decide`; where the verdicts differ, the decision record says
so. A canary that fails to load changes nothing for traffic: the last good canary (or none)
stays, the failure is logged and shown in ``/healthz/ready`` (``state.canary``, which makes
the gateway ``degraded`` but never unready).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from fleetgate.policy.model import Policy

__all__ = ["CanaryService"]

log = logging.getLogger("fleetgate.addons.canary")


class CanaryService:
    """Holds the running canary policy (or ``None``) and the state of its last load."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.path = ""
        self.policy: Policy | None = None
        self.loaded_at: float | None = None
        self.last_error: list[str] | None = None
        self.last_error_at: float | None = None

    def install(self, policy: Policy) -> None:
        self.policy = policy
        self.loaded_at = self.clock()
        self.last_error = None
        log.info("fleetgate: canary policy revision %s loaded from %d file(s); judged in "
                 "report mode beside the enforcing policy", policy.revision, len(policy.files))

    def reject(self, problems: Iterable[str]) -> None:
        """A canary load failed: traffic is unaffected, the operator is told. WARNING, not
        ERROR: nothing is refused because of it (and mitmdump exits on an ERROR logged at
        startup, which a canary must never cause)."""
        self.last_error = list(problems)
        self.last_error_at = self.clock()
        running = self.policy.revision if self.policy else "none"
        log.warning("fleetgate: canary rules rejected (traffic unaffected; canary revision %s "
                  "still compared):\n  %s", running, "\n  ".join(self.last_error))

    def clear(self) -> None:
        self.path, self.policy, self.last_error = "", None, None

    def status(self) -> dict[str, Any]:
        """``state.canary`` of ``/healthz/ready``: ``ok`` is false while the last load failed
        (degraded, never unready: the canary is not enforced)."""
        return {"ok": self.last_error is None, "path": self.path,
                "revision": self.policy.revision if self.policy else None,
                "loaded_at": self.loaded_at, "last_error": self.last_error,
                "last_error_at": self.last_error_at}
