"""Who the humans are: operators of the admin API, each with a name and groups.

Approvals need people, not a shared secret: "two distinct approvers" is only true if the
gateway knows who approved. ``fleetgate_admin_users_file`` lists operators with the SHA-256
of their personal admin token (the token itself is never stored)::

    operators:
      - name: alice
        groups: [oncall, finance]
        tokenSha256: 5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8

The shared ``fleetgate_admin_token`` still works and acts as the operator ``admin`` (group
``admin``); a loopback client with no token configured is ``local`` (group ``admin``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml

from fleetgate.errors import ConfigError

__all__ = ["Operator", "OperatorTable", "OperatorsError", "parse_operators", "token_sha256"]


class OperatorsError(ConfigError):
    """The operators file cannot be used."""


@dataclass(frozen=True)
class Operator:
    """An authenticated human (or the shared admin token)."""

    name: str
    groups: frozenset[str] = frozenset()

    def is_in(self, principals: Iterable[str]) -> bool:
        """Whether one of ``principals`` (``name`` or ``group:NAME``) names this operator."""
        for p in principals:
            if p.startswith("group:"):
                if p[6:] in self.groups:
                    return True
            elif p == self.name:
                return True
        return False

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "groups": sorted(self.groups)}


ADMIN = Operator("admin", frozenset({"admin"}))
LOCAL = Operator("local", frozenset({"admin"}))


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class OperatorTable:
    """Personal tokens by their SHA-256; looked up in constant time per entry."""

    by_hash: tuple[tuple[str, Operator], ...] = ()

    def authenticate(self, token: str) -> Operator | None:
        digest = token_sha256(token)
        found = None
        for h, op in self.by_hash:  # compare every entry: no early exit to time
            if hmac.compare_digest(h, digest):
                found = op
        return found

    def named(self, name: str) -> Operator | None:
        for _, op in self.by_hash:
            if op.name == name:
                return op
        return None

    def __len__(self) -> int:
        return len(self.by_hash)


def parse_operators(text: str) -> OperatorTable:
    """The operators file (YAML or JSON), or :class:`OperatorsError` naming what is wrong."""
    try:
        doc = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise OperatorsError(f"not YAML: {exc}") from None
    if isinstance(doc, str):
        doc = json.loads(doc)
    if not isinstance(doc, dict) or set(doc) - {"operators"}:
        raise OperatorsError("the file must be a mapping with one key, 'operators' (a list)")
    entries = doc.get("operators") or []
    if not isinstance(entries, list):
        raise OperatorsError("'operators' must be a list")
    out: list[tuple[str, Operator]] = []
    names: set[str] = set()
    for i, e in enumerate(entries):
        where = f"operators[{i}]"
        if not isinstance(e, dict) or set(e) - {"name", "groups", "tokenSha256"}:
            raise OperatorsError(f"{where}: a mapping of name, groups, tokenSha256")
        name, groups, digest = e.get("name"), e.get("groups") or [], e.get("tokenSha256")
        if not isinstance(name, str) or not name or name in ("admin", "local"):
            raise OperatorsError(f"{where}.name: a non-empty name other than 'admin'/'local'")
        if name in names:
            raise OperatorsError(f"{where}.name: {name!r} is listed twice")
        if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
            raise OperatorsError(f"{where}.groups: a list of group names")
        if (not isinstance(digest, str) or len(digest) != 64
                or any(c not in "0123456789abcdef" for c in digest.lower())):
            raise OperatorsError(f"{where}.tokenSha256: the SHA-256 (64 hex digits) of the "
                                 "operator's token: `printf %s TOKEN | sha256sum`")
        names.add(name)
        out.append((digest.lower(), Operator(name, frozenset(groups))))
    return OperatorTable(tuple(out))
