"""Policy test files: cases beside the rules, run by ``fleetgate rules test``.

A test file is a YAML list of cases (or a mapping ``{rules: PATH, cases: [...]}`` naming the
rules it tests, relative to the file). Without ``rules:`` a file in ``<rules>/tests/`` or
``<rules>/cases/`` tests the policy in ``<rules>``. A case::

    - name: security may scan with nmap           # shown in every report
      jwt: {sub: s-1, agent_role: security}       # verified claims; null: no identity
      request: {method: POST, url: "https://mcp.example.com/mcp",
                headers: {...}, json: {...} | body: "raw text"}
      mcp: {call: nmap_scan, arguments: {target: 10.0.0.1}}   # or {message: <JSON-RPC>}
                                                  # or {list: tools, entries: [names or objects]}
      usage: {input: 1200, output: 300}           # what an allowed LLM call used (settles)
      repeat: 6                                   # send it 6 times ...
      every: 10s                                  # ... 10 s apart (default 0)
      events: [{kind: request, repeat: 30, every: 1s}]   # kill-switch trigger input
      expect: {allow: false, rule: coordinator.rpm, status: 429, at: 6,
               approval: prod-change, visible: [nmap_scan], stage: limit,
               kill: {trigger: loop, verb: pause, at: 20}}

``expect`` keys compare with the verdict; only the keys given are checked. With ``repeat``,
``at: K`` says the first call refused is the K-th (every call before it allowed) and the other
keys describe it; without ``at``, every call must be allowed and the last one is compared.
``events`` feed the policy's kill-switch triggers (``killswitch.triggers`` and KILLSWITCH.md)
for the case's identity; ``expect.kill`` names the first firing and the event (1-based) that
fired it, or ``kill: null`` for none. Each case starts from empty buckets and spend at
2026-01-01T00:00:00Z.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fleetgate.durations import seconds as duration_seconds
from fleetgate.errors import ConfigError
from fleetgate.kill.model import Subject
from fleetgate.kill.triggers import Event, TriggerEngine, request_fingerprint
from fleetgate.llm.usage import Usage
from fleetgate.mcp.facts import LIST_METHODS
from fleetgate.offline.evaluate import DEFAULT_START, Evaluator, OfflineRequest, Verdict, json_body
from fleetgate.policy.model import Policy

__all__ = [
    "CASE_DIRS",
    "CaseError",
    "CaseFile",
    "CaseResult",
    "TestCase",
    "find_case_files",
    "load_case_file",
    "rules_for",
    "run_case",
]

CASE_DIRS = ("tests", "cases")  # looked for beside the policy, in this order
CASE_KEYS = frozenset({"name", "jwt", "request", "mcp", "usage", "repeat", "every", "events",
                       "expect", "why"})
EXPECT_KEYS = frozenset({"allow", "rule", "status", "stage", "http_rule", "approval", "visible",
                         "hidden", "at", "kill", "held"})
LIST_KINDS = {m.split("/")[0]: m for m in LIST_METHODS}  # tools -> tools/list ...


class CaseError(ConfigError, ValueError):
    """A test file or case cannot be read as one (YAML error, unknown key, bad request):
    ``where`` is ``file:line``. The test fails; the policy is not to blame."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


@dataclass(frozen=True)
class TestCase:
    """One case, with where it is written."""

    __test__ = False  # not a pytest class

    file: Path
    line: int  # of the case's first key
    expect_line: int  # of its ``expect:``
    index: int
    data: Mapping[str, Any]

    @property
    def name(self) -> str:
        return str(self.data.get("name") or f"case {self.index + 1}")

    @property
    def where(self) -> str:
        return f"{self.file}:{self.expect_line}"


@dataclass(frozen=True)
class CaseFile:
    path: Path
    rules: Path
    cases: tuple[TestCase, ...]


@dataclass(frozen=True)
class CaseResult:
    case: TestCase
    ok: bool
    problems: tuple[str, ...] = ()
    verdict: Verdict | None = None
    error: bool = False  # the case itself is broken (not a policy failure)

    def message(self) -> str:
        """``file:line: case name: expected X got Y (rule ...)``, one line per problem."""
        return "\n".join(f"{self.case.where}: {self.case.name}: {p}" for p in self.problems)


@dataclass
class _Run:
    verdicts: list[Verdict] = field(default_factory=list)


# -- finding and reading --------------------------------------------------------------------


def rules_for(case_file: Path) -> Path:
    """The policy a file without ``rules:`` tests: the directory ``tests/`` or ``cases/``
    sits in."""
    parent = case_file.resolve().parent
    if parent.name in CASE_DIRS:
        return parent.parent
    return parent


