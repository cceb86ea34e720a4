"""Warnings about rules that load but do not do what their author meant.

The loader refuses what is wrong; this module points out what is legal and almost
certainly a mistake, as warnings (``fleetgate rules check`` prints them, a reload logs
them, neither refuses the rules):

* a claim the tokens do not carry: ``jwt.agnet_role`` (checked against the top-level
  ``claims:`` list, or without one :data:`~fleetgate.policy.schema.STANDARD_CLAIMS`), with
  the closest known claim; an unknown ``request`` field likewise;
* a comparison that can never be true: ``request.method == "get"`` (methods are upper
  case), ``request.host == "API.x.com"`` (hosts are lower case, without a trailing dot),
  ``request.scheme == "HTTPS"``;
* a profile selector that reads a claim without ``has()`` (a token without it is not
  selected: surprising for ``jwt.team != "x"``);
* egress ``*`` next to ``destinations.allowPrivate``: a wildcard never reaches a private
  address, only explicit entries (a name, an IP, a CIDR) do.

The walk follows :data:`fleetgate.policy.schema.MODEL`, so every CEL expression of the
format is visited, whatever section it is in. It is textual and cheap (a few regular
expressions per expression, once per load): a lint, never a decision.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fleetgate.celexpr import field_reads, has_unguarded_access, string_literals
from fleetgate.policy.report import Problem, Reporter, did_you_mean
from fleetgate.policy.schema import MODEL, STANDARD_CLAIMS, Field

__all__ = ["REGISTERED_CLAIMS", "REQUEST_FIELDS", "Lint"]

# RFC 7519 registered claims: any token may carry them, declared or not.
REGISTERED_CLAIMS = ("iss", "sub", "aud", "exp", "nbf", "iat", "jti")
# The fields of `request` (fleetgate.normalize.RequestFacts.to_cel).
REQUEST_FIELDS = ("method", "scheme", "host", "port", "path", "raw_path", "query", "headers")

_FIELD = r"request\s*\.\s*(method|host|scheme)"
_LIT = r"__S(\d+)__"
_COMPARE = re.compile(rf"(?<![\w.]){_FIELD}\s*(==|!=)\s*{_LIT}|{_LIT}\s*(==|!=)\s*(?<![\w.])"
                      rf"{_FIELD}(?![\w(])")
_IN_LIST = re.compile(rf"(?<![\w.]){_FIELD}\s+in\s+\[([^\]]*)\]")
_LIT_ONLY = re.compile(_LIT)


@dataclass
class _Claim:
    file: str
    line: int | None
    path: str
    name: str


@dataclass
class Lint:
    """What the lint gathers over one load; :meth:`finish` turns what spans files (declared
    claims, allowPrivate) into warnings once every file is read."""

    declared: list[str] = field(default_factory=list)
    declares: bool = False
    claims: list[_Claim] = field(default_factory=list)
    wildcards: list[tuple[str, int | None, str, str]] = field(default_factory=list)
    allow_private: bool = False
    profile: str = ""  # the agent profile being walked, named in selector warnings

    def document(self, doc: dict[str, Any], report: Reporter) -> None:
        """Walk one (parsed, plain) document along the schema."""
        if isinstance(doc.get("claims"), list):
            self.declares = True
            self.declared += [str(c) for c in doc["claims"]]
        dest = doc.get("destinations")
        if isinstance(dest, dict) and dest.get("allowPrivate"):
            self.allow_private = True
        self._object(doc, "Policy", "", report)

    def finish(self, report: Reporter) -> None:
        """The warnings that need every file: claims against the declared list, wildcard
        egress against allowPrivate."""
        known = ({*self.declared, *REGISTERED_CLAIMS} if self.declares
                 else set(STANDARD_CLAIMS))
        against = "the claims declared under 'claims:'" if self.declares else \
            "the standard claims (declare yours under a top-level 'claims:' list)"
        for c in self.claims:
            if c.name in known:
                continue
            hint = did_you_mean(c.name, sorted(known)) or "."
            report.warnings.append(Problem(
                c.file, c.line, c.path,
                f"jwt.{c.name} is not one of {against}{hint} A token without it makes this "
                "expression fail (a rule denies, a selector does not select)."))
        if self.allow_private:
            for file, line, path, host in self.wildcards:
                report.warnings.append(Problem(
                    file, line, path,
                    f"egress {host!r} never reaches the private networks in "
                    "destinations.allowPrivate: a wildcard stands for internet hosts only. "
                    "List the private hosts or CIDRs this profile may reach explicitly."))

    # -- the walk -------------------------------------------------------------------------

    def _object(self, node: dict[str, Any], name: str, where: str, report: Reporter) -> None:
        if name == "Agent":
            self.profile = str(node.get("name", ""))
        if name == "Egress":
            for i, host in enumerate(node.get("hosts") or []):
                if isinstance(host, str) and host.strip() == "*":
                    at = f"{where}.hosts[{i}]"
                    self.wildcards.append((report.file, report.lines.at(at), at, host.strip()))
        for key, f in MODEL[name].fields.items():
            if key in node:
                self._value(node[key], f, f"{where}.{key}" if where else key, report)

    def _value(self, value: Any, f: Field, where: str, report: Reporter) -> None:
        if f.any_of:
            for alt in f.any_of:
                if (alt.cel and isinstance(value, str)) or (alt.ref and isinstance(value, dict)):
                    self._value(value, alt, where, report)
                    return
            return
        if f.ref is not None and isinstance(value, dict):
            self._object(value, f.ref, where, report)
        elif f.items is not None and isinstance(value, list):
            for i, item in enumerate(value):
                self._value(item, f.items, f"{where}[{i}]", report)
        elif f.values is not None and isinstance(value, dict):
            for k, item in value.items():
                self._value(item, f.values, f"{where}.{k}", report)
        elif f.cel and isinstance(value, str):
            self._cel(value, where, report, selector=f.cel == "selector")

    def _cel(self, source: str, where: str, report: Reporter, *, selector: bool) -> None:
        code, literals = string_literals(source)
        line = report.lines.at(where)
        for name in field_reads(source, "jwt"):
            self.claims.append(_Claim(report.file, line, where, name))
        for name in field_reads(source, "request"):
            if name not in REQUEST_FIELDS:
                report.warn(where, f"request.{name}: requests have no such field"
                            f"{did_you_mean(name, REQUEST_FIELDS)} (fields: "
                            f"{', '.join(REQUEST_FIELDS)}); reading it fails (deny)")
        for message in never_true(code, literals):
            report.warn(where, message)
        if selector:
            for claim in has_unguarded_access(source):
                report.warn(where, f"agent profile {self.profile!r}: match reads jwt.{claim} "
                            f"without has(jwt.{claim}); a token without that claim is not "
                            "selected by this profile")


def _canonical(fld: str, value: str) -> str:
    """How the gateway spells ``value`` for request field ``fld``."""
    if fld == "method":
        return value.upper()
    if fld == "host":
        return value.lower().rstrip(".")
    return value.lower()  # scheme


def never_true(code: str, literals: list[str]) -> list[str]:
    """Messages for comparisons of ``request.method|host|scheme`` with a literal the gateway
    never produces (``code``/``literals``: from :func:`fleetgate.celexpr.string_literals`)."""
    out: list[str] = []
    spelt = {"method": "upper case", "host": "lower case without a trailing dot",
             "scheme": "lower case"}
    for m in _COMPARE.finditer(code):
        fld, op, lit = (m.group(1), m.group(2), m.group(3)) if m.group(1) else \
            (m.group(6), m.group(5), m.group(4))
        value = literals[int(lit)]
        if _canonical(fld, value) != value:
            result = "never true" if op == "==" else "always true"
            out.append(f"request.{fld} {op} {value!r} is {result}: request.{fld} is "
                       f"{spelt[fld]}; write {_canonical(fld, value)!r}")
    for m in _IN_LIST.finditer(code):
        fld = m.group(1)
        for lit in _LIT_ONLY.findall(m.group(2)):
            value = literals[int(lit)]
            if _canonical(fld, value) != value:
                out.append(f"request.{fld} in [...]: {value!r} never matches: request.{fld} "
                           f"is {spelt[fld]}; write {_canonical(fld, value)!r}")
    return out
