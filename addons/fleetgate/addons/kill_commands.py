"""KillCommands: the kill switch's operator surfaces, mitmproxy commands and the admin API.

Commands (``fleetgate.stop`` ... in mitmweb's command bar) run on the event loop. Admin API
routes (``/v1/status``, ``/v1/sessions``, ``/v1/log`` to read; ``/v1/actions``, ``/v1/lift``
to act) are registered on the admin listener's :class:`~fleetgate.runtime.listeners.Routes`
and run on its threads: they hand their work to the event loop (``KillService.call``). The
``fleetgate`` CLI speaks to the admin API. Everything ends in the kill service. An action is
in force at once; the admin API's thread then waits (boundedly) for its write and the answer's
``error`` says when it was not saved; a command, on the event loop, cannot wait and says so
only when the store is already known failing (a later failure is an ERROR log line).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from mitmproxy import command
from mitmproxy import flow as mflow

from fleetgate.addons.state import identity_of
from fleetgate.kill.model import Action, Scope, ScopeKind, Throttle, Verb, parse_scope
from fleetgate.runtime.kill import KillService
from fleetgate.runtime.listeners import Routes

__all__ = ["LIFT_VERBS", "KillCommands", "action_from_request", "scope_from_request"]

LIFT_VERBS = {"resume": (Verb.PAUSE, Verb.THROTTLE), "unrevoke": (Verb.STOP,)}


class KillCommands:
    def __init__(self, kill: KillService, admin: Routes | None = None) -> None:
        self.kill = kill
        if admin is not None:
            admin.get("/v1/status", self._api_status)
            admin.get("/v1/sessions", self._api_sessions)
            admin.get("/v1/log", self._api_log)
            admin.post("/v1/actions", self._api_act)
            admin.post("/v1/lift", self._api_lift)

    def _act(self, verb: Verb, scope: Scope, reason: str,
             throttle: Throttle | None = None) -> dict[str, Any]:
        return self.kill.apply(Action(verb, scope, reason, by="mitmweb", at=self.kill.clock(),
                                      throttle=throttle))

    # -- mitmproxy commands (mitmweb's command bar) ----------------------------------------

    @command.command("fleetgate.stop")
    def cmd_stop(self, scope: str, reason: str) -> str:
        """Stop a scope (agent:X, session:S+ for a family, role:R, user:U, token:JTI, all)."""
        out = self._act(Verb.STOP, parse_scope(scope), reason)
        return f"stop {out['action']['id']}: cut {len(out['cut'])} flow(s)" + _unsaved(out)

    @command.command("fleetgate.pause")
    def cmd_pause(self, scope: str, reason: str) -> str:
        """Pause a scope: its requests wait until 'fleetgate.resume'."""
        out = self._act(Verb.PAUSE, parse_scope(scope), reason)
        return f"pause {out['action']['id']}" + _unsaved(out)

    @command.command("fleetgate.throttle")
    def cmd_throttle(self, scope: str, requests: int, per_seconds: int) -> str:
        """Throttle a scope to ``requests`` per ``per_seconds`` (shared by the whole scope)."""
        out = self._act(Verb.THROTTLE, parse_scope(scope), "throttled from mitmweb",
                        Throttle(requests, float(per_seconds)))
        return f"throttle {out['action']['id']}" + _unsaved(out)

    @command.command("fleetgate.resume")
    def cmd_resume(self, scope: str) -> str:
        """Lift pauses and throttles on exactly this scope."""
        gone = self.kill.lift(LIFT_VERBS["resume"], parse_scope(scope), "mitmweb", "")
        return f"lifted {len(gone)}"

    @command.command("fleetgate.unrevoke")
    def cmd_unrevoke(self, scope: str) -> str:
        """Lift stops on exactly this scope."""
        gone = self.kill.lift(LIFT_VERBS["unrevoke"], parse_scope(scope), "mitmweb", "")
        return f"lifted {len(gone)}"

    @command.command("fleetgate.stop.flows")
    def cmd_stop_flows(self, flows: Sequence[mflow.Flow], reason: str) -> str:
        """Stop the session (and its sub-agents) of each selected flow: a filter such as
        ``~comment '^rogue-1 /'`` or ``@<flow id>`` (``@focus`` only in mitmproxy's console
        UI: mitmweb does not send the browser's selection)."""
        done = set()
        for f in flows:
            ident = identity_of(f)
            if ident is not None:
                s = ident.session
                scope = Scope(ScopeKind.SESSION, s, True) if s else \
                    Scope(ScopeKind.AGENT, ident.agent)
                if scope.label not in done:
                    done.add(scope.label)
                    self._act(Verb.STOP, scope, reason)
        return f"stopped {len(done)} scope(s): {', '.join(sorted(done))}"

    @command.command("fleetgate.kill.status")
    def cmd_status(self) -> str:
        """The kill-switch actions in force, as JSON."""
        return json.dumps(self.kill.status(), default=str)

    # -- admin API (called on the admin listener's threads) --------------------------------

    def _api_status(self) -> dict[str, Any]:
        return self.kill.call(self.kill.status)

    def _api_sessions(self, root: str | None = None) -> dict[str, Any]:
        return {"sessions": self.kill.call(lambda: self.kill.sessions(root))}

    def _api_log(self, limit: str = "100", action: str | None = None,
                 since: str | None = None) -> dict[str, Any]:
        # one turn of the event loop first: the cut rows of a stop answered a moment ago are
        # recorded after its answer (KillService.act), and must be in what this returns
        self.kill.call(lambda: None)
        return {"log": self.kill.log(int(limit), action, float(since) if since else None)}

    def _api_act(self, args: dict[str, Any]) -> dict[str, Any]:
        issued = time.perf_counter()
        action = action_from_request(args, self.kill.clock())
        return self.kill.act(action, issued)  # its write awaited here, off the event loop

    def _api_lift(self, args: dict[str, Any]) -> dict[str, Any]:
        what = str(args.get("action") or "")
        if what not in LIFT_VERBS:
            raise ValueError("'action' must be 'resume' (pauses, throttles) or 'unrevoke' (stops)")
        scope = scope_from_request(args)
        by, reason = str(args.get("by") or "admin-api"), str(args.get("reason") or "")
        gone = self.kill.call(lambda: self.kill.lift(LIFT_VERBS[what], scope, by, reason))
        return {"lifted": [a.to_json() for a in gone]}


def _unsaved(out: dict[str, Any]) -> str:
    """A command runs on the event loop and cannot wait for the write: it says what is known
    now (queue full, store failing); a later failure is logged at ERROR."""
    return f"; NOT SAVED: {out['error']}" if out.get("error") else ""


def scope_from_request(args: dict[str, Any]) -> Scope:
    scope = args.get("scope")
    if isinstance(scope, dict):
        return Scope.from_json(scope)
    if isinstance(scope, str):
        return parse_scope(scope, bool(args.get("cascade")))
    raise ValueError("give 'scope': 'agent:X', 'session:S' (with 'cascade': true for its "
                     "sub-agents), 'role:R', 'user:U', 'token:JTI' or 'all'")


def action_from_request(args: dict[str, Any], now: float) -> Action:
    """An admin API body -> an :class:`Action` issued at ``now`` (ValueError -> 400)."""
    try:
        verb = Verb(str(args.get("verb", "")))
    except ValueError:
        raise ValueError("'verb' must be stop, pause or throttle") from None
    scope = scope_from_request(args)
    throttle = None
    if verb is Verb.THROTTLE:
        throttle = Throttle(int(args.get("requests") or 0), float(args.get("per") or 0))
    until = None
    if args.get("for") is not None:
        if verb is Verb.STOP:
            raise ValueError("a stop does not lift itself; lift it with unrevoke")
        until = now + float(args["for"])
    reason = str(args.get("reason") or "").strip()
    if not reason:
        raise ValueError("give a 'reason': it goes to the kill log and to the agent")
    return Action(verb, scope, reason, by=str(args.get("by") or "admin-api"), at=now,
                  until=until, throttle=throttle)
