"""The running policy: one immutable :class:`Policy` every addon reads, swapped whole.

:class:`PolicyService` is built in ``pipeline()`` and handed to every addon that reads the
rules; the :class:`~fleetgate.addons.rules.PolicyStore` addon (options, startup load, the
hot-reload task, the ``fleetgate.reload`` command) is the only writer. Services that derive
state from the rules (the kill switch's rules actions, credentials) :meth:`subscribe` to
swaps instead of being called from a list someone else pokes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from fleetgate.metrics import GatewayMetrics
from fleetgate.policy.model import Policy

__all__ = ["Listener", "PolicyService"]

log = logging.getLogger("fleetgate.addons.rules")

Listener = Callable[[Policy | None, Policy], None]

WARNINGS_LOGGED = 20  # rules warnings a load logs; `fleetgate rules check` prints them all


class PolicyService:
    """Holds the running policy and the state of the last reload, for addons and probes."""

    def __init__(self, metrics: GatewayMetrics, clock: Callable[[], float] = time.time) -> None:
        self.metrics = metrics
        self.clock = clock
        self.policy: Policy | None = None
        self.loaded_at: float | None = None
        self.last_error: list[str] | None = None
        self.last_error_at: float | None = None
        self._listeners: list[Listener] = []
        self._checks: dict[str, Callable[[], dict[str, Any]]] = {}
        self._required: set[str] = set()

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(old, new)`` after every swap (a failing listener is logged, and
        neither stops the swap nor the other listeners)."""
        self._listeners.append(listener)

    def add_status(self, name: str, check: Callable[[], dict[str, Any]],
                   required: bool = False) -> None:
        """Report another part's health in :meth:`status` (``/healthz/ready``) under
        ``state[name]``. A check answering ``"ok": False`` marks the gateway ``degraded`` but
        leaves it ready: what depends on that part is refused by its own addon, and taking
        the only replica out of service would refuse every other agent too. A ``required``
        check (the shared Redis state: other replicas may still have it) also makes the
        gateway unready while it fails, and so does any check answering ``"ready": False``
        (the JWKS URL before its first good fetch)."""
        self._checks[name] = check
        if required:
            self._required.add(name)
        else:
            self._required.discard(name)

    def install(self, policy: Policy) -> None:
        """Make ``policy`` the running one (compiled and validated whole by the loader)."""
        old, self.policy = self.policy, policy
        self.loaded_at = self.clock()
        self.unchanged()
        self.metrics.reloads.labels(result="ok").inc()
        self.metrics.policy_loaded.set(1)
        self.metrics.set_revision(policy.revision)
        log.info("fleetgate: policy revision %s loaded from %d file(s): %d agent profiles, "
                 "%d global rules", policy.revision, len(policy.files), len(policy.agents),
                 len(policy.rules))
        # legal but probably not meant (fleetgate.policy.lint): the first few, so a policy of
        # 1,000 profiles with a warning each does not hold the event loop writing 1,000 lines
        for warning in policy.warnings[:WARNINGS_LOGGED]:
            log.warning("fleetgate: rules warning: %s", warning)
        if len(policy.warnings) > WARNINGS_LOGGED:
            log.warning("fleetgate: %d more rules warnings not logged; 'fleetgate rules check "
                        "<rules path>' lists them all", len(policy.warnings) - WARNINGS_LOGGED)
        for listener in self._listeners:
            try:
                listener(old, policy)
            except Exception:
                log.exception("fleetgate: policy listener failed")

    def unchanged(self) -> None:
        """A reload read the same policy again: it is valid."""
        self.last_error = None
        self.metrics.policy_valid.set(1)

    def reject(self, problems: Iterable[str]) -> None:
        """A reload failed: the running policy stays, and says so loudly."""
        self.last_error = list(problems)
        self.last_error_at = self.clock()
        self.metrics.reloads.labels(result="error").inc()
        self.metrics.policy_valid.set(0)
        running = self.policy.revision if self.policy else "none"
        log.error("fleetgate: rules rejected, still running revision %s:\n  %s",
                  running, "\n  ".join(self.last_error))

    def status(self) -> dict[str, Any]:
        p = self.policy
        state: dict[str, Any] = {}
        for name, check in self._checks.items():
            try:
                state[name] = check()
            except Exception as exc:  # a check that fails says so; it never hides the rest
                state[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        out: dict[str, Any] = {
            "ready": p is not None,
            "revision": p.revision if p else None,
            "files": list(p.files) if p else [],
            "loaded_at": self.loaded_at,
            "last_reload_ok": self.last_error is None,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }
        if state:
            out["state"] = state
            out["degraded"] = not all(s.get("ok", True) for s in state.values())
            if any(not state[n].get("ok", True) for n in self._required if n in state):
                out["ready"] = False
            if any(s.get("ready") is False for s in state.values()):  # a check's own say
                out["ready"] = False
        return out
