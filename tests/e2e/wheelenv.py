"""The product as an operator installs it: fleetgate's wheel in an empty virtualenv.

The steps are deploy/Dockerfile's builder stage, on this machine: the wheel is built by
``uv build --wheel`` (build backend pinned and hash-checked by ``deploy/build-constraints.txt``)
from a copy of the sources the image's build context holds, the runtime dependencies are
``uv export``-ed from ``uv.lock`` with their hashes and installed with ``--require-hashes``,
then the wheel with ``--no-deps``, into a venv made by ``python -m venv`` from the Python of
``.venv``. Nothing of the checkout is importable there: the venv has no ``.pth`` to it, and
processes are started with a clean environment from a directory outside the repository.

Built once per test session (:func:`wheel_venv`), removed at exit. uv's cache makes it fast
after the first run; the timings are in :attr:`WheelVenv.timings`.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import REPO

UV = REPO / ".tools" / "uv" / "bin" / "uv"
# what deploy/Dockerfile's builder copies into /src (deploy/Dockerfile.dockerignore)
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "addons")
BUILD_CONSTRAINTS = REPO / "deploy" / "build-constraints.txt"


@dataclass
class WheelVenv:
    root: Path
    wheel: Path
    venv: Path
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    @property
    def site_packages(self) -> Path:
        found = sorted(self.venv.glob("lib/python*/site-packages"))
        assert len(found) == 1, found
        return found[0]

    def env(self, home: Path) -> dict[str, str]:
        """A clean environment for the venv's programs: no PYTHONPATH, no VIRTUAL_ENV of ours."""
        return {"PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home),
                "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


def _run(argv: list[str], cwd: Path, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT", "PYTHONPATH", "PYTHONHOME")}
    res = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res.stdout


def base_python() -> str:
    """The interpreter .venv was made from (the venv module uses it too)."""
    return str(getattr(sys, "_base_executable", sys.executable))


@functools.cache
def wheel_venv(extras: tuple[str, ...] = ()) -> WheelVenv:
    """The wheel and the runtime dependencies (plus ``extras``, e.g. ``("demo",)``) from the lock."""
    assert UV.is_file(), f"{UV} is missing: run ./scripts/bootstrap.sh"
    root = Path(tempfile.mkdtemp(prefix="fleetgate-wheel-"))
    atexit.register(shutil.rmtree, root, True)
    timings: dict[str, float] = {}
    py = base_python()

    t = time.monotonic()
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        assert path.exists(), f"{name} is missing from the repository (the wheel is built from it)"
        if path.is_dir():
            shutil.copytree(path, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    dist = root / "dist"
    _run([str(UV), "build", "--wheel", "--out-dir", str(dist), "--python", py, "--no-python-downloads",
          "--build-constraints", str(BUILD_CONSTRAINTS), "--require-hashes", "--quiet"], cwd=src)
    wheels = sorted(dist.glob("fleetgate-*.whl"))
    assert len(wheels) == 1, wheels
    timings["build"] = time.monotonic() - t

    t = time.monotonic()
    requirements = root / "requirements.txt"
    _run([str(UV), "export", "--frozen", "--no-dev", "--no-emit-project", "--format", "requirements-txt",
          *[a for e in extras for a in ("--extra", e)],
          "--output-file", str(requirements), "--quiet"], cwd=REPO)
    timings["export"] = time.monotonic() - t

    t = time.monotonic()
    venv = root / "venv"
    _run([py, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    vpy = str(venv / "bin" / "python")
    _run([str(UV), "pip", "install", "--python", vpy, "--require-hashes", "--no-deps", "--quiet",
          "--compile-bytecode",
          "-r", str(requirements)], cwd=root)
    _run([str(UV), "pip", "install", "--python", vpy, "--no-deps", "--quiet", "--compile-bytecode",
          str(wheels[0])], cwd=root)
    timings["install"] = time.monotonic() - t
    assert sysconfig.get_python_version() in str(next(venv.glob("lib/python*"))), "not .venv's Python"
    print(f"wheel venv: {root} " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return WheelVenv(root=root, wheel=wheels[0], venv=venv, timings=timings)
