"""The pure decision: (policy, identity claims, request facts) -> :class:`Decision`.

Order, cheapest and most absolute first:

1. revoked identity (``revoked``) -> deny, whatever else the rules say;
2. a literal internal destination (``destinations.allowPrivate`` not covering it) -> deny;
3. the agent profiles whose ``match`` selects the identity; none -> deny. A ``match`` that
   reads a claim the token lacks (CEL "no such key") does not select; any other evaluation
   error denies, naming that profile: never "skip the profile and its deny rules" on a
   mistake in the rules;
4. egress allow-list: the destination must match a host of a selected profile. An internal
   address that ``allowPrivate`` admits must be named by an explicit entry (host, IP, CIDR);
   a wildcard (``*``, ``*.domain``) never reaches it. For a *name*, whether it resolves to
   an internal address is only known when the gateway dials, so the decision says whether an
   explicit entry named the destination (:attr:`Decision.named`) and the dial is judged
   with it (:func:`private_destination_reason`);
5. ``deny`` rules (global first, then per profile; a rule with ``hosts`` only for those
   destinations): any match, or any error, denies;
6. ``require`` rules: any that is false, or errors, denies;
7. ``allow`` rules: one must be true; none true -> denied by default.

Every :class:`Decision` carries the id of the rule that decided it and a sentence for the
agent's developer.

Report mode (``mode: report`` on a rule or a profile): evaluation is exactly the same, but
a report-mode element that would deny adds a :class:`~fleetgate.rule.WouldDeny` to
:attr:`Decision.would_deny` and the evaluation goes on as if it had not denied (the next
element decides). Report-mode elements only ever withhold denials; they never grant what the
enforcing elements alone would refuse:

* a report-mode ``deny``/``require`` rule (or one of a report-mode profile) that is true /
  false, or fails to evaluate, is reported;
* a report-mode ``allow`` rule allows only when the default deny itself is reported (below);
* a report-mode profile selects like any other. Its egress list admits only when no
  enforcing profile selects the identity; when none of the selected profiles admits the
  destination and all of them are report-mode, ``egress`` is reported;
* when every selected profile is report-mode and no rule allows, ``default-deny`` is
  reported and the request is allowed as ``report-mode``. As soon as one enforcing profile
  selects the identity, the default deny is enforced (a report-mode profile beside it
  changes nothing);
* a report-mode profile's ``match`` that fails to evaluate is reported and does not select.

``revoked``, internal destinations (``destinations.private``, ``egress.private``) and
``no-profile`` have no mode: they are always enforced.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fleetgate.a2a.facts import cel_view
from fleetgate.celexpr import Activation, CelError, MissingField
from fleetgate.netaddr import internal_reason
from fleetgate.normalize import RequestFacts
from fleetgate.policy.model import AgentProfile, Policy
from fleetgate.rule import Effect, Mode, Rule, WouldDeny

__all__ = ["Decision", "decide", "private_destination_reason"]


@dataclass(frozen=True)
class Decision:
    """The outcome for one request. ``rule`` names what decided it."""

    allow: bool
    rule: str
    reason: str
    status: int = 200
    profiles: tuple[str, ...] = ()
    # True when an explicit egress entry (a host name, IP or CIDR, not ``*``/``*.domain``)
    # of a selected profile admitted the destination: only then may it be dialled at an
    # internal address that destinations.allowPrivate admits.
    named: bool = False
    # what report-mode elements would have denied on the way to this decision (in order)
    would_deny: tuple[WouldDeny, ...] = ()

    @classmethod
    def deny(cls, rule: str, reason: str, status: int = 403,
             profiles: tuple[str, ...] = (), would_deny: tuple[WouldDeny, ...] = ()) -> Decision:
        return cls(False, rule, reason, status, profiles, would_deny=would_deny)


def private_destination_reason(policy: Policy, address: str, *, named: bool) -> str | None:
    """Why dialling ``address`` (an IP literal) is refused, or ``None`` when it is fine.

    ``named``: the request was admitted by an explicit egress entry, not only by a wildcard.
    ``allowPrivate`` says which internal addresses exist for agents at all; which agents reach
    one is the egress list's job, and ``*`` means "the internet", so a wildcard must never
    turn ``allowPrivate`` into "every agent reaches every internal service". Required, with
    no default: a caller that forgets it must not get the permissive answer.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    why = internal_reason(ip)
    if why is None:
        return None
    if not any(ip in net for net in policy.allow_private if net.version == ip.version):
        return f"{address} is a {why}; add it to destinations.allowPrivate to allow it"
    if not named:
        return (f"{address} is a {why}: destinations.allowPrivate admits it, but only for a "
                "profile whose egress names the destination explicitly (host, IP or CIDR), "
                "never through a wildcard ('*', '*.domain')")
    return None


NOT_LLM: Mapping[str, Any] = {"is_llm": False}


