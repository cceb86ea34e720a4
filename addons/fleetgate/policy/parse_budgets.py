"""``budgets: [...]``: spend limits in USD and/or tokens, per calendar period or rolling
window, per agent, role, session, the fleet, or a CEL ``key``."""

from __future__ import annotations

from typing import Any

from fleetgate.durations import parse_duration
from fleetgate.limits.budget import BudgetSpec, Period
from fleetgate.policy.model import Budget
from fleetgate.policy.parse_limits import key_and_when, limit_id
from fleetgate.policy.parse_rules import mode_of
from fleetgate.policy.report import Ids, Reporter, as_list, check_keys
from fleetgate.policy.schema import keys

__all__ = ["parse_budget", "parse_budgets"]

_BUDGET_KEYS = keys("Budget")
_BUDGET_PER = ("agent", "role", "session", "fleet")


def parse_budgets(node: Any, where: str, report: Reporter, *, owner: str,
                  ids: Ids) -> list[Budget]:
    """A ``budgets`` list; default ids ``<owner>.budgets[<i>]``."""
    out = []
    for i, entry in enumerate(as_list(node, where, report)):
        budget = parse_budget(entry, f"{where}[{i}]", report,
                              default_id=f"{owner}.budgets[{i}]", ids=ids)
        if budget is not None:
            out.append(budget)
    return out


def _window(node: dict[str, Any], where: str, report: Reporter) -> tuple[Period, float] | None:
    """``period`` (hour, day, month) or ``rolling`` (a duration): exactly one."""
    if ("period" in node) == ("rolling" in node):
        report.error(where, "a budget needs exactly one of 'period' (hour, day, month) or "
                     "'rolling' (a duration such as 24h)")
        return None
    if "period" in node:
        try:
            period = Period(node["period"])
            if period is Period.ROLLING:
                raise ValueError
        except ValueError:
            report.error(f"{where}.period", "period must be hour, day or month (UTC calendar)")
            return None
        return period, 0.0
    try:
        return Period.ROLLING, float(parse_duration(str(node["rolling"])))
    except ValueError:
        report.error(f"{where}.rolling", f"rolling must be a duration such as 1h or 24h (got "
                     f"{node['rolling']!r})")
        return None


def _amounts(node: dict[str, Any], where: str, report: Reporter) -> dict[str, float] | None:
    """``usd`` / ``tokens``: ``{soft, hard}`` positive numbers, keyed ``hard_usd``..."""
    amounts: dict[str, float] = {}
    for unit in ("usd", "tokens"):
        section = node.get(unit)
        if section is None:
            continue
        if not isinstance(section, dict):
            report.error(f"{where}.{unit}", f"{unit} must be a mapping {{soft, hard}}")
            return None
        check_keys(section, f"{where}.{unit}", keys("BudgetAmounts"), report)
        for level in ("soft", "hard"):
            v = section.get(level)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
                report.error(f"{where}.{unit}.{level}", f"{unit}.{level} must be a positive number")
                return None
            amounts[f"{level}_{unit}"] = v
    if not amounts:
        report.error(where, "a budget needs at least one of usd.soft, usd.hard, tokens.soft, "
                     "tokens.hard")
        return None
    return amounts


def parse_budget(node: Any, where: str, report: Reporter, *, default_id: str,
                 ids: Ids) -> Budget | None:
    """One ``budgets[]`` entry: ``{per or key, period or rolling, usd and/or tokens, when}``."""
    if not isinstance(node, dict):
        report.error(where, "a budget is a mapping {per, period or rolling, usd and/or tokens}")
        return None
    check_keys(node, where, _BUDGET_KEYS, report)
    per = node.get("per", "agent")
    if "key" in node and "per" in node:
        report.error(f"{where}.key", "use either 'per' or 'key', not both")
        return None
    if per not in _BUDGET_PER:
        report.error(f"{where}.per", f"per must be one of {', '.join(_BUDGET_PER)} (or use a "
                     "CEL 'key')")
        return None
    window = _window(node, where, report)
    if window is None:
        return None
    amounts = _amounts(node, where, report)
    if amounts is None:
        return None
    exprs = key_and_when(node, where, report)
    bid = limit_id(node, where, report, default_id=default_id, ids=ids)
    if exprs is None or bid is None:
        return None
    hard_t, soft_t = amounts.get("hard_tokens"), amounts.get("soft_tokens")
    spec = BudgetSpec(window[0], window[1], hard_usd=amounts.get("hard_usd"),
                      soft_usd=amounts.get("soft_usd"),
                      hard_tokens=None if hard_t is None else int(hard_t),
                      soft_tokens=None if soft_t is None else int(soft_t))
    return Budget(bid, spec, "key" if "key" in node else str(per), exprs.get("key"),
                  exprs.get("when"), report.source(where), mode=mode_of(node, where, report))
