"""KillSwitch and KillWatch: stop, pause or throttle any agent, session, family, role or
the whole fleet, in-flight work included, by hand or automatically.

KillSwitch runs right after AgentIdentity, before any rule: a stopped identity is refused
even when the rules are wrong. For every request it records the requester's session in the
session graph (linking a ``parent_session`` claim on first sight) and asks the kill board
for a verdict: ``stop`` answers 503, ``pause`` holds the request until it is resumed or
``fleetgate_pause_max_wait`` passes (then 503 with ``Retry-After``), ``throttle`` takes from
the action's bucket (429 with ``Retry-After`` when empty). A new action that stops anyone
sweeps the live-flow registry and the proxy's bound tunnels at once and cuts every flow it
reaches, streams and websockets included, writing each cut to the kill log.

KillWatch runs at the end of the chain: it registers the flows that will be forwarded,
counts the bytes they receive (for the kill log's "how far it got"), and feeds the trigger
engine (request rate, identical requests, denials, errors, tokens, spend, message depth),
whose firings are applied exactly like an operator's action.

Operator surfaces: the admin API (``/v1/...`` on ``fleetgate_admin_listen``), mitmproxy
commands (``fleetgate.stop`` ... in mitmweb's command bar) and the rules' ``killswitch:``
section; the ``fleetgate`` CLI speaks to the admin API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mitmproxy import command, ctx, exceptions, http
from mitmproxy import flow as mflow

from fleetgate.addons.flowtools import (
    CLAIMS,
    DECISION,
    IDENTITY,
    LLM_USAGE,
    MCP,
    allowed,
    close_client,
    cut_flow,
    deny,
    fail_closed,
    settled,
)
from fleetgate.addons.identity import AgentIdentity
from fleetgate.kill.board import Verdict
from fleetgate.kill.core import Applied, GraphError, KillCore
from fleetgate.kill.model import Action, Scope, ScopeKind, Subject, Throttle, Verb
from fleetgate.kill.store import KillStore
from fleetgate.kill.triggers import Event, Metric, TriggerEngine, request_fingerprint
from fleetgate.metrics import GatewayMetrics, HealthServer
from fleetgate.policy.model import Policy

log = logging.getLogger(__name__)

T = TypeVar("T")
RX = "fleetgate.kill.rx"  # bytes received from upstream so far (streamed responses)
DEPTH = "fleetgate.kill.depth"  # the inter-agent message depth a request carried
DELEGATION = "fleetgate.kill.delegation"  # (child depth, parent's children) of a delegation
LIFT_VERBS = {"resume": (Verb.PAUSE, Verb.THROTTLE), "unrevoke": (Verb.STOP,)}


def subject_of(ident: dict[str, Any], claims: dict[str, Any] | None = None) -> Subject:
    user = (claims or {}).get("user", ident.get("user"))
    return Subject.from_identity({**ident, "user": user})


def parse_scope(spec: str, cascade: bool = False) -> Scope:
    """``agent:X``, ``session:S+`` (``+``: with descendants), ``role:R``, ``all``."""
    spec = spec.strip()
    if spec.endswith("+"):
        spec, cascade = spec[:-1], True
    if spec in ("all", "global", "*"):
        return Scope(ScopeKind.GLOBAL)
    kind, sep, value = spec.partition(":")
    if not sep:
        raise ValueError(f"scope {spec!r}: write kind:value (agent:X, token:JTI, session:S, "
                         "session:S+ with descendants, role:R, user:U) or 'all'")
    return Scope.parse(kind, value, cascade)


class KillSwitch:
    def __init__(self, identity: AgentIdentity, metrics: GatewayMetrics,
                 admin: HealthServer | None = None) -> None:
        self.identity = identity
        self.metrics = metrics
        self.core = KillCore(KillStore(None))
        self.engine = TriggerEngine([])
        self.live: dict[str, http.HTTPFlow] = {}
        self.pause_max_wait = 30.0
        self.max_depth = 5
        self.depth_header = "X-Message-Depth"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._last_expire = 0.0
        self._last_prune = time.time()
        self._last_gauges = 0.0
        self._rules_actions: tuple[Action, ...] = ()
        self.triggers = False  # any trigger in the rules (KillWatch observes nothing otherwise)
        self.fingerprint_requests = False  # an identical_requests trigger needs body hashes
        self._watch_core()
        if admin is not None:
            admin.json_routes.update({"/v1/status": self._api_status,
                                      "/v1/sessions": self._api_sessions,
                                      "/v1/log": self._api_log})
            admin.admin_routes.update({"/v1/actions": self._api_act,
                                       "/v1/lift": self._api_lift})

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
        if "fleetgate_pause_max_wait" in updated:
            if ctx.options.fleetgate_pause_max_wait < 0:
                raise exceptions.OptionsError("fleetgate_pause_max_wait must be >= 0")
            self.pause_max_wait = float(ctx.options.fleetgate_pause_max_wait)
        if "fleetgate_max_message_depth" in updated:
            if ctx.options.fleetgate_max_message_depth < 0:
                raise exceptions.OptionsError("fleetgate_max_message_depth must be >= 0")
            self.max_depth = ctx.options.fleetgate_max_message_depth
        if "fleetgate_message_depth_header" in updated:
            self.depth_header = ctx.options.fleetgate_message_depth_header
        if "fleetgate_state_dir" in updated:
            d = ctx.options.fleetgate_state_dir
            try:
                core = KillCore(KillStore(Path(d) / "killswitch.sqlite" if d else None))
                n = core.load()
            except Exception as exc:
                raise exceptions.OptionsError(f"fleetgate_state_dir: cannot open kill-switch "
                                              f"state in {d!r}: {exc}") from None
            old, self.core = self.core, core
            self._watch_core()
            self.core.set_rules_actions(self._rules_actions)  # a policy may have loaded first
            old.store.close()
            if n:
                log.warning("fleetgate: %d kill-switch action(s) in force from %s", n, d)
            self._gauges()

    def _watch_core(self) -> None:
        self.core.listeners.append(self._on_change)

    def running(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()

    def done(self) -> None:
        self.core.store.close()

    def _on_change(self) -> None:
        """Wake every paused request so it re-reads its verdict (on the event loop)."""
        self._gauges()
        loop = self._loop
        if loop is None:
            return
        if _in_loop(loop):
            self._wake()
        else:
            loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        if ev is not None:
            ev.set()

    def _gauges(self) -> None:
        for verb in Verb:
            self.metrics.kill_in_force.labels(verb=verb.value).set(
                sum(1 for a in self.core.board.actions.values() if a.verb is verb))

    def _session_gauges(self, limit: int = 5_000) -> None:
        """Sessions by state. Judging every session costs O(sessions x ancestors) (actions are
        indexed by scope): past ``limit`` sessions only the unexpired total is exported (as
        ``known``), so the event loop is never held long for a gauge."""
        now = self._last_gauges = time.time()
        nodes = [n for n in self.core.graph.nodes.values()
                 if n.via != "placeholder" and (n.exp is None or n.exp > now)]
        counts = {"live": 0, "stopped": 0, "paused": 0, "throttled": 0}
        if len(nodes) > limit:
            self.metrics.kill_sessions.labels(state="known").set(len(nodes))
            return
        for n in nodes:
            v = self.core.board.verdict(n.subject(), now) if self.core.board.actions else None
            state = "live" if v is None else {Verb.STOP: "stopped", Verb.PAUSE: "paused",
                                              Verb.THROTTLE: "throttled"}[v.action.verb]
            counts[state] += 1
        for state, count in counts.items():
            self.metrics.kill_sessions.labels(state=state).set(count)

    # -- the gate ---------------------------------------------------------------------

    @fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        """Record the session early. A stopped identity's CONNECT is let through on purpose:
        each request inside the tunnel is then refused with a JSON body its SDK shows
        (a refused CONNECT surfaces as a bare proxy error), and nothing is ever dialled."""
        ident = flow.metadata.get(IDENTITY)
        if settled(flow) or not isinstance(ident, dict):
            return
        self._lineage(flow, subject_of(ident, flow.metadata.get(CLAIMS)))

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        ident = flow.metadata.get(IDENTITY)
        if settled(flow) or not isinstance(ident, dict):
            return
        now = time.time()
        if now - self._last_expire > 1.0:  # housekeeping, at most once a second
            self._last_expire = now
            if self.core.expire():
                log.info("fleetgate: automatic kill-switch action(s) lifted (time ran out)")
                self._session_gauges()
            elif now - self._last_gauges > 5.0:
                self._session_gauges()
            if now - self._last_prune > 600:  # forget sessions whose tokens expired a day ago
                self._last_prune = now
                self.core.prune()
        subject = subject_of(ident, flow.metadata.get(CLAIMS))
        if self._lineage(flow, subject):
            return
        v = self.core.verdict(subject)
        if v is None:
            self._check_depth(flow)
            return
        if v.action.verb is Verb.PAUSE:
            v = await self._wait_paused(flow, subject, v)
            if v is None or settled(flow):
                return
        if v.action.verb is Verb.STOP:
            self.refuse_stop(flow, v)
        elif v.action.verb is Verb.THROTTLE:
            take = self.core.board.take(v, time.time())
            if not take.ok:
                self.metrics.kill_refused.labels(verb="throttle").inc()
                wait = max(1, math.ceil(take.retry_after))
                assert v.action.throttle is not None
                deny(flow, 429, "killswitch.throttle",
                     f"{v.reason} (ceiling {v.action.throttle.label}); next request allowed in "
                     f"{wait}s", hint="slow down; an operator lifts it with 'fleetgate resume'",
                     headers={"Retry-After": str(wait), "x-should-retry": "true"})
                flow.metadata[DECISION]["action"] = v.action.id
                return
        self._check_depth(flow)

    def _check_depth(self, flow: http.HTTPFlow) -> None:
        """Seed 004: every message carries a hop count; too deep is dropped and logged."""
        depth = self._depth(flow)
        flow.metadata[DEPTH] = depth
        if depth is not None and self.max_depth and depth > self.max_depth:
            deny(flow, 403, "killswitch.message-depth",
                 f"message depth {depth} is above the maximum {self.max_depth}; dropped (an "
                 "agent loop?)", hint="break the delegation loop; the depth counts hops")
            log.warning("fleetgate: dropped a message of depth %d from %s", depth,
                        (flow.metadata.get(IDENTITY) or {}).get("agent"))

    def _lineage(self, flow: http.HTTPFlow, subject: Subject) -> bool:
        """Record the session (and its parent claim); refuse a token that lies about it."""
        claims = flow.metadata.get(CLAIMS) or {}
        parent = claims.get("parent_session")
        exp = claims.get("exp")
        try:
            self.core.observe(subject, str(parent) if parent else None,
                              float(exp) if isinstance(exp, int | float) else None)
        except GraphError as exc:
            deny(flow, 403, f"killswitch.lineage.{exc.code}", str(exc),
                 hint="a session's parent is fixed when it is first seen; mint a new session")
            return True
        return False

    def refuse_stop(self, flow: http.HTTPFlow, v: Verdict) -> None:
        self.metrics.kill_refused.labels(verb="stop").inc()
        deny(flow, 503, "killswitch.stop", v.reason,
             hint=f"this identity is stopped (action {v.action.id}); only an operator can lift "
                  "it ('fleetgate unrevoke ...')",
             headers={"x-should-retry": "false"})  # SDKs retry 503s; this one will not pass
        flow.metadata[DECISION]["action"] = v.action.id

    async def _wait_paused(self, flow: http.HTTPFlow, subject: Subject,
                           v: Verdict | None) -> Verdict | None:
        deadline = time.monotonic() + self.pause_max_wait
        flow.comment = f"paused: {v.reason if v else ''}"
        while v is not None and v.action.verb is Verb.PAUSE:
            remaining = deadline - time.monotonic()
            changed = self._changed
            if remaining <= 0 or changed is None or not flow.live:
                self.metrics.kill_refused.labels(verb="pause").inc()
                until = v.action.until
                retry = max(1, math.ceil((until - time.time()) if until else self.pause_max_wait))
                deny(flow, 503, "killswitch.pause",
                     f"{v.reason}; waited {self.pause_max_wait:g}s for it to be resumed",
                     hint="retry later; an operator lifts it with 'fleetgate resume ...'",
                     headers={"Retry-After": str(retry)})
                flow.metadata[DECISION]["action"] = v.action.id
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=min(remaining, 1.0))
            v = self.core.verdict(subject)
        flow.comment = ""
        return v

    def _depth(self, flow: http.HTTPFlow) -> int | None:
        raw = flow.request.headers.get(self.depth_header) if self.depth_header else None
        if raw is not None:
            try:
                return int(raw.strip())
            except ValueError:
                return None
        ctype = flow.request.headers.get("content-type", "")
        body = flow.request.raw_content
        if "json" in ctype and body and len(body) < (1 << 20) and b'"depth"' in body:
            try:
                doc = json.loads(flow.request.get_content(strict=False) or b"")
            except (ValueError, UnicodeDecodeError):
                return None
            d = doc.get("depth") if isinstance(doc, dict) else None
            return d if isinstance(d, int) and not isinstance(d, bool) else None
        return None

    # -- acting ----------------------------------------------------------------------

    def apply(self, action: Action, issued: float | None = None,
              spare: http.HTTPFlow | None = None) -> dict[str, Any]:
        """Put an action in force and cut what it stops. On the event loop only."""
        issued = issued if issued is not None else time.perf_counter()
        persist_error = None
        try:
            applied = self.core.apply(action)
        except Exception as exc:  # in force, but not saved: say so loudly
            log.error("fleetgate: %s", exc)
            persist_error = str(exc)
            applied = Applied(action, True, self.core.board.reach(action))
        if applied.new:
            self.metrics.kill_actions.labels(verb=action.verb.value, scope=action.scope.kind.value,
                                             source=_source(action), event="apply").inc()
            log.warning("fleetgate: %s %s by %s (%s): %s; reaches %d session(s) and %d "
                        "descendant(s)", action.verb.value, action.scope.label, action.by,
                        action.source, action.reason, len(applied.reach.sessions),
                        len(applied.reach.descendants))
        cut = self.sweep(issued, spare) if action.verb is Verb.STOP else []
        _after_this_turn(self._session_gauges)  # after the cut: bookkeeping never delays it
        out = {"action": applied.action.to_json(), "new": applied.new,
               "sessions": list(applied.reach.sessions),
               "descendants": list(applied.reach.descendants),
               "cut": cut, "cut_ms": round((time.perf_counter() - issued) * 1000, 3)}
        if persist_error:
            out["error"] = persist_error
        return out

    def lift(self, verbs: Sequence[Verb], scope: Scope, by: str, reason: str) -> list[Action]:
        gone = self.core.lift(scope, verbs, by, reason)
        for a in gone:
            self.metrics.kill_actions.labels(verb=a.verb.value, scope=a.scope.kind.value,
                                             source=_source(a), event="lift").inc()
            log.warning("fleetgate: %s on %s lifted by %s: %s", a.verb.value, a.scope.label, by,
                        reason or "no reason given")
        if gone:
            self._session_gauges()
        return gone

    def sweep(self, issued: float | None = None,
              spare: http.HTTPFlow | None = None) -> list[dict[str, Any]]:
        """Cut every live flow and bound tunnel whose identity is now stopped (except
        ``spare``, the request being judged, and its tunnel: it gets a 503 instead).

        Sockets first, bookkeeping after: every connection is closed before a single log
        line, metric or kill-log row is written, so the time to the last cut does not grow
        with what we record about each."""
        cut: list[tuple[Action, dict[str, Any]]] = []
        for flow in list(self.live.values()):
            ident = flow.metadata.get(IDENTITY)
            if not isinstance(ident, dict):
                continue
            v = self.core.verdict(subject_of(ident, flow.metadata.get(CLAIMS)))
            if v is None or v.action.verb is not Verb.STOP:
                continue
            info = flow_report(flow)
            self.live.pop(flow.id, None)
            if cut_flow(flow, "killswitch.stop", v.reason, abort=True):
                cut.append((v.action, info))
        for client, bound in list(self.identity.bound.items()):
            if spare is not None and client is spare.client_conn:
                continue
            v = self.core.verdict(Subject(agent=bound.agent, session=bound.session,
                                          role=bound.role, jti=bound.jti,
                                          user=_opt(bound.claims.get("user"))))
            if v is not None and v.action.verb is Verb.STOP:
                self.identity.bound.pop(client, None)
                if close_client(client, abort=True):
                    cut.append((v.action, {"tunnel": getattr(client, "id", ""),
                                           "agent": bound.agent, "session": bound.session,
                                           "phase": "tunnel closed"}))
        if not cut:
            return []
        if issued is not None:
            self.metrics.kill_cut_seconds.observe(time.perf_counter() - issued)
        # the sockets close on the event loop's next turn: record after them, not before
        _after_this_turn(self._record_cuts, cut)
        return [info for _, info in cut]

    def _record_cuts(self, cut: list[tuple[Action, dict[str, Any]]]) -> None:
        for action, info in cut:
            if "flow" in info:
                self.metrics.flows_cut.labels(rule="killswitch.stop").inc()
                log.warning("fleetgate: cut %s %s%s of %s (%s): %s", info["method"],
                            info["host"], info["path"], info["agent"], info["phase"],
                            action.reason)
            self.metrics.kill_flows_cut.labels(scope=action.scope.kind.value,
                                               source=_source(action)).inc()
        self.core.record_cuts([(a, "killswitch.stop", info) for a, info in cut])

    def on_policy(self, old: Policy | None, new: Policy) -> None:
        """Rules listener: the rules' killswitch actions and triggers, and the old
        ``revoked`` list, applied to work already running."""
        self._rules_actions = new.kill_actions
        applied, lifted = self.core.set_rules_actions(new.kill_actions)
        for r in applied:
            self.metrics.kill_actions.labels(verb=r.action.verb.value,
                                             scope=r.action.scope.kind.value, source="rules",
                                             event="apply").inc()
        self.engine.replace(new.kill_triggers)
        self.triggers = bool(new.kill_triggers)
        self.fingerprint_requests = any(t.metric is Metric.IDENTICAL_REQUESTS
                                        for t in new.kill_triggers)
        if lifted:
            log.warning("fleetgate: %d kill-switch action(s) removed from the rules lifted",
                        len(lifted))
        cut = self.sweep(time.perf_counter()) if applied else []
        if old is None or old.revoked != new.revoked:
            cut += self._sweep_revoked(new)
        if cut:
            log.warning("fleetgate: rules edit cut %d in-flight flow(s)", len(cut))

    def _sweep_revoked(self, policy: Policy) -> list[dict[str, Any]]:
        """The ``revoked:`` shorthand (403 at the next request) also cuts what is running."""
        cut = []
        for flow in list(self.live.values()):
            ident = flow.metadata.get(IDENTITY)
            if not isinstance(ident, dict):
                continue
            why = policy.revoked.reason(str(ident.get("agent") or ""), ident.get("jti"),
                                        ident.get("role"), ident.get("session"))
            if why:
                info = flow_report(flow)
                self.live.pop(flow.id, None)
                if cut_flow(flow, "revoked", why):
                    cut.append(info)
                    self.core.record_cut(None, "revoked", info)
                    self.metrics.flows_cut.labels(rule="revoked").inc()
        for client, bound in list(self.identity.bound.items()):
            if policy.revoked.reason(bound.agent, bound.jti, bound.role, bound.session):
                self.identity.bound.pop(client, None)
                close_client(client)
        return cut

    # -- mitmproxy commands (mitmweb's command bar) ----------------------------------------

    @command.command("fleetgate.stop")
    def cmd_stop(self, scope: str, reason: str) -> str:
        """Stop a scope (agent:X, session:S+ for a family, role:R, user:U, token:JTI, all)."""
        out = self.apply(Action(Verb.STOP, parse_scope(scope), reason, by="mitmweb"))
        return f"stop {out['action']['id']}: cut {len(out['cut'])} flow(s)"

    @command.command("fleetgate.pause")
    def cmd_pause(self, scope: str, reason: str) -> str:
        """Pause a scope: its requests wait until 'fleetgate.resume'."""
        out = self.apply(Action(Verb.PAUSE, parse_scope(scope), reason, by="mitmweb"))
        return f"pause {out['action']['id']}"

    @command.command("fleetgate.throttle")
    def cmd_throttle(self, scope: str, requests: int, per_seconds: int) -> str:
        """Throttle a scope to ``requests`` per ``per_seconds`` (shared by the whole scope)."""
        out = self.apply(Action(Verb.THROTTLE, parse_scope(scope), "throttled from mitmweb",
                                by="mitmweb", throttle=Throttle(requests, float(per_seconds))))
        return f"throttle {out['action']['id']}"

    @command.command("fleetgate.resume")
    def cmd_resume(self, scope: str) -> str:
        """Lift pauses and throttles on exactly this scope."""
        return f"lifted {len(self.lift(LIFT_VERBS['resume'], parse_scope(scope), 'mitmweb', ''))}"

    @command.command("fleetgate.unrevoke")
    def cmd_unrevoke(self, scope: str) -> str:
        """Lift stops on exactly this scope."""
        return f"lifted {len(self.lift(LIFT_VERBS['unrevoke'], parse_scope(scope), 'mitmweb', ''))}"

    @command.command("fleetgate.stop.flows")
    def cmd_stop_flows(self, flows: Sequence[mflow.Flow], reason: str) -> str:
        """Stop the session (and its sub-agents) of each selected flow, e.g. @focus."""
        done = set()
        for f in flows:
            ident = f.metadata.get(IDENTITY)
            if isinstance(ident, dict):
                s = ident.get("session")
                scope = Scope(ScopeKind.SESSION, s, True) if s else \
                    Scope(ScopeKind.AGENT, str(ident.get("agent")))
                if scope.label not in done:
                    done.add(scope.label)
                    self.apply(Action(Verb.STOP, scope, reason, by="mitmweb"))
        return f"stopped {len(done)} scope(s): {', '.join(sorted(done))}"

    @command.command("fleetgate.kill.status")
    def cmd_status(self) -> str:
        """The kill-switch actions in force, as JSON."""
        return json.dumps(self.status(), default=str)

    # -- admin API (called on the admin server's threads) ----------------------------------

    def _call(self, fn: Callable[[], T]) -> T:
        loop = self._loop
        if loop is None or _in_loop(loop):
            return fn()

        async def run() -> T:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout=30)

    def status(self) -> dict[str, Any]:
        return {**self.core.status(), "live_flows": len(self.live),
                "bound_tunnels": len(self.identity.bound),
                "triggers": self.engine.snapshot(time.time())}

    def _api_status(self) -> dict[str, Any]:
        return self._call(self.status)

    def _api_sessions(self, root: str | None = None) -> dict[str, Any]:
        def tree() -> dict[str, Any]:
            def mark(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
                for n in nodes:
                    v = self.core.verdict(Subject.from_identity(n))
                    n["state"] = "live" if v is None else {
                        Verb.STOP: "stopped", Verb.PAUSE: "paused",
                        Verb.THROTTLE: "throttled"}[v.action.verb]
                    n["action"] = v.action.id if v else None
                    mark(n["children"])
                return nodes
            return {"sessions": mark(self.core.graph.tree(root))}
        return self._call(tree)

    def _api_log(self, limit: str = "100", action: str | None = None,
                 since: str | None = None) -> dict[str, Any]:
        return {"log": self.core.store.log(int(limit), action,
                                           float(since) if since else None)}

    def _api_act(self, args: dict[str, Any]) -> dict[str, Any]:
        issued = time.perf_counter()
        action = action_from_request(args)
        return self._call(lambda: self.apply(action, issued))

    def _api_lift(self, args: dict[str, Any]) -> dict[str, Any]:
        what = str(args.get("action") or "")
        if what not in LIFT_VERBS:
            raise ValueError("'action' must be 'resume' (pauses, throttles) or 'unrevoke' (stops)")
        scope = scope_from_request(args)
        by, reason = str(args.get("by") or "admin-api"), str(args.get("reason") or "")
        gone = self._call(lambda: self.lift(LIFT_VERBS[what], scope, by, reason))
        return {"lifted": [a.to_json() for a in gone]}


class KillWatch:
    """The end of the chain: live-flow registry, received bytes, trigger observations."""

    def __init__(self, switch: KillSwitch, metrics: GatewayMetrics) -> None:
        self.switch = switch
        self.metrics = metrics

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        ident = flow.metadata.get(IDENTITY)
        if not isinstance(ident, dict):
            return
        if self.switch.triggers:
            self._observe_request(flow, ident)
        if allowed(flow):
            self.switch.live[flow.id] = flow

    def _observe_request(self, flow: http.HTTPFlow, ident: dict[str, Any]) -> None:
        decision = flow.metadata.get(DECISION)
        denied = isinstance(decision, dict) and not decision.get("allow")
        if denied and isinstance(decision, dict) and decision.get("rule") in (
                "killswitch.stop", "killswitch.pause"):
            return  # already stopped or held: waiting is not misbehaving (a throttled loop is)
        deleg = flow.metadata.get(DELEGATION) or (None, None)
        fp = None
        if self.switch.fingerprint_requests:  # hashing bodies only when a trigger compares them
            req = flow.request
            fp = request_fingerprint(req.method, req.pretty_host, req.path,
                                     (req.raw_content or b"")[: 1 << 16])
        self._observe(Event.request(subject_of(ident, flow.metadata.get(CLAIMS)),
                                    fingerprint=fp, denied=denied,
                                    message_depth=flow.metadata.get(DEPTH),
                                    delegation_depth=deleg[0], delegation_fanout=deleg[1]),
                      flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Count what a streamed response has delivered (the kill log's "how far")."""
        if flow.id not in self.switch.live or flow.response is None:
            return
        inner = flow.response.stream
        if not inner:
            return
        flow.metadata[RX] = 0

        def counted(chunk: bytes) -> Any:
            flow.metadata[RX] = flow.metadata.get(RX, 0) + len(chunk)
            return inner(chunk) if callable(inner) else chunk
        flow.response.stream = counted

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:
            self._finished(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def _finished(self, flow: http.HTTPFlow) -> None:
        was_live = self.switch.live.pop(flow.id, None) is not None
        ident = flow.metadata.get(IDENTITY)
        if not was_live or not isinstance(ident, dict) or not self.switch.triggers:
            return
        usage = flow.metadata.get(LLM_USAGE)
        tokens, usd = 0, 0.0
        if isinstance(usage, dict):
            t = usage.get("tokens")
            if isinstance(t, dict):
                tokens = int(t.get("input") or 0) + int(t.get("output") or 0)
            usd = float(usage.get("cost_usd") or 0.0)
        status = flow.response.status_code if flow.response else 0
        error = flow.error is not None or status >= 500
        self._observe(Event.response(subject_of(ident, flow.metadata.get(CLAIMS)),
                                     error=error, tokens=tokens, usd=usd))

    def _observe(self, event: Event, flow: http.HTTPFlow | None = None) -> None:
        for firing in self.switch.engine.observe(event, time.time()):
            log.warning("fleetgate: %s", firing.reason)
            self.switch.apply(firing.to_action(time.time()), spare=flow)
            if flow is not None and firing.verb is Verb.STOP and allowed(flow):
                # the request that tripped the stop is refused, not cut mid-air
                v = self.switch.core.verdict(event.subject)
                if v is not None:
                    self.switch.refuse_stop(flow, v)


# -- helpers --------------------------------------------------------------------------


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _after_this_turn(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn`` once the event loop has done what is already queued (closing sockets);
    at once when there is no running loop (addon tests)."""
    try:
        asyncio.get_running_loop().call_soon(fn, *args)
    except RuntimeError:
        fn(*args)


def _opt(value: Any) -> str | None:
    return str(value) if value is not None and value != "" else None


def _source(action: Action) -> str:
    return action.source.split(":", 1)[0]


def flow_report(flow: http.HTTPFlow) -> dict[str, Any]:
    """What an operator needs to reconcile a cut flow's half-finished external effects."""
    ident = flow.metadata.get(IDENTITY) or {}
    req, resp = flow.request, flow.response
    mcp = flow.metadata.get(MCP)
    tools = [c.get("target") for c in (mcp or {}).get("calls", [])
             if isinstance(c, dict) and c.get("target")] if isinstance(mcp, dict) else []
    if flow.websocket is not None:
        phase = f"websocket open ({len(flow.websocket.messages)} message(s))"
    elif resp is None:
        phase = "request sent, waiting for the response" if flow.server_conn.timestamp_start \
            else "before the upstream connection"
    elif flow.metadata.get(RX) is not None or resp.stream:
        phase = "streaming the response"
    else:
        phase = "response received, not yet delivered"
    received = flow.metadata.get(RX)
    if received is None and resp is not None and not resp.stream:
        received = len(resp.raw_content or b"")
    usage = flow.metadata.get(LLM_USAGE)
    return {
        "flow": flow.id, "agent": ident.get("agent"), "session": ident.get("session"),
        "role": ident.get("role"), "method": req.method, "host": req.pretty_host,
        "path": req.path, "mcp_tools": tools[:20], "status": resp.status_code if resp else None,
        "bytes_sent": len(req.raw_content or b""), "bytes_received": received or 0,
        "phase": phase, "started": req.timestamp_start,
        "elapsed_s": round(time.time() - req.timestamp_start, 3) if req.timestamp_start else None,
        "llm": usage if isinstance(usage, dict) else None,
    }


def scope_from_request(args: dict[str, Any]) -> Scope:
    scope = args.get("scope")
    if isinstance(scope, dict):
        return Scope.from_json(scope)
    if isinstance(scope, str):
        return parse_scope(scope, bool(args.get("cascade")))
    raise ValueError("give 'scope': 'agent:X', 'session:S' (with 'cascade': true for its "
                     "sub-agents), 'role:R', 'user:U', 'token:JTI' or 'all'")


def action_from_request(args: dict[str, Any]) -> Action:
    """An admin API body -> an :class:`Action` (ValueError -> 400)."""
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
        until = time.time() + float(args["for"])
    reason = str(args.get("reason") or "").strip()
    if not reason:
        raise ValueError("give a 'reason': it goes to the kill log and to the agent")
    return Action(verb, scope, reason, by=str(args.get("by") or "admin-api"), until=until,
                  throttle=throttle)
