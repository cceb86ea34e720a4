"""``killswitch.triggers``: automatic kill-switch triggers declared in the rules YAML.

What a trigger measures and when it fires is :mod:`fleetgate.kill.triggers`; this module
reads the YAML form into :class:`~fleetgate.kill.triggers.TriggerSpec` s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from fleetgate.durations import seconds
from fleetgate.kill.model import ScopeKind, Throttle, Verb
from fleetgate.kill.triggers import Metric, TriggerSpec
from fleetgate.policy.report import Reporter, check_keys
from fleetgate.policy.schema import keys
from fleetgate.rule import parse_mode

__all__ = ["parse_trigger", "parse_triggers"]

_YAML_KEYS = keys("Trigger")


def _seconds(value: Any, allow_zero: bool = False) -> float:
    s = seconds(value)
    if s < 0 or (s == 0 and not allow_zero):
        raise ValueError(f"duration must be {'>= 0' if allow_zero else '> 0'} (got {value!r})")
    return s


def _names(value: Any) -> list[str] | None:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        return None
    return list(value)


def parse_triggers(node: Any, where: str, report: Reporter) -> list[TriggerSpec]:
    """The rules' ``killswitch.triggers`` list::

        - id: runaway-loop              # required, unique
          metric: identical_requests    # see Metric
          above: 5                      # the limit (see fleetgate.kill.triggers)
          window: 60s                   # default 60s; not for per-event metrics
          per: session                  # agent (default) | session
          roles: [general]              # optional; default every role
          agents: [cloud-7]             # optional; agent ids
          ladder: [throttle, pause, stop]
          throttle: {requests: 1, per: 10s}
          hold: 10m                     # how long an automatic throttle/pause lasts
          cooldown: 30s                 # minimum time on a step before escalating
          minRequests: 10               # rates only

    Only valid triggers are returned; ids are unique within the list (the loader checks
    them across files and KILLSWITCH.md documents).
    """
    if node is None:
        return []
    if not isinstance(node, list):
        report.error(where, "triggers must be a list of {id, metric, above, ...}")
        return []
    out: list[TriggerSpec] = []
    seen: dict[str, str] = {}
    for i, entry in enumerate(node):
        at = f"{where}[{i}]"
        spec = parse_trigger(entry, at, report)
        if spec is None:
            continue
        if spec.id in seen:
            report.error(f"{at}.id", f"duplicate trigger id {spec.id!r} (first at {seen[spec.id]})")
            continue
        seen[spec.id] = at
        out.append(spec)
    return out


def parse_trigger(node: Any, where: str, report: Reporter) -> TriggerSpec | None:
    """One trigger; ``None`` when it has any problem."""
    if not isinstance(node, dict):
        report.error(where, "a trigger is a mapping {id, metric, above, window, per, ladder, ...}")
        return None
    before = len(report.problems)

    def bad(key: str, message: str) -> None:
        report.error(f"{where}.{key}" if key else where, message)

    check_keys(node, where, _YAML_KEYS, report)
    kw: dict[str, Any] = {}
    tid = node.get("id")
    if not isinstance(tid, str) or not tid.strip():
        bad("id", "every trigger needs an 'id' (a non-empty string)")
    else:
        kw["id"] = tid.strip()
    metric: Metric | None = None
    try:
        metric = Metric(str(node.get("metric")))
        kw["metric"] = metric
    except ValueError:
        bad("metric", f"metric must be one of {', '.join(m.value for m in Metric)} "
            f"(got {node.get('metric')!r})")
    above = node.get("above")
    if (isinstance(above, int | float) and not isinstance(above, bool) and math.isfinite(above)
            and above >= 0):
        kw["above"] = float(above)
    else:
        bad("above", f"above must be a number >= 0 (got {above!r})")
    for key, zero in (("window", False), ("hold", False), ("cooldown", True)):
        if key in node:
            try:
                kw[key] = _seconds(node[key], allow_zero=zero)
            except ValueError as exc:
                bad(key, str(exc))
    if metric is not None and metric.per_event and "window" in node:
        bad("window", f"{metric.value} is judged per event: it takes no window")
    if "per" in node:
        per = node["per"]
        if per not in ("agent", "session"):
            bad("per", f"per must be agent or session (got {per!r})")
        else:
            kw["per"] = ScopeKind(per)
    for key in ("roles", "agents"):
        if key in node:
            names = _names(node[key])
            if names is None:
                bad(key, f"{key} must be a list of non-empty strings")
            else:
                kw[key] = frozenset(names)
    if "ladder" in node:
        steps = _names(node["ladder"])
        try:
            if not steps:
                raise ValueError
            kw["ladder"] = tuple(Verb(s.strip().lower()) for s in steps)
        except ValueError:
            bad("ladder", "ladder must be a non-empty list of throttle, pause, stop")
    if "throttle" in node:
        _throttle(node["throttle"], kw, bad)
    if "minRequests" in node:
        n = node["minRequests"]
        if metric is not None and not metric.is_rate:
            bad("minRequests", "minRequests applies to error_rate and denial_rate only")
        elif isinstance(n, bool) or not isinstance(n, int) or n < 1:
            bad("minRequests", f"minRequests must be an integer >= 1 (got {n!r})")
        else:
            kw["min_requests"] = n
    if "mode" in node:
        try:
            kw["mode"] = parse_mode(node["mode"])
        except ValueError as exc:
            bad("mode", str(exc))
    if len(report.problems) > before:
        return None
    try:
        return TriggerSpec(**kw)
    except ValueError as exc:
        key = "ladder" if "ladder" in str(exc) else "above" if "above" in str(exc) else ""
        bad(key, str(exc))
        return None


def _throttle(thr: Any, kw: dict[str, Any], bad: Callable[[str, str], None]) -> None:
    if not isinstance(thr, dict) or set(thr) - keys("TriggerThrottle") or "requests" not in thr:
        bad("throttle", "throttle must be a mapping {requests: N, per: duration}")
        return
    n = thr["requests"]
    try:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"requests must be an integer >= 1 (got {n!r})")
        kw["throttle"] = Throttle(n, _seconds(thr.get("per", "1s")))
    except ValueError as exc:
        bad("throttle", str(exc))
