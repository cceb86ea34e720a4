"""``fleetgate demo --check``: the offline demo runs end to end and asserts its own steps.

The demo starts its own gateway (mitmdump), mock LLM provider and MCP server, so this test
only runs the command, as a newcomer (and CI) would, and checks what it reports.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from wheelenv import wheel_venv

REPO = Path(__file__).resolve().parents[2]
FLEETGATE = Path(sys.executable).parent / "fleetgate"


def run(*args: str, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(FLEETGATE), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env}, stdin=subprocess.DEVNULL)


@pytest.mark.timeout(300)
def test_demo_check_passes_every_step(tmp_path: Path) -> None:
    # as `pip install 'fleetgate[demo]'` gives it: the wheel, the runtime and the demo extra
    # from the lock, nothing of the test environment; run outside the checkout on its rules/
    venv = wheel_venv(("demo",))
    r = subprocess.run([str(venv.bin / "fleetgate"), "demo", "--check", "--rules", str(REPO / "rules")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=150,
                       env=venv.env(tmp_path), stdin=subprocess.DEVNULL)
    out = r.stdout
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{out}\nstderr:\n{r.stderr}"
    for i in range(1, 7):
        assert re.search(rf"^  => step {i} ok: ", out, re.M), f"step {i} not reported ok:\n{out}"
    assert "demo: all 6 steps ok" in out
    # what each step showed, from the gateway's own answers and records
    assert re.search(r"2 calls metered, [1-9]\d* input \+ [1-9]\d* output tokens, \$0\.0*[1-9]", out), out
    # step 2: the general agent's model rule and max_tokens cap, an egress refusal
    assert "403 general.models; 403 general.max-tokens; 403 egress (the provider saw none)" in out, out
    assert re.search(r"^    SDK error: fleetgate denied this request \(general\.models\): .*Sonnet", out,
                     re.M), out
    # step 3: the security agent's daily budget, exhausted by the provider's bill
    assert re.search(r"429 security\.daily-usd, refills in [1-9]\d* s \(x-should-retry: (false|unset)\)",
                     out), out
    assert re.search(r"^    SDK error: fleetgate denied this request \(security\.daily-usd\): budget "
                     r"security\.daily-usd .* it refills at \d{4}-\d\d-\d\dT00:00:00Z", out, re.M), out
    assert "security sees: nmap_scan, trivy_image, falco_events" in out
    assert "cloud-tools.not-agent-infra" in out
    assert re.search(r"stream cut after 1 event\(s\); 503 killswitch\.stop; 200 after unrevoke", out), out
    assert "zz-demo-local.yaml: destinations.allowPrivate [127.0.0.1/32]" in out
    assert "FAILED" not in out


def test_demo_names_the_extra_when_the_mcp_sdk_is_missing() -> None:
    code = ("import sys; sys.modules['mcp'] = None; from fleetgate.cli import main; "
            "sys.exit(main(['demo', '--check']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r
    assert "install the demo extra: make demo / pip install 'fleetgate[demo]'" in r.stderr
    assert "mcp" in r.stderr


@pytest.mark.timeout(120)
def test_demo_check_fails_naming_the_step(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    subprocess.run(["cp", "-r", str(REPO / "rules"), str(rules)], check=True)
    fleet = rules / "fleet.yaml"
    text = fleet.read_text()
    assert "hosts: [api.anthropic.com, api.openai.com, api.x.ai]" in text
    fleet.write_text(text.replace("hosts: [api.anthropic.com, api.openai.com, api.x.ai]",
                                  "hosts: [api.anthropic.com, api.x.ai]"))  # coordinator: no OpenAI
    r = run("demo", "--check", "--rules", str(rules), timeout=100)
    assert r.returncode == 1, r.stdout
    assert re.search(r"^FAILED step 1 \(an allowed LLM call, metered\): OpenAI call: HTTP 403", r.stdout,
                     re.M), r.stdout
    assert "step 1 ok" not in r.stdout
