"""The wheel is the product: installed alone, it runs the gateway from any directory.

``wheelenv`` builds the wheel and installs it with exactly the locked runtime dependencies into
an empty venv (deploy/Dockerfile's builder, here). These tests then use only that venv, from an
empty directory outside the repository: ``fleetgate run --dev`` makes its CA, secret and state
there, loads the mitmproxy script the wheel ships, and enforces the rules.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme
from wheelenv import WheelVenv, wheel_venv

from harness import REPO, Upstream, free_port, raw_connect, ssl_context

pytestmark = pytest.mark.e2e


def _pyproject_version() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def _locked_version(name: str) -> str:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    versions = {p["version"] for p in lock["package"] if p["name"] == name}
    assert len(versions) == 1, f"uv.lock pins {name} at {versions}"
    return versions.pop()


@pytest.fixture(scope="module")
def wheel() -> WheelVenv:
    return wheel_venv()


@pytest.fixture
def empty_dir(tmp_path: Path) -> Path:
    d = tmp_path / "operator"
    d.mkdir()
    assert REPO.resolve() not in d.resolve().parents and not any(d.iterdir())
    return d


def fleetgate(wheel: WheelVenv, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(wheel.bin / "fleetgate"), *args], cwd=cwd, env=wheel.env(cwd),
                          capture_output=True, text=True, timeout=60)


def test_wheel_ships_the_script_alone_in_its_directory(wheel: WheelVenv) -> None:
    with zipfile.ZipFile(wheel.wheel) as z:
        names = z.namelist()
    script_dir = [n for n in names if n.startswith("fleetgate/script/")]
    assert script_dir == ["fleetgate/script/gateway.py"], script_dir
    assert not any(n.startswith(("gateway.py", "addons/")) for n in names), "the repo's own files leaked"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "LICENSE is not in the wheel"
    installed = wheel.site_packages / "fleetgate" / "script"
    # byte-compiled at install (a __pycache__ directory is no module sys.path could shadow)
    assert sorted(p.name for p in installed.iterdir() if p.name != "__pycache__") == ["gateway.py"]


def test_version_and_script_path_commands(wheel: WheelVenv, empty_dir: Path) -> None:
    r = fleetgate(wheel, empty_dir, "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (f"fleetgate {_pyproject_version()} "
                                f"(mitmproxy {_locked_version('mitmproxy')})")
    r = fleetgate(wheel, empty_dir, "script-path")
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip())
    assert path == wheel.site_packages / "fleetgate" / "script" / "gateway.py" and path.is_file()


RULES = """apiVersion: fleetgate/v1
destinations:
  allowPrivate: ["127.0.0.1/32"]
agents:
- name: wheel-agent
  match: 'jwt.agent_role == "wheel"'
  egress:
    hosts: ["127.0.0.1:{port}"]
  authorization:
    rules:
    - id: wheel.get
      allow: 'request.method == "GET"'
