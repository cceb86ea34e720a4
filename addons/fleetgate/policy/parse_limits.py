"""``policies: {localRateLimit: [...]}``: token-bucket rate limits, and what they share
with budgets (:mod:`fleetgate.policy.parse_budgets`): ids unique among both (one decision
log) and the optional CEL ``key`` / ``when``."""

from __future__ import annotations

from typing import Any

from fleetgate.celexpr import CelError, Expr, compile_expr
from fleetgate.durations import seconds
from fleetgate.limits.bucket import BucketSpec, LimitKind
from fleetgate.policy.model import RateLimit
from fleetgate.policy.parse_rules import mode_of
from fleetgate.policy.report import Ids, Reporter, as_list, check_keys
from fleetgate.policy.schema import keys

__all__ = ["LIMIT_ROOTS", "key_and_when", "limit_id", "parse_policies", "parse_rate_limit"]

# what a limit's key / when may read: the request, and what it asks of an LLM or MCP server
LIMIT_ROOTS = ("jwt", "request", "llm", "mcp")
_LIMIT_KEYS = keys("RateLimit")


def limit_id(node: dict[str, Any], where: str, report: Reporter, *, default_id: str,
             ids: Ids) -> str | None:
    """A rate limit's or budget's id: unique among both (they share the decision log)."""
    lid = node.get("id", default_id)
    if not isinstance(lid, str) or not lid:
        report.error(f"{where}.id", "id must be a non-empty string")
        return None
    first = ids.claim(lid, report.source(where))
    if first is not None:
        report.error(f"{where}.id", f"duplicate limit id {lid!r} (first at {first})")
        return None
    return lid


def key_and_when(node: dict[str, Any], where: str, report: Reporter) -> dict[str, Expr] | None:
    """The optional CEL ``key`` and ``when`` of a rate limit or budget, compiled."""
    exprs: dict[str, Expr] = {}
    for key in ("key", "when"):
        if key in node:
            try:
                exprs[key] = compile_expr(node[key], LIMIT_ROOTS)
            except CelError as exc:
                report.error(f"{where}.{key}", f"CEL: {exc}")
                return None
    return exprs


def parse_policies(node: Any, where: str, report: Reporter, *, owner: str,
                   ids: Ids) -> list[RateLimit]:
    """The seed's ``policies: {localRateLimit: [...]}``; default ids
    ``<owner>.localRateLimit[<i>]``."""
    if not isinstance(node, dict):
        report.error(where, "policies must be a mapping with a 'localRateLimit' list")
        return []
    check_keys(node, where, keys("Policies"), report)
    out = []
    for i, entry in enumerate(as_list(node.get("localRateLimit"), f"{where}.localRateLimit",
                                      report)):
        limit = parse_rate_limit(entry, f"{where}.localRateLimit[{i}]", report,
                                 default_id=f"{owner}.localRateLimit[{i}]", ids=ids)
        if limit is not None:
            out.append(limit)
    return out


def parse_rate_limit(node: Any, where: str, report: Reporter, *, default_id: str,
                     ids: Ids) -> RateLimit | None:
    """One ``localRateLimit`` entry: ``{maxTokens, tokensPerFill, fillInterval, type}``."""
    if not isinstance(node, dict):
        report.error(where, "a limit is a mapping {maxTokens, tokensPerFill, fillInterval, type}")
        return None
    check_keys(node, where, _LIMIT_KEYS, report)
    nums: dict[str, int] = {}
    for key in ("maxTokens", "tokensPerFill"):
        v = node.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            report.error(f"{where}.{key}", f"{key} must be a positive integer")
            return None
        nums[key] = v
    interval = node.get("fillInterval")
    try:
        fill = seconds(interval)
        if fill <= 0:
            raise ValueError("must be > 0")
    except ValueError:
        report.error(f"{where}.fillInterval", f"fillInterval must be a duration such as 1s, "
                     f"1m, 1h (got {interval!r})")
        return None
    try:
        kind = LimitKind(node.get("type", "requests"))
    except ValueError:
        report.error(f"{where}.type", "type must be 'requests' or 'tokens'")
        return None
    exprs = key_and_when(node, where, report)
    lid = limit_id(node, where, report, default_id=default_id, ids=ids)
    if exprs is None or lid is None:
        return None
    spec = BucketSpec(nums["maxTokens"], nums["tokensPerFill"], fill, kind)
    return RateLimit(lid, spec, exprs.get("key"), exprs.get("when"), report.source(where),
                     mode=mode_of(node, where, report))
