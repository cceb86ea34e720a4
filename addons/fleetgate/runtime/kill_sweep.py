"""Sweeps: cutting the work already running of identities a new action stops.

A stop in force refuses the next request at the gate; a sweep reaches what is already past
it: every live flow (streams and websockets included) and every tunnel bound to a stopped
identity is cut at once, and each cut is written to the kill log. The rules' ``revoked:``
shorthand sweeps the same way. How a flow is cut is the proxy's business (:class:`FlowEffects`,
handed to the kill service); what is cut is decided here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleetgate.kill.model import Action, Subject, Verb
from fleetgate.policy.model import Policy
from fleetgate.runtime.kill_tasks import after_this_turn

if TYPE_CHECKING:
    from fleetgate.runtime.kill import KillService

__all__ = ["FlowEffects", "Swept", "cut_stopped", "source_of", "sweep_revoked", "sweep_stopped"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlowEffects:
    """What the proxy does to a flow or connection: ``cut(flow, rule, reason, abort)`` and
    ``close(client, abort)`` (True when something was cut), ``report(flow)`` (what an operator
    needs to reconcile a cut flow), ``client(flow)`` (the flow's client connection).
    ``report`` may be split in two: ``facts(flow)`` (plain reads, for the admin API's answer
    to a stop) and ``settle(flow)`` (the accounting it adds to the kill-log row, such as a
    cut stream's LLM usage: slow enough to be done after the operator has the answer)."""

    cut: Callable[[Any, str, str, bool], bool]
    close: Callable[[Any, bool], bool]
    report: Callable[[Any], dict[str, Any]]
    client: Callable[[Any], object]
    facts: Callable[[Any], dict[str, Any]] | None = None
    settle: Callable[[Any], dict[str, Any]] | None = None


def source_of(action: Action) -> str:
    """The metric label of who issued an action (``trigger:<id>`` -> ``trigger``)."""
    return action.source.split(":", 1)[0]


def _opt(value: Any) -> str | None:
    return str(value) if value is not None and value != "" else None


@dataclass(frozen=True)
class Swept:
    """What a sweep cut (the kill-log reports) and when the last connection was dropped
    (``perf_counter``; ``None`` when nothing was cut)."""

    cut: list[dict[str, Any]]
    last_cut: float | None


def sweep_stopped(kill: KillService, issued: float | None = None,
                  spare: object | None = None) -> list[dict[str, Any]]:
    """Cut every live flow and bound tunnel whose identity is now stopped; the reports."""
    return cut_stopped(kill, issued, spare).cut


def cut_stopped(kill: KillService, issued: float | None = None, spare: object | None = None,
                defer: list[Callable[[], object]] | None = None) -> Swept:
    """Cut every live flow and bound tunnel whose identity is now stopped.

    Sockets first, everything else after: every connection is dropped before a single
    report is taken (a cut stream's report settles its LLM usage, which may estimate tokens
    and load a tokenizer table the first time) and before any log line, metric or kill-log
    row is written, so the time to the last cut does not grow with what we record about
    each. With ``defer`` (and effects that split the report), the answer's rows are the
    plain facts and the settling is appended to ``defer``: the caller runs it in the same
    loop callback once the operator's answer is handed over (before the flows' own error
    hooks, which run in later turns)."""
    flows: list[tuple[Any, Action]] = []
    for live in kill.live.snapshot():
        v = kill.core.verdict(live.subject)
        if v is None or v.action.verb is not Verb.STOP:
            continue
        kill.live.discard(live.id)
        if kill.effects.cut(live.flow, "killswitch.stop", v.reason, True):
            flows.append((live.flow, v.action))
    tunnels: list[tuple[Action, dict[str, Any]]] = []
    for client, bound in kill.identities.tunnels():
        if spare is not None and client is spare:
            continue
        v = kill.core.verdict(Subject(agent=bound.agent, session=bound.session,
                                      role=bound.role, jti=bound.jti,
                                      user=_opt(bound.claims.get("user"))))
        if v is not None and v.action.verb is Verb.STOP:
            kill.identities.unbind(client)
            if kill.effects.close(client, True):
                tunnels.append((v.action, {"tunnel": getattr(client, "id", ""),
                                           "agent": bound.agent, "session": bound.session,
                                           "phase": "tunnel closed"}))
    if not flows and not tunnels:
        return Swept([], None)
    last_cut = time.perf_counter()
    if issued is not None:
        kill.metrics.kill_cut_seconds.observe(last_cut - issued)
    facts, settle = kill.effects.facts, kill.effects.settle
    if defer is None or facts is None or settle is None or not flows:
        cut = [(action, kill.effects.report(flow)) for flow, action in flows] + tunnels
        # the sockets' tasks end on the event loop's next turn: record after them
        after_this_turn(_record_cuts, kill, cut)
        return Swept([info for _, info in cut], last_cut)
    rows = [(flow, action, facts(flow)) for flow, action in flows]

    def settled() -> None:  # the sockets are down and the answer handed over: record now
        _record_cuts(kill, [(action, {**info, **settle(flow)}) for flow, action, info in rows]
                     + tunnels)
    defer.append(settled)
    return Swept([info for _, _, info in rows] + [info for _, info in tunnels], last_cut)

def _record_cuts(kill: KillService, cut: list[tuple[Action, dict[str, Any]]]) -> None:
    for action, info in cut:
        if "flow" in info:
            kill.metrics.flows_cut.labels(rule="killswitch.stop").inc()
            log.warning("fleetgate: cut %s %s%s of %s (%s): %s", info["method"],
                        info["host"], info["path"], info["agent"], info["phase"],
                        action.reason)
        kill.metrics.kill_flows_cut.labels(scope=action.scope.kind.value,
                                           source=source_of(action)).inc()
    kill.core.record_cuts([(a, "killswitch.stop", info) for a, info in cut])


def sweep_revoked(kill: KillService, policy: Policy) -> list[dict[str, Any]]:
    """The ``revoked:`` shorthand (403 at the next request) also cuts what is running."""
    cut = []
    for live in kill.live.snapshot():
        s = live.subject
        why = policy.revoked.reason(s.agent, s.jti, s.role, s.session)
        if why:
            info = kill.effects.report(live.flow)
            kill.live.discard(live.id)
            if kill.effects.cut(live.flow, "revoked", why, False):
                cut.append(info)
                kill.core.record_cut(None, "revoked", info)
                kill.metrics.flows_cut.labels(rule="revoked").inc()
    for client, bound in kill.identities.tunnels():
        if policy.revoked.reason(bound.agent, bound.jti, bound.role, bound.session):
            kill.identities.unbind(client)
            kill.effects.close(client, False)
    return cut