def decide(policy: Policy, claims: Mapping[str, Any], facts: RequestFacts,
           llm: Mapping[str, Any] | None = None,
           a2a: Mapping[str, Any] | None = None) -> Decision:
    """Judge one request. Total: never raises for any claims or facts.

    ``llm`` is what an LLM call asks for (``fleetgate.llm.request.LlmRequest.to_cel``);
    for other requests rules see only ``llm.is_llm == false``. ``a2a`` is what an A2A
    message carries (:mod:`fleetgate.a2a.facts`); other requests see ``a2a.is_a2a == false``
    with every other field present and empty.
    """
    agent = str(claims.get("agent_id") or claims.get("sub") or "")
    jti = claims.get("jti")
    role, session = claims.get("agent_role"), claims.get("session_id", claims.get("sid"))
    revoked = policy.revoked.reason(agent, str(jti) if jti is not None else None,
                                    str(role) if role is not None else None,
                                    str(session) if session is not None else None)
    if revoked:
        return Decision.deny("revoked", f"{revoked}; ask an operator", status=403)

    # allowPrivate first (named=True): an address it does not cover is refused for everyone
    why_private = private_destination_reason(policy, facts.host, named=True)
    if why_private:
        return Decision.deny("destinations.private", why_private)

    inputs = policy.cel_inputs
    data: dict[str, Any] = {"jwt": dict(claims), "request": facts.to_cel(inputs)}
    if "llm" in inputs:
        data["llm"] = dict(llm) if llm is not None else dict(NOT_LLM)
    if "a2a" in inputs:
        data["a2a"] = cel_view(a2a)
    activation = Activation(data)
    profiles: list[AgentProfile] = []
    reported: list[WouldDeny] = []
    # only the profiles whose match can select these claims, in file order (ProfileIndex);
    # lacking: (position, text) of selectors that read a claim this token does not carry
    candidates, lacking_at = policy.profile_index.candidates(claims)
    for pos in candidates:
        profile = policy.agents[pos]
        try:
            if profile.match.evaluate(activation):
                profiles.append(profile)
        except MissingField as exc:  # does not select; said if none does
            lacking_at.append((pos, f"{profile.name} ({exc})"))
        except CelError as exc:
            why = (f"agent selector {profile.name!r} could not be evaluated ({exc}); "
                   "denied rather than guessed")
            if profile.mode is Mode.REPORT:
                reported.append(WouldDeny(f"{profile.name}.match", why))
                continue
            return Decision.deny(f"{profile.name}.match", why, would_deny=tuple(reported))
    names = tuple(p.name for p in profiles)
    wd = tuple(reported)
    if not profiles:
        lacking = [text for _, text in sorted(lacking_at)]
        detail = (f" (the token lacks a claim read by {', '.join(lacking[:3])}"
                  f"{', ...' if len(lacking) > 3 else ''})" if lacking else "")
        return Decision.deny("no-profile",
                             f"no agent profile selects identity {agent!r}{detail}",
                             would_deny=wd)
    # enforcing: some selected profile enforces; then report-mode profiles grant nothing
    enforcing = any(p.mode is Mode.ENFORCE for p in profiles)
    granting = [p for p in profiles if p.mode is Mode.ENFORCE] if enforcing else profiles
    admitting = [h for p in granting for h in p.egress if h.matches(facts.host, facts.port)]
    if not admitting:
        why = f"{facts.host}:{facts.port} is not in the egress allow-list of {', '.join(names)}"
        if enforcing:
            return Decision.deny("egress", why, profiles=names, would_deny=wd)
        reported.append(WouldDeny("egress", why))
    named = any(not h.wildcard for h in admitting)
    why_private = private_destination_reason(policy, facts.host, named=named)
    if why_private:
        return Decision.deny("egress.private", f"{why_private}; {', '.join(names)} reach "
                             f"{facts.host}:{facts.port} only through a wildcard",
                             profiles=names, would_deny=tuple(reported))

    rules: list[Rule] = [r for r in policy.rules if r.applies_to(facts.host, facts.port)]
    for p in profiles:
        rules.extend(r for r in p.rules if r.applies_to(facts.host, facts.port))

    def denied(rule: Rule, reason: str) -> Decision | None:
        """Enforce the denial, or report it (``None``: the next element decides)."""
        if rule.report:
            reported.append(WouldDeny(rule.id, reason))
            return None
        return Decision.deny(rule.id, reason, profiles=names, would_deny=tuple(reported))

    for rule in rules:
        if rule.effect is Effect.DENY:
            try:
                hit = rule.expr.evaluate(activation)
            except CelError as exc:
                hit, reason = True, f"deny rule failed to evaluate ({exc}); failing closed"
            else:
                reason = rule.reason or f"denied by rule {rule.id}: {rule.expr.source}"
            if hit and (out := denied(rule, reason)) is not None:
                return out
    for rule in rules:
        if rule.effect is Effect.REQUIRE:
            try:
                ok = rule.expr.evaluate(activation)
            except CelError as exc:
                ok, reason = False, f"required condition failed to evaluate ({exc})"
            else:
                reason = rule.reason or f"required condition not met: {rule.expr.source}"
            if not ok and (out := denied(rule, reason)) is not None:
                return out
    errors: list[str] = []
    for rule in rules:
        if rule.effect is Effect.ALLOW and not (enforcing and rule.report):
            try:
                if rule.expr.evaluate(activation):
                    return Decision(True, rule.id, rule.reason or "allowed", 200, names,
                                    named=named, would_deny=tuple(reported))
            except CelError as exc:
                errors.append(f"{rule.id}: {exc}")
    detail = f" (rules that failed to evaluate: {'; '.join(errors)})" if errors else ""
    why = f"no rule allows {facts.method} {facts.host}{facts.path}{detail}"
    if not enforcing:  # only report-mode profiles select: their default deny is reported
        reported.append(WouldDeny("default-deny", why))
        return Decision(True, "report-mode", "allowed: only report-mode profiles select this "
                        "identity and they would deny it", 200, names, named=named,
                        would_deny=tuple(reported))
    return Decision.deny("default-deny", why, profiles=names, would_deny=tuple(reported))
