"""uv.lock is the only list of versions: it must be the lock of this pyproject.toml, and hashed.

Offline (``uv lock --check`` would ask the index): uv records what it resolved *for* in the
root package's ``[package.metadata]`` (``requires-dist``, the project's dependencies) and
``[package.metadata.requires-dev]`` (the dependency groups). An edit to pyproject.toml without
``uv lock`` makes them differ, and bootstrap's ``uv sync --frozen`` would then install the
old set without a word. Every locked artifact must carry its hash, since the image and the
wheel test install the runtime set with ``--require-hashes``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]


def _load(name: str) -> dict[str, Any]:
    return tomllib.loads((REPO / name).read_text())


PYPROJECT = _load("pyproject.toml")
LOCK = _load("uv.lock")
ROOT = canonicalize_name(PYPROJECT["project"]["name"])


def _from_pyproject(items: list[str]) -> set[tuple[str, tuple[str, ...], str, str]]:
    out = set()
    for item in items:
        r = Requirement(item)
        out.add((canonicalize_name(r.name), tuple(sorted(r.extras)), str(SpecifierSet(str(r.specifier))),
                 str(r.marker or "")))
    return out


def _from_lock(entries: list[dict[str, Any]]) -> set[tuple[str, tuple[str, ...], str, str]]:
    out = set()
    for e in entries:
        # uv writes specifiers normalised; SpecifierSet's str sorts them the same way either side
        out.add((canonicalize_name(e["name"]), tuple(sorted(e.get("extras", []))),
                 str(SpecifierSet(e.get("specifier", ""))), str(e.get("marker", ""))))
    return out


def _root() -> dict[str, Any]:
    found = [p for p in LOCK["package"] if canonicalize_name(p["name"]) == ROOT]
    assert len(found) == 1, f"uv.lock has {len(found)} entries for {ROOT}"
    return found[0]


def test_lock_records_the_project_dependencies() -> None:
    want = _from_pyproject(PYPROJECT["project"]["dependencies"])
    for extra, items in PYPROJECT["project"].get("optional-dependencies", {}).items():
        # uv records an extra's requirements with the marker pip would read from the wheel
        want |= {(n, e, spec, f'extra == "{extra}"' if not m else f'({m}) and extra == "{extra}"')
                 for n, e, spec, m in _from_pyproject(items)}
    got = {(n, e, spec, m.replace("'", '"')) for n, e, spec, m in
           _from_lock(_root()["metadata"].get("requires-dist", []))}
    assert got == want, (f"pyproject.toml and uv.lock disagree on [project] dependencies: only in "
                         f"pyproject {sorted(want - got)}, only in uv.lock {sorted(got - want)}; run "
                         ".tools/uv/bin/uv lock (make lock upgrades everything)")


def test_lock_records_every_dependency_group() -> None:
    groups = PYPROJECT.get("dependency-groups", {})
    locked = _root()["metadata"].get("requires-dev", {})
    assert sorted(locked) == sorted(groups), f"groups: pyproject {sorted(groups)}, uv.lock {sorted(locked)}"
    for name, items in groups.items():
        assert all(isinstance(i, str) for i in items), f"group {name}: include-group is not compared here"
        want, got = _from_pyproject(items), _from_lock(locked[name])
        assert got == want, (f"group {name}: only in pyproject {sorted(want - got)}, only in uv.lock "
                             f"{sorted(got - want)}; run .tools/uv/bin/uv lock")


def test_lock_is_for_this_project_version_and_python() -> None:
    assert _root()["version"] == PYPROJECT["project"]["version"]
    assert _root()["source"] == {"editable": "."}
    assert LOCK["requires-python"] == PYPROJECT["project"]["requires-python"]


@pytest.mark.parametrize("package", [p for p in LOCK["package"] if canonicalize_name(p["name"]) != ROOT],
                         ids=lambda p: f"{p['name']}=={p.get('version')}")
def test_every_locked_artifact_has_a_hash(package: dict[str, Any]) -> None:
    assert "registry" in package["source"], f"{package['name']}: source {package['source']} (not an index)"
    artifacts = [*package.get("wheels", []), *([package["sdist"]] if "sdist" in package else [])]
    assert artifacts, f"{package['name']}: no wheel nor sdist locked"
    for a in artifacts:
        assert str(a.get("hash", "")).startswith("sha256:") and len(a["hash"]) == 7 + 64, (
            f"{package['name']}: {a.get('url')} has no sha256 hash")


def test_lock_covers_what_the_checks_rely_on() -> None:
    """The check above is not vacuous: the runtime's key packages are locked, with wheels."""
    names = {canonicalize_name(p["name"]) for p in LOCK["package"]}
    assert {"mitmproxy", "pyjwt", "common-expression-language", "tiktoken"} <= names
    assert len(LOCK["package"]) > 50
