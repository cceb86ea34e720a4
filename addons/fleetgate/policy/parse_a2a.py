"""The ``a2a`` section: which agents speak Agent2Agent, where, and the deepest hop allowed.

```yaml
a2a:
  maxDepth: 5                  # default 5; 0: the depth is not checked
  agents:
  - name: ceo                  # the agent id its tokens carry (agent_id or sub)
    url: https://ceo.agents.example.com/a2a    # its A2A JSON-RPC endpoint
```

Requests to a declared endpoint are A2A: their body must be A2A JSON-RPC (or a GET of the
agent card), rules see ``a2a.*``, and the gateway counts every message's hop depth
(:mod:`fleetgate.a2a.depth`). Agent names are unique across files; ``maxDepth`` may be set
in one file (or to the same value in several).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fleetgate.netaddr import HostPattern
from fleetgate.policy.model import A2aAgent
from fleetgate.policy.report import Reporter, as_list, check_keys
from fleetgate.policy.schema import keys

__all__ = ["A2aSection", "parse_a2a"]

_AGENT_KEYS = keys("A2aAgent")


@dataclass(frozen=True)
class A2aSection:
    """One document's ``a2a`` section; ``max_depth`` ``None``: not set in this file."""

    agents: tuple[A2aAgent, ...] = ()
    max_depth: int | None = None


def parse_a2a(node: Any, where: str, report: Reporter, *, names: set[str]) -> A2aSection | None:
    """``a2a: {agents, maxDepth}``. ``names``: agent names already declared (other files)."""
    if node is None:
        return None
    if not isinstance(node, dict):
        report.error(where, "a2a must be a mapping with 'agents' and 'maxDepth'")
        return None
    check_keys(node, where, keys("A2a"), report)
    max_depth = None
    if "maxDepth" in node:
        value = node["maxDepth"]
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            max_depth = value
        else:
            report.error(f"{where}.maxDepth", "maxDepth must be an integer >= 0 (0: unchecked)")
    agents = []
    for i, entry in enumerate(as_list(node.get("agents"), f"{where}.agents", report)):
        agent = parse_agent(entry, f"{where}.agents[{i}]", report, names=names)
        if agent is not None:
            agents.append(agent)
    return A2aSection(tuple(agents), max_depth)


def parse_agent(node: Any, where: str, report: Reporter, *, names: set[str]) -> A2aAgent | None:
    if not isinstance(node, dict):
        report.error(where, "an A2A agent is a mapping {name, url}")
        return None
    check_keys(node, where, _AGENT_KEYS, report)
    name = node.get("name")
    if not isinstance(name, str) or not name.strip():
        report.error(f"{where}.name", "every A2A agent needs a 'name' (the agent id of its tokens)")
        return None
    if name in names:
        report.error(f"{where}.name", f"duplicate A2A agent name {name!r}")
        return None
    url = node.get("url")
    if not isinstance(url, str) or not url.strip():
        report.error(f"{where}.url", "every A2A agent needs the 'url' of its A2A endpoint")
        return None
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        report.error(f"{where}.url", f"not a URL: {exc}")
        return None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        report.error(f"{where}.url", "url must be an http(s) URL with a host "
                     "(https://agent.example.com/a2a)")
        return None
    if parts.query or parts.fragment or parts.username or parts.password:
        report.error(f"{where}.url", "url must not carry a query, fragment or credentials")
        return None
    if parts.hostname.startswith("*"):
        report.error(f"{where}.url", "url names one host, not a wildcard")
        return None
    port = port or (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    try:
        pattern = HostPattern(f"{host}:{port}")
    except ValueError as exc:
        report.error(f"{where}.url", str(exc))
        return None
    names.add(name)
    return A2aAgent(name=name, url=url.strip(), host=pattern, path=parts.path.rstrip("/"),
                    source=report.source(where))