def find_case_files(path: Path) -> list[Path]:
    """Test files for ``path``: a file itself; a directory's ``tests/`` or ``cases/`` (a
    rules directory), else its own YAML files (a tests directory); a rules *file*'s
    neighbouring ``tests/`` or ``cases/``."""
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        if path.parent.name in CASE_DIRS or not _looks_like_policy(path):
            return [path]
        path = path.parent
    if not path.is_dir():
        raise CaseError(str(path), "no such file or directory")
    for sub in CASE_DIRS:
        if (path / sub).is_dir():
            return _yaml_files(path / sub)
    return _yaml_files(path) if path.name in CASE_DIRS or not any(
        _looks_like_policy(p) for p in _yaml_files(path)) else []


def _yaml_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()
                  and not p.name.startswith("."))


def _looks_like_policy(p: Path) -> bool:
    try:
        head = p.read_text(encoding="utf-8")[:4096]
    except (OSError, UnicodeDecodeError):
        return False
    return "kind: Policy" in head or "\napiVersion:" in f"\n{head}"


def load_case_file(path: Path, rules: Path | None = None) -> CaseFile:
    """Read ``path``; ``rules`` overrides where the policy is (``--rules``)."""
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise CaseError(str(path), f"cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise CaseError(f"{path}{line}", f"not YAML: {exc}") from None
    seq_node = node
    target = rules
    if isinstance(data, dict):
        unknown = set(data) - {"rules", "cases"}
        if unknown or "cases" not in data:
            raise CaseError(f"{path}:1", "a test file is a list of cases, or a mapping with "
                            f"'cases' (and optional 'rules'); found keys {sorted(data)}")
        if target is None and data.get("rules"):
            target = (path.parent / str(data["rules"])).resolve()
        assert isinstance(node, yaml.MappingNode)  # data is a mapping, so was the node
        seq_node = next(v for k, v in node.value if k.value == "cases")
        data = data["cases"]
    if data is None or seq_node is None:
        data, seq_node = [], None
    if not isinstance(data, list) or not isinstance(seq_node, yaml.SequenceNode | None):
        raise CaseError(f"{path}:1", "a test file is a YAML list of cases (- name: ...)")
    cases = []
    nodes = seq_node.value if seq_node is not None else []
    for i, (item, item_node) in enumerate(zip(data, nodes, strict=True)):
        line = item_node.start_mark.line + 1
        expect_line = line
        if isinstance(item_node, yaml.MappingNode):
            expect_line = next((k.start_mark.line + 1 for k, _ in item_node.value
                                if k.value == "expect"), line)
        if not isinstance(item, dict):
            raise CaseError(f"{path}:{line}", "a case is a mapping (name, jwt, request, expect)")
        cases.append(TestCase(path, line, expect_line, i, item))
    return CaseFile(path, target if target is not None else rules_for(path), tuple(cases))


# -- running --------------------------------------------------------------------------------


def _request(case: TestCase) -> tuple[OfflineRequest, Any]:
    """The request the case sends, and the MCP answer to filter (list cases)."""
    spec = case.data.get("request")
    if not isinstance(spec, dict) or "url" not in spec:
        raise CaseError(case.where, "'request' needs at least 'url' (and 'method', default GET)")
    unknown = set(spec) - {"method", "url", "headers", "body", "json"}
    if unknown:
        raise CaseError(case.where, f"unknown request key(s) {sorted(unknown)}; known: method, "
                        "url, headers, body, json")
    headers = dict(spec.get("headers") or {})
    body: bytes | None = None
    answer: Any = None
    mcp = case.data.get("mcp")
    if "json" in spec:
        body = json_body(spec["json"])
    elif isinstance(spec.get("body"), str):
        body = spec["body"].encode()
    elif "body" in spec:  # a YAML mapping or list: the JSON an SDK sends
        body = json_body(spec["body"])
    if mcp is not None:
        message, answer = _mcp_exchange(case, mcp)
        if body is None:
            body = json_body(message)
        headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Accept", "application/json, text/event-stream")
    method = str(spec.get("method") or ("POST" if body is not None else "GET"))
    try:
        return OfflineRequest.from_url(method, str(spec["url"]), headers, body), answer
    except ValueError as exc:
        raise CaseError(case.where, str(exc)) from None


def _mcp_exchange(case: TestCase, mcp: Any) -> tuple[Any, Any]:
    """(the JSON-RPC request, the server's answer or None) of a case's ``mcp:``."""
    if not isinstance(mcp, dict):
        raise CaseError(case.where, "'mcp' is a mapping: {call, arguments}, {message} or "
                        "{list, entries}")
    if "message" in mcp:
        return mcp["message"], mcp.get("answer")
    if "call" in mcp:
        params: dict[str, Any] = {"name": str(mcp["call"])}
        if "arguments" in mcp:
            params["arguments"] = mcp["arguments"]
        return {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}, None
    if "list" in mcp:
        kind = str(mcp["list"])
        method = LIST_KINDS.get(kind.split("/")[0])
        if method is None:
            raise CaseError(case.where, f"mcp.list {kind!r}: one of {sorted(LIST_KINDS)}")
        key = LIST_METHODS[method][0]
        entries = []
        for e in mcp.get("entries") or []:
            if isinstance(e, dict):
                entries.append(e)
            elif key == "resources":
                entries.append({"uri": str(e), "name": str(e)})
            else:
                entries.append({"name": str(e), "inputSchema": {"type": "object"}}
                               if key == "tools" else {"name": str(e)})
        return ({"jsonrpc": "2.0", "id": 1, "method": method},
                {"jsonrpc": "2.0", "id": 1, "result": {key: entries}})
    raise CaseError(case.where, "'mcp' needs 'call', 'message' or 'list'")


def _usage(case: TestCase) -> Usage | None:
    u = case.data.get("usage")
    if u is None:
        return None
    if isinstance(u, int):
        return Usage(input=0, output=u)
    if not isinstance(u, dict):
        raise CaseError(case.where, "'usage' is {input: N, output: N} (tokens)")
    return Usage(input=int(u.get("input") or 0), output=int(u.get("output") or 0))


def _seconds(case: TestCase, value: Any, what: str) -> float:
    if value is None:
        return 0.0
    try:
        return float(duration_seconds(value))
    except (TypeError, ValueError) as exc:
        raise CaseError(case.where, f"'{what}': {exc}") from None


def run_case(policy: Policy, case: TestCase) -> CaseResult:
    """Run one case against ``policy``; never raises for a broken case (it fails)."""
    try:
        return _run(policy, case)
    except CaseError as exc:
        return CaseResult(case, False, (exc.message,), error=True)


def _run(policy: Policy, case: TestCase) -> CaseResult:
    unknown = set(case.data) - CASE_KEYS
    if unknown:
        raise CaseError(case.where, f"unknown key(s) {sorted(unknown)}; a case has "
                        f"{', '.join(sorted(CASE_KEYS))}")
    expect = case.data.get("expect")
    if not isinstance(expect, dict) or not expect:
        raise CaseError(case.where, "'expect' is a mapping (allow, rule, status, ...)")
    bad = set(expect) - EXPECT_KEYS
    if bad:
        raise CaseError(case.where, f"unknown expect key(s) {sorted(bad)}; known: "
                        f"{', '.join(sorted(EXPECT_KEYS))}")
    if "jwt" not in case.data:
        raise CaseError(case.where, "'jwt' (the verified claims; null for none) is required")
    claims = case.data["jwt"]
    if claims is not None and not isinstance(claims, dict):
        raise CaseError(case.where, "'jwt' is a mapping of claims, or null")
    problems: list[str] = []
    verdict: Verdict | None = None
    if "events" in case.data:
        problems += _run_events(policy, case, claims, expect)
    if "request" in case.data:
        verdict, more = _run_requests(policy, case, claims, expect)
        problems += more
    elif set(expect) - {"kill"}:
        raise CaseError(case.where, "expect keys other than 'kill' need a 'request'")
    return CaseResult(case, not problems, tuple(problems), verdict)


def _run_requests(policy: Policy, case: TestCase, claims: Mapping[str, Any] | None,
                  expect: Mapping[str, Any]) -> tuple[Verdict, list[str]]:
    req, answer = _request(case)
    usage = _usage(case)
    repeat = case.data.get("repeat", 1)
    if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
        raise CaseError(case.where, "'repeat' is a whole number >= 1")
    every = _seconds(case, case.data.get("every"), "every")
    at = expect.get("at")
    if at is not None and (not isinstance(at, int) or not 1 <= at <= repeat):
        raise CaseError(case.where, f"'expect.at' is the call (1..{repeat}) first refused")
    ev = Evaluator(policy, start=DEFAULT_START)
    verdict: Verdict | None = None
    for n in range(1, repeat + 1):
        if n > 1:
            ev.advance(every)
        verdict = ev.evaluate(claims, req, usage=usage, mcp_answer=answer)
        if at is not None and n < at and not verdict.allow:
            return verdict, [f"expected calls 1..{at - 1} allowed, call {n} got "
                             f"{_describe(verdict)}"]
        if at is not None and n == at:
            break
        if at is None and not verdict.allow and repeat > 1 and n < repeat:
            return verdict, [f"expected all {repeat} calls allowed, call {n} got "
                             f"{_describe(verdict)}"]
    assert verdict is not None
    return verdict, _compare(expect, verdict)


def _describe(v: Verdict) -> str:
    return (f"{'allow' if v.allow else 'deny'} {v.status} (rule {v.rule}, {v.stage}: "
            f"{v.reason})")


def _compare(expect: Mapping[str, Any], v: Verdict) -> list[str]:
    problems = []
    got: dict[str, Any] = {"allow": v.allow, "rule": v.rule, "status": v.status,
                           "stage": v.stage, "http_rule": v.http_rule, "approval": v.approval,
                           "held": v.held,
                           "visible": None if v.visible is None else list(v.visible),
                           "hidden": list(v.hidden)}
    for key in ("allow", "rule", "status", "stage", "http_rule", "approval", "held", "visible",
                "hidden"):
        if key not in expect:
            continue
        want = expect[key]
        have = got[key]
        if key in ("visible", "hidden") and isinstance(want, list):
            want = [str(x) for x in want]
        if want != have:
            problems.append(f"expected {key} {_show(want)} got {_show(have)} "
                            f"({_describe(v)})")
    return problems


def _show(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else repr(v)


def _events(case: TestCase, claims: Mapping[str, Any] | None) -> Iterator[tuple[float, Event]]:
    groups = case.data.get("events")
    if not isinstance(groups, list) or not groups:
        raise CaseError(case.where, "'events' is a list of {kind, repeat, every, ...}")
    c = claims or {}
    agent = str(c.get("agent_id") or c.get("sub") or "")
    if not agent:
        raise CaseError(case.where, "'events' need an identity with 'sub' (or 'agent_id')")
    session = c.get("session_id", c.get("sid"))
    role = c.get("agent_role")
    subject = Subject(agent=agent, session=None if session is None else str(session),
                      role=None if role is None else str(role),
                      jti=None if c.get("jti") is None else str(c.get("jti")),
                      user=None if c.get("user") is None else str(c.get("user")))
    now = DEFAULT_START
    first = True
    for g in groups:
        if not isinstance(g, dict) or g.get("kind") not in ("request", "response"):
            raise CaseError(case.where, "each event group has kind: request | response")
        bad = set(g) - {"kind", "repeat", "every", "denied", "error", "tokens", "usd",
                        "same", "depth"}
        if bad:
            raise CaseError(case.where, f"unknown event key(s) {sorted(bad)}")
        every = _seconds(case, g.get("every"), "every")
        for i in range(int(g.get("repeat", 1))):
            if not first:
                now += every
            first = False
            if g["kind"] == "request":
                fp = request_fingerprint("POST", "loop.example", "/same") if g.get("same") \
                    else request_fingerprint("POST", "loop.example", f"/{now}/{i}")
                yield now, Event.request(subject, fingerprint=fp, denied=bool(g.get("denied")),
                                         tokens=int(g.get("tokens") or 0),
                                         usd=float(g.get("usd") or 0.0),
                                         message_depth=g.get("depth"))
            else:
                yield now, Event.response(subject, error=bool(g.get("error")),
                                          tokens=int(g.get("tokens") or 0),
                                          usd=float(g.get("usd") or 0.0))


def _run_events(policy: Policy, case: TestCase, claims: Mapping[str, Any] | None,
                expect: Mapping[str, Any]) -> list[str]:
    if "kill" not in expect:
        raise CaseError(case.where, "'events' need 'expect.kill' ({trigger, verb, at} or null)")
    want = expect["kill"]
    engine = TriggerEngine(policy.kill_triggers)
    got: dict[str, Any] | None = None
    for n, (now, event) in enumerate(_events(case, claims), start=1):
        firings = engine.observe(event, now)
        if firings:
            f = firings[0]
            got = {"trigger": f.trigger, "verb": f.verb.value, "at": n,
                   "scope": f"{f.scope.kind.value}:{f.scope.value or ''}", "reason": f.reason}
            break
    if want is None:
        return [] if got is None else [f"expected no kill-switch firing, got {got['verb']} by "
                                       f"trigger {got['trigger']} at event {got['at']}"]
    if not isinstance(want, dict):
        raise CaseError(case.where, "'expect.kill' is {trigger, verb, at} or null")
    if got is None:
        return [f"expected kill-switch {want.get('verb', 'firing')} by trigger "
                f"{want.get('trigger', '?')}, got no firing"]
    problems = []
    for key in ("trigger", "verb", "at", "scope"):
        if key in want and want[key] != got[key]:
            problems.append(f"expected kill {key} {_show(want[key])} got {_show(got[key])} "
                            f"({got['verb']} by {got['trigger']} at event {got['at']}: "
                            f"{got['reason']})")
    return problems


def run_cases(policy: Policy, cases: Sequence[TestCase]) -> list[CaseResult]:
    return [run_case(policy, c) for c in cases]


__all__ += ["run_cases"]
