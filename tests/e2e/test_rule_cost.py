"""End to end: a hot rules edit that could freeze the gateway (issue 16, bounded rule cost).

Measured on main before the bound: a 5-level nested comprehension loaded, cost ~2 s per
evaluation, and a control agent that the rule does not even concern saw p50 1.1 s, max 1.9 s.
Now the edit is refused at load, with the rule's file:line, the old policy keeps serving and
the control agent keeps getting quick answers.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

from harness import Gateway, Upstream, token, wait_until, write_rules


def nested(levels: int, n: int = 20) -> str:
    items = "[" + ", ".join(str(i) for i in range(n)) + "]"
    body = "true"
    for i in reversed(range(levels)):
        body = f"{items}.{'exists' if i == levels - 1 else 'all'}(v{i}, {body})"
    return body


def test_hot_edit_with_a_freezing_rule_is_refused_and_the_old_policy_keeps_serving(
        gateway: Gateway, upstream: Upstream, rules_file: Path) -> None:
    before = gateway.ready().json()
    assert before["ready"] is True and before["last_reload_ok"] is True
    assert "fleetgate_rule_evaluations_over_budget 0.0" in gateway.metrics()

    latencies: list[float] = []
    statuses: list[int] = []
    stop = threading.Event()

    def control_agent() -> None:
        with gateway.client(token("control", role="other"), timeout=10) as c:
            while not stop.is_set():
                start = time.monotonic()
                statuses.append(c.get(upstream.url + "/control").status_code)
                latencies.append(time.monotonic() - start)
                time.sleep(0.02)

    agent = threading.Thread(target=control_agent, daemon=True)
    agent.start()
    try:
        assert wait_until(lambda: len(latencies) >= 5, 10)
        write_rules(rules_file, [upstream.port], extra=f"""\
- name: frozen
  match: 'jwt.agent_role == "tester"'
  authorization:
    rules:
    - id: frozen-rule
      deny: '{nested(5)}'
""")
        line = next(i for i, text in enumerate(rules_file.read_text().splitlines(), 1)
                    if "deny: '[0, 1" in text)
        assert wait_until(lambda: gateway.ready().json()["last_reload_ok"] is False, 10)
        seen = len(latencies)
        assert wait_until(lambda: len(latencies) >= seen + 20, 15)
    finally:
        stop.set()
        agent.join(15)

    status = gateway.ready()
    assert status.status_code == 200  # the old policy still serves: still ready
    body = status.json()
    assert body["revision"] == before["revision"]
    problem = next(e for e in body["last_error"] if "nest 5 deep" in e)
    assert f"rules.yaml:{line}" in problem
    assert "agents[1].authorization.rules[0].deny" in problem
    assert wait_until(lambda: "nest 5 deep" in gateway.text(), 5)  # logged, loudly

    # the old policy: the tester profile still allows, the refused deny rule never ran
    with gateway.client(token("agent-1", role="tester")) as c:
        r = c.get(upstream.url + "/after")
        assert r.status_code == 200
    assert statuses and set(statuses) == {200}
    p50, worst = statistics.median(latencies), max(latencies)
    print(f"control agent: {len(latencies)} calls, p50 {p50 * 1000:.0f} ms, "
          f"max {worst * 1000:.0f} ms")
    assert p50 < 0.3, f"control agent p50 {p50:.3f} s"
    assert worst < 1.0, f"control agent max {worst:.3f} s"
    assert "fleetgate_rule_evaluations_over_budget 0.0" in gateway.metrics()
