"""KillSwitch: the kill switch's gate. Stop, pause or throttle any agent, session, family,
role or the whole fleet, in-flight work included, by hand or automatically.

It runs right after AgentIdentity, before any rule: a stopped identity is refused even when
the rules are wrong. For every request it records the requester's session in the session
graph (linking a ``parent_session`` claim on first sight) and asks the kill service for a
verdict: ``stop`` answers 503, ``pause`` holds the request until it is resumed or
``fleetgate_pause_max_wait`` passes (then 503 with ``Retry-After``), ``throttle`` takes from
the action's bucket (429 with ``Retry-After`` when empty). A session seen for the first time
is written to the kill-switch store before its first request goes on (the write runs off the
event loop, awaited at most ``fleetgate_state_wait_ms``): a session the store cannot record
is refused 503 ``killswitch.state`` (fail closed), while sessions already recorded never wait.
With ``fleetgate_state`` a Redis URL the kill state is the replicas' shared one (Redis store,
and :class:`~fleetgate.runtime.kill_bus.KillBus` so a stop on one replica cuts on all).

The state (decisions, live flows, sweeping) is the :class:`~fleetgate.runtime.kill.KillService`'s;
its housekeeping runs as a periodic task started in :meth:`KillSwitch.running`. The other
pieces: :mod:`.killwatch` (live-flow registry, triggers) at the end of the chain,
:mod:`.kill_commands` (mitmweb commands, admin API) for operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any

from mitmproxy import ctx, exceptions, http

from fleetgate.addons.flowtools import deny, fail_closed, settled
from fleetgate.addons.kill_flows import DEPTH, message_depth, refuse_stop, subject_of
from fleetgate.addons.state import annotate_decision, claims_of, identity_of, set_comment
from fleetgate.errors import StateError
from fleetgate.kill.board import Verdict
from fleetgate.kill.graph import GraphError
from fleetgate.kill.model import Subject, Verb
from fleetgate.metrics import GatewayMetrics
from fleetgate.runtime.kill import KillService
from fleetgate.runtime.kill_tasks import KillHousekeeping

log = logging.getLogger(__name__)

# the options that choose where the kill state lives (fleetgate_state*: the StateBackend's)
STATE_OPTIONS = {"fleetgate_state", "fleetgate_state_password_file", "fleetgate_state_prefix",
                 "fleetgate_state_dir"}


class KillSwitch:
    def __init__(self, kill: KillService, metrics: GatewayMetrics) -> None:
        self.kill = kill
        self.metrics = metrics
        self.housekeeping = KillHousekeeping(kill)

    # -- lifecycle ----------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        loader.add_option("fleetgate_pause_max_wait", int, 30,
                          "Seconds a request of a paused agent waits for 'resume' before it "
                          "gets 503 with Retry-After.")
        loader.add_option("fleetgate_max_message_depth", int, 5,
                          "Inter-agent messages deeper than this are dropped (seed 004's depth "
                          "counter); 0 disables the check.")
        loader.add_option("fleetgate_message_depth_header", str, "X-Message-Depth",
                          "Request header carrying an inter-agent message's hop count (a JSON "
                          "body's top-level 'depth' is read too).")

    def configure(self, updated: set[str]) -> None:
        o = ctx.options
        if "fleetgate_pause_max_wait" in updated:
            if o.fleetgate_pause_max_wait < 0:
                raise exceptions.OptionsError("fleetgate_pause_max_wait must be >= 0")
            self.kill.pause_max_wait = float(o.fleetgate_pause_max_wait)
        if "fleetgate_max_message_depth" in updated:
            if o.fleetgate_max_message_depth < 0:
                raise exceptions.OptionsError("fleetgate_max_message_depth must be >= 0")
            self.kill.max_depth = o.fleetgate_max_message_depth
        if "fleetgate_state_wait_ms" in updated:  # declared by the budget guard (shared)
            self.kill.state_wait = max(1, int(o.fleetgate_state_wait_ms)) / 1000
        if "fleetgate_message_depth_header" in updated:
            self.kill.depth_header = o.fleetgate_message_depth_header
        shared = self.kill.shared
        if shared is not None and shared.enabled and (STATE_OPTIONS & updated):
            # Redis (fleetgate_state): every replica's store; fleetgate_state_dir is not used
            assert shared.settings is not None
            try:
                self.kill.open_shared(shared)
            except Exception as exc:
                raise exceptions.OptionsError(
                    f"fleetgate_state: cannot read the kill-switch state in Redis at "
                    f"{shared.settings.redacted()}: {exc}") from None
        elif {"fleetgate_state_dir", "fleetgate_state"} & updated:
            d = o.fleetgate_state_dir
            try:
                self.kill.open_state(d)
            except Exception as exc:
                raise exceptions.OptionsError(f"fleetgate_state_dir: cannot open kill-switch "
                                              f"state in {d!r}: {exc}") from None

    def running(self) -> None:
        self.kill.attach(asyncio.get_running_loop())
        self.housekeeping.start()

    def done(self) -> None:
        self.housekeeping.stop()
        self.kill.close()

    # -- the gate ---------------------------------------------------------------------

    @fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        """Record the session early. A stopped identity's CONNECT is let through on purpose:
        each request inside the tunnel is then refused with a JSON body its SDK shows
        (a refused CONNECT surfaces as a bare proxy error), and nothing is ever dialled."""
        subject = subject_of(flow)
        if settled(flow) or subject is None:
            return
        self._lineage(flow, subject)

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        subject = subject_of(flow)
        if settled(flow) or subject is None:
            return
        if self._lineage(flow, subject):
            return
        if subject.session and await self._unrecorded(flow, subject.session):
            return
        v = self.kill.verdict(subject)
        if v is None:
            self._check_depth(flow)
            return
        if v.action.verb is Verb.PAUSE:
            v = await self._wait_paused(flow, subject, v)
            if v is None or settled(flow):
                return
        if v.action.verb is Verb.STOP:
            refuse_stop(flow, v, self.metrics)
        elif v.action.verb is Verb.THROTTLE:
            try:
                take = await self.kill.take_shared(v)
            except StateError as exc:
                self.metrics.kill_refused.labels(verb="throttle").inc()
                deny(flow, 503, "killswitch.state", str(exc),
                     hint="the gateway's shared state is unavailable; retry shortly",
                     headers={"Retry-After": "1"})
                annotate_decision(flow, action=v.action.id)
                return
            if not take.ok:
                self.metrics.kill_refused.labels(verb="throttle").inc()
                wait = max(1, math.ceil(take.retry_after))
                assert v.action.throttle is not None
                deny(flow, 429, "killswitch.throttle",
                     f"{v.reason} (ceiling {v.action.throttle.label}); next request allowed in "
                     f"{wait}s", hint="slow down; an operator lifts it with 'fleetgate resume'",
                     headers={"Retry-After": str(wait), "x-should-retry": "true"})
                annotate_decision(flow, action=v.action.id)
                return
        self._check_depth(flow)

    def _check_depth(self, flow: http.HTTPFlow) -> None:
        """Seed 004: every message carries a hop count; too deep is dropped and logged."""
        depth = message_depth(flow, self.kill.depth_header)
        flow.metadata[DEPTH] = depth
        limit = self.kill.max_depth
        if depth is not None and limit and depth > limit:
            deny(flow, 403, "killswitch.message-depth",
                 f"message depth {depth} is above the maximum {limit}; dropped (an "
                 "agent loop?)", hint="break the delegation loop; the depth counts hops")
            ident = identity_of(flow)
            log.warning("fleetgate: dropped a message of depth %d from %s", depth,
                        ident.agent if ident else None)

    def _lineage(self, flow: http.HTTPFlow, subject: Subject) -> bool:
        """Record the session (and its parent claim); refuse a token that lies about it."""
        claims = claims_of(flow)
        parent = claims.get("parent_session")
        exp = claims.get("exp")
        try:
            self.kill.observe(subject, str(parent) if parent else None,
                              float(exp) if isinstance(exp, int | float) else None)
        except GraphError as exc:
            deny(flow, 403, f"killswitch.lineage.{exc.code}", str(exc),
                 hint="a session's parent is fixed when it is first seen; mint a new session")
            return True
        return False

    async def _unrecorded(self, flow: http.HTTPFlow, session: str) -> bool:
        """Fail closed: a new session the store cannot record is refused."""
        why = await self.kill.record(session)
        if why is None:
            return False
        if settled(flow):  # the client went away while it waited
            return True
        self.metrics.kill_refused.labels(verb="state").inc()
        deny(flow, 503, "killswitch.state",
             f"session {session} could not be recorded in the kill-switch store: {why}; a "
             "session the kill switch cannot record is refused",
             hint="retry shortly; sessions already recorded are not affected, and the store "
                  "recovers on its own", headers={"Retry-After": "1"})
        log.warning("fleetgate: refused new session %s: not recorded (%s)", session, why)
        return True

    async def _wait_paused(self, flow: http.HTTPFlow, subject: Subject,
                           v: Verdict | None) -> Verdict | None:
        max_wait = self.kill.pause_max_wait
        deadline = time.monotonic() + max_wait
        set_comment(flow, f"paused: {v.reason if v else ''}")
        while v is not None and v.action.verb is Verb.PAUSE:
            remaining = deadline - time.monotonic()
            changed = self.kill.change_signal()
            if remaining <= 0 or changed is None or not flow.live:
                self.metrics.kill_refused.labels(verb="pause").inc()
                until = v.action.until
                retry = max(1, math.ceil((until - self.kill.clock()) if until else max_wait))
                deny(flow, 503, "killswitch.pause",
                     f"{v.reason}; waited {max_wait:g}s for it to be resumed",
                     hint="retry later; an operator lifts it with 'fleetgate resume ...'",
                     headers={"Retry-After": str(retry)})
                annotate_decision(flow, action=v.action.id)
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=min(remaining, 1.0))
            v = self.kill.verdict(subject)
        set_comment(flow, "")  # released: the identity prefix stays
        return v