"""


class Running:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)


@contextlib.contextmanager
def run_gateway(wheel: WheelVenv, cwd: Path, rules: Path, upstream_ca: Path) -> Iterator[tuple[Running, int]]:
    port, metrics, admin = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [str(wheel.bin / "fleetgate"), "run", "--dev", "--rules", rules.name, "--listen-port", str(port),
         "--metrics", f"127.0.0.1:{metrics}", "--admin", f"127.0.0.1:{admin}",
         "--", "--set", f"ssl_verify_upstream_trusted_ca={upstream_ca}"],
        cwd=cwd, env=wheel.env(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    run = Running(proc)
    try:
        deadline = time.monotonic() + 45
        while True:
            if proc.poll() is not None:
                time.sleep(0.3)
                raise AssertionError(f"fleetgate run exited {proc.returncode}:\n{run.text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{metrics}/healthz/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"fleetgate run was not ready in 45 s:\n{run.text()}")
            time.sleep(0.1)
        yield run, port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        run.pump.join(5)
        assert proc.stdout
        proc.stdout.close()
        print(f"--- fleetgate run ---\n{run.text()}")


@pytest.mark.timeout(180)
def test_fleetgate_run_from_an_empty_directory(wheel: WheelVenv, empty_dir: Path, upstream: Upstream,
                                               upstream_ca: trustme.CA, upstream_ca_file: Path) -> None:
    allowed, refused = upstream, Upstream(upstream_ca)
    try:
        rules = empty_dir / "fleet.yaml"
        rules.write_text(RULES.format(port=allowed.port))
        with run_gateway(wheel, empty_dir, rules, upstream_ca_file) as (gw, port):
            # mitmdump took fleetgate's process (execv) and loaded the wheel's script
            argv = [a.decode() for a in Path(f"/proc/{gw.proc.pid}/cmdline").read_bytes().split(b"\0")]
            script = wheel.site_packages / "fleetgate" / "script" / "gateway.py"
            assert argv[:4] == [str(wheel.bin / "python"), str(wheel.bin / "mitmdump"), "-s", str(script)], \
                argv
            # --dev made its CA and secret, and the state directory, where it was started
            dev = empty_dir / "certs" / "dev"
            assert (dev / "mitmproxy-ca.pem").is_file() and (dev / "jwt-hs256.secret").is_file()
            assert (empty_dir / "state").is_dir()

            # no token: 407 on the CONNECT
            status, _, _ = raw_connect(port, f"127.0.0.1:{allowed.port}")
            assert status == 407

            minted = fleetgate(wheel, empty_dir, "token", "mint", "--sub", "wheel-agent-1",
                               "--claim", "agent_role=wheel", "--ttl", "10m")
            assert minted.returncode == 0, minted.stderr
            token = minted.stdout.strip()
            ca = ssl_context(dev / "mitmproxy-ca-cert.pem")
            with httpx.Client(proxy=f"http://agent:{token}@127.0.0.1:{port}", verify=ca, timeout=10) as agent:
                # a destination the rules do not list: refused by the gateway, with its rule id
                r = agent.get(refused.ip_url + "/not-in-egress")
                assert r.status_code == 403, r.text
                assert r.json()["fleetgate"]["rule"] == "egress", r.text
                assert r.headers.get("x-fleetgate-decision-id")
                assert refused.paths() == []
                # the listed one is reached, under the rule that allowed it
                r = agent.get(allowed.ip_url + "/through-the-wheel")
                assert r.status_code == 200, r.text
                assert allowed.paths() == ["/through-the-wheel"]
                assert "proxy-authorization" not in allowed.seen[0].headers
                # and a method its rules do not allow is refused by the profile's default
                r = agent.post(allowed.ip_url + "/post-refused", content=b"{}")
                assert r.status_code == 403, r.text
                assert allowed.paths() == ["/through-the-wheel"]
    finally:
        refused.stop()
    print(f"wheel venv timings: {wheel.timings}")


LOAD_TWO_SCRIPTS = r'''
import importlib.util, json, sys
from pathlib import Path
import fleetgate
from mitmproxy.addons.script import load_script

script = fleetgate.script_path()
package = script.parent.parent
ours = load_script(str(script))
# the operator's own script, also called gateway.py, loaded after ours (same module name)
theirs = load_script(str(Path("gateway.py").resolve()))
shadowed = {}
for sub in sorted(p.name for p in package.iterdir() if (p / "__init__.py").is_file() or p.suffix == ".py"):
    name = sub.removesuffix(".py")
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.origin and Path(spec.origin).resolve().is_relative_to(package):
        shadowed[name] = spec.origin
print(json.dumps({
    "sys_path": sys.path[:2], "script_dir": str(script.parent), "shadowed": shadowed,
    "ours": [type(a).__name__ for a in ours.addons], "theirs": [type(a).__name__ for a in theirs.addons],
    "names": [ours.__name__, theirs.__name__], "ours_file": ours.__file__,
}))
'''

OPERATOR_SCRIPT = """
class Mine:
    pass

addons = [Mine()]
"""


def test_packaged_script_shadows_no_library_and_shares_its_name(wheel: WheelVenv, empty_dir: Path) -> None:
    """mitmproxy 12.3.1 puts a script's directory first on sys.path (and leaves it there) and
    names its module after the file: loaded from the wheel, the packaged script must make none
    of fleetgate's subpackages (``mcp``, ``limits``, ...) importable as top-level names, and an
    operator's script of the same name loaded beside it keeps its module."""
    import json

    (empty_dir / "gateway.py").write_text(OPERATOR_SCRIPT)
    r = subprocess.run([str(wheel.bin / "python"), "-c", LOAD_TWO_SCRIPTS], cwd=empty_dir,
                       env=wheel.env(empty_dir), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    # the loader's sys.path change outlives the load: both directories stay first
    assert out["sys_path"] == [str(empty_dir), out["script_dir"]], out
    assert out["shadowed"] == {}, f"top-level names resolving into the fleetgate package: {out['shadowed']}"
    # same module name, two modules, each with its own addons: ours the whole chain
    assert out["names"] == ["__mitmproxy_script__.gateway"] * 2, out
    assert out["ours_file"] == str(wheel.site_packages / "fleetgate" / "script" / "gateway.py")
    assert len(out["ours"]) > 5 and "KillSwitch" in out["ours"], out
    assert out["theirs"] == ["Mine"], out
