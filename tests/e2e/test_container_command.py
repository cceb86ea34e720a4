"""The gateway started exactly as its container starts it (issue #8).

For the base and every overlay under ``deploy/kubernetes/overlays`` (rendered by the same
pinned kustomize as ``make deploy-check``), the test takes the command line the gateway's
container runs: the image's ENTRYPOINT/CMD from ``deploy/Dockerfile`` combined with the
container's ``command``/``args`` the Kubernetes way (``$(VAR)`` expanded from its ``env``), and
its environment (the image's ENV, the container's ``env``) and working directory. It lays out
every volume the container mounts the way the kubelet does: ConfigMap, Secret and projected
volumes in the ``..data`` symlink layout with their ``items`` paths and modes, the rules built
from the rendered ConfigMap's data (so they are exactly what the ConfigMap holds), emptyDirs
and PVCs empty.

What differs from the container, and nothing else:

* the image's virtualenv (its ``VIRTUAL_ENV``, ``/opt/venv``) is the one ``wheelenv`` makes
  the way the Dockerfile's builder makes it: the wheel built from this checkout, installed with
  the runtime dependencies ``uv.lock`` pins. So the ENTRYPOINT's script path is the packaged
  script inside an installed wheel, and nothing of the checkout is imported;
* in the args, env and working directory, each volume's mount path is replaced by its temp
  dir, a path in the image's venv by the same path in that venv, and a path the image got from
  the build context (COPY, also through a build stage) by its source in the repo
  (``/app/rules`` -> ``rules``);
* the executable is the one of the same name in that venv's ``bin`` (the image's PATH leads
  there);
* each containerPort is replaced by a free port, and ``0.0.0.0`` by ``127.0.0.1``;
* the container's ``/tmp`` volume is also given to the process as ``TMPDIR``;
* Secrets are not in the repo (the example overlay renders placeholders that are not keys):
  their files are made here as an operator makes them (a CA by ``fleetgate.cli.ca_init``, an
  HS256 secret, an admin token, placeholder upstream keys), under the keys the rendered
  Secret or the volume's ``items`` name, else the files the command line and rules refer to;
* where the command line sets ``fleetgate_state=redis://<service>:<port>`` (the ``redis``
  component), the service must be rendered with that port; the process gets a real
  ``redis-server`` on 127.0.0.1 instead, started with a password that is what the mounted
  ``fleetgate_state_password_file`` holds;
* the process runs as the test's user, not ``runAsUser``. Where a mount namespace can be made
  (root here and in CI), the whole file system is remounted read-only for the gateway except
  its emptyDir/PVC volumes, as ``readOnlyRootFilesystem`` and the read-only ConfigMap/Secret
  mounts make it in the pod; elsewhere the ConfigMap/Secret volumes are chmod 0555/0444.
  Either way, nothing in a read-only volume may have changed afterwards (mitmproxy writes
  ``mitmproxy-dhparam.pem`` into its confdir when the mount lacks it).

Paths inside the rules (credentials' ``secretFile``) are container paths the test cannot map
without changing the ConfigMap: here those routes refuse (the gateway logs it);
``tests/unit/test_deploy_manifests.py`` checks them against the mounts.
``test_container_forwards_allowed_request`` adds one rules file that the ConfigMap does not
hold to the rules volume (the example rules let no agent reach a loopback address), so that a
request the rules allow reaches an upstream, with an upstream key read from the mounted
credentials Secret.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import posixpath
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import deploy_check as dc  # scripts/ (pytest pythonpath): the same rendering CI checks
import httpx
import pytest
import redis as redis_lib
import yaml
from redisd import RedisServer
from wheelenv import wheel_venv

from fleetgate.cli import ca_init
from fleetgate.identity.mint import mint_token
from harness import REPO, Upstream, free_port

pytestmark = pytest.mark.e2e

OVERLAYS_DIR = REPO / "deploy" / "kubernetes" / "overlays"
ABS_PATH = re.compile(r"(?<![\w.:/-])/[\w.@%+-]+(?:/[\w.@%+-]+)*/?")




def _overlays() -> list[Any]:
    """The base and every overlay: each renders the gateway's Deployment."""
    found = sorted(p.parent for p in OVERLAYS_DIR.glob("*/kustomization.yaml"))
    if not found:
        return [pytest.param(None, id="no-overlay")]
    return [pytest.param(p, id=p.name) for p in [OVERLAYS_DIR.parent / "base", *found]]


# -- what the pod runs -------------------------------------------------------------------


@dataclass
class Pod:
    """The gateway's container in one rendered overlay, with what it needs from the render."""

    overlay: Path
    docs: list[dict[str, Any]]
    deployment: dict[str, Any]
    pod: dict[str, Any]
    container: dict[str, Any]
    stages: list[Any]

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((d for d in self.docs if d.get("kind") == kind
                     and d.get("metadata", {}).get("name") == name), None)

    @property
    def volumes(self) -> dict[str, dict[str, Any]]:
        return {v["name"]: v for v in self.pod.get("volumes") or []}

    @property
    def ports(self) -> list[dict[str, Any]]:
        return list(self.container.get("ports") or [])

    def port(self, ref: int | str) -> int:
        """A probe's or Service's port reference (number or name) as a containerPort number."""
        if isinstance(ref, int):
            return ref
        for p in self.ports:
            if p.get("name") == ref:
                return int(p["containerPort"])
        if str(ref).isdigit():
            return int(ref)
        raise AssertionError(f"port {ref!r} is not a containerPort of {self.container['name']}")


def dockerfile() -> Path:
    path = REPO / "deploy" / "Dockerfile"
    assert path.is_file(), "deploy/Dockerfile is missing"
    return path


def gateway_pod(overlay: Path) -> Pod:
    try:
        docs = dc.render(overlay)
    except dc.CheckError as e:  # kustomize missing or the overlay broken: a failure, not a skip
        pytest.fail(str(e))
    stages = dc.parse_dockerfile(dockerfile())
    found = [Pod(overlay, docs, d, pod, c, stages) for d, pod, c in dc.gateway_containers(docs)]
    names = [(p.deployment["metadata"]["name"], p.container["name"]) for p in found]
    assert len(found) == 1, (f"{overlay.name}: expected one Deployment container running the fleetgate "
                             f"image, found {names}")
    return found[0]


def k8s_env(pod: Pod) -> dict[str, str]:
    """The container's ``env``: literal values, refs to rendered ConfigMaps, the downward API."""
    out: dict[str, str] = {}
    for e in pod.container.get("env") or []:
        if "value" in e:
            out[e["name"]] = _expand(str(e["value"]), out)
        elif "valueFrom" in e:
            vf = e["valueFrom"]
            if "configMapKeyRef" in vf:
                ref = vf["configMapKeyRef"]
                cm = pod.find("ConfigMap", ref["name"])
                assert cm is not None, f"env {e['name']}: ConfigMap {ref['name']} is not rendered"
                out[e["name"]] = cm.get("data", {})[ref["key"]]
            elif "fieldRef" in vf:
                out[e["name"]] = {"metadata.name": "fleetgate-e2e-0", "metadata.namespace": "fleetgate",
                                  "status.podIP": "127.0.0.1"}.get(vf["fieldRef"]["fieldPath"], "")
            elif "resourceFieldRef" in vf:
                out[e["name"]] = "1"
            else:
                raise AssertionError(f"env {e['name']}: {sorted(vf)} is not filled in by this test yet")
        else:
            out[e["name"]] = ""
    return out


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion (``$$`` escapes; unknown references stay as they are)."""
    return re.sub(r"\$\$|\$\((\w+)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def container_argv(pod: Pod) -> list[str]:
    """ENTRYPOINT/CMD and command/args combined as the kubelet does."""
    image = pod.stages[-1]
    command, args = pod.container.get("command"), pod.container.get("args")
    assert image.entrypoint is None or image.entrypoint[:2] != ["/bin/sh", "-c"], (
        "deploy/Dockerfile: ENTRYPOINT is in shell form; use the exec (JSON) form so the gateway "
        "is PID 1 and gets SIGTERM")
    if command is not None:
        argv = list(command) + list(args or [])
    else:
        argv = list(image.entrypoint or []) + list(args or image.cmd or [])  # args: [] is unset
    env = k8s_env(pod)
    return [_expand(str(a), env) for a in argv]


# -- the volumes -------------------------------------------------------------------------

CA_FILES: dict[str, bytes] = {}


def ca_files() -> dict[str, bytes]:
    """What ``fleetgate ca init`` makes (the operator's CA Secret is made from it)."""
    if not CA_FILES:
        d = Path(tempfile.mkdtemp(prefix="fleetgate-ca-"))
        try:
            ca_init(d, quiet=True)
            CA_FILES.update({p.name: p.read_bytes() for p in d.iterdir()})
        finally:
            shutil.rmtree(d)
    return CA_FILES


@dataclass
class Layout:
    """The pod's volumes laid out under ``root``; ``paths`` maps container paths to local ones."""

    pod: Pod
    root: Path
    paths: dict[str, Path] = field(default_factory=dict)
    read_only: list[Path] = field(default_factory=list)
    writable: list[Path] = field(default_factory=list)
    # rules files that the ConfigMap does not hold, made from the layout (local paths)
    extra_rules: Callable[[Layout], dict[str, str]] | None = None
    # the password the local redis-server requires (fleetgate_state_password_file's content)
    redis_password: str | None = None
    # personal admin tokens of the operators file made here (fleetgate_admin_users_file): name -> token
    operator_tokens: dict[str, str] = field(default_factory=dict)

    def option_paths(self, argv: list[str]) -> dict[str, str]:
        """Container paths named by ``--set k=/path`` (and ``confdir``) in argv -> option."""
        out = {}
        for k, v in options(argv).items():
            if v.startswith("/"):
                out[v] = k
        return out

    def build(self, argv: list[str]) -> None:
        wanted = self.option_paths(argv)
        mounts = list(self.pod.container.get("volumeMounts") or [])
        for i, m in enumerate(mounts):  # first where each goes (extra rules may refer to it)
            self.paths[posixpath.normpath(m["mountPath"])] = self.root / f"v{i}-{m['name']}"
        for i, m in enumerate(mounts):
            vol = self.pod.volumes.get(m["name"])
            assert vol is not None, f"volumeMount {m['name']} has no volume"
            mount = posixpath.normpath(m["mountPath"])
            local = self.paths[mount]
            if "emptyDir" in vol or "persistentVolumeClaim" in vol or "ephemeral" in vol:
                # empty and writable at the first start (a PVC's files would be the pod's own)
                assert not m.get("subPath"), f"subPath into {m['name']}"
                local.mkdir(mode=0o777)
                local.chmod(0o777)
                (self.read_only if m.get("readOnly") else self.writable).append(local)
                continue
            files = self.volume_files(vol, mount, wanted)
            src = self.root / f".src-{i}-{m['name']}"
            write_atomic(src, files)
            if m.get("subPath"):
                target = (src / m["subPath"]).resolve()
                assert target.exists(), f"subPath {m['subPath']} is not in volume {m['name']}"
                if target.is_dir():
                    shutil.copytree(target, local)
                else:
                    shutil.copy2(target, local)
            else:
                src.rename(local)
            # ConfigMap, Secret, projected and downwardAPI volumes are always mounted read-only
            self.read_only.append(local)

    # -- ConfigMap / Secret contents --

    def volume_files(self, vol: dict[str, Any], mount: str,
                     wanted: dict[str, str]) -> dict[str, tuple[bytes, int]]:
        files = self.source_volume_files(vol, mount, wanted)
        if self.extra_rules is not None and self.is_rules_mount(mount):
            files.update({k: (v.encode(), 0o444) for k, v in self.extra_rules(self).items()})
        return files

    def source_volume_files(self, vol: dict[str, Any], mount: str,
                            wanted: dict[str, str]) -> dict[str, tuple[bytes, int]]:
        if "configMap" in vol:
            return self.source_files("ConfigMap", vol["configMap"], mount, wanted)
        if "secret" in vol:
            src = dict(vol["secret"])
            src["name"] = src.pop("secretName")
            return self.source_files("Secret", src, mount, wanted)
        if "projected" in vol:
            out: dict[str, tuple[bytes, int]] = {}
            default = vol["projected"].get("defaultMode", 0o644)
            for s in vol["projected"].get("sources") or []:
                for kind in ("configMap", "secret"):
                    if kind in s:
                        ref = {"defaultMode": default, **s[kind]}
                        out.update(self.source_files(kind[0].upper() + kind[1:], ref, mount, wanted))
            return out
        raise AssertionError(f"volume {vol['name']}: kind {sorted(vol)} not laid out by this test")

    def source_files(self, kind: str, ref: dict[str, Any], mount: str,
                     wanted: dict[str, str]) -> dict[str, tuple[bytes, int]]:
        name, default_mode = ref["name"], ref.get("defaultMode", 0o644)
        data = self.object_data(kind, name, ref, mount, wanted)
        if data is None:
            assert ref.get("optional"), f"{kind} {name} is neither rendered nor made by this test"
            return {}
        if ref.get("items") is None:
            return {k: (v, default_mode) for k, v in data.items()}
        out = {}
        for item in ref["items"]:
            assert item["key"] in data or ref.get("optional"), f"{kind} {name} has no key {item['key']!r}"
            if item["key"] in data:
                out[item["path"]] = (data[item["key"]], item.get("mode", default_mode))
        return out

    def is_rules_mount(self, mount: str) -> bool:
        rules = options(container_argv(self.pod)).get("fleetgate_rules", "")
        return rules == mount or rules.startswith(mount + "/")

    def object_data(self, kind: str, name: str, ref: dict[str, Any], mount: str,
                    wanted: dict[str, str]) -> dict[str, bytes] | None:
        obj = self.pod.find(kind, name)
        if obj is not None:
            out = {k: v.encode() for k, v in (obj.get("data") or {}).items()} if kind == "ConfigMap" else {
                k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
            out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
            out.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
            if kind == "Secret":
                # a rendered Secret holds placeholders: the keys are the contract, the values
                # are made here like an operator would
                out = {k: self.secret_value(name, k, mount, wanted, ref) for k in out}
            return out
        if kind != "Secret":
            return None
        # not in the repo (made by the operator): the keys its items name, else the files under
        # its mount that the command line or a rendered ConfigMap (the rules) refer to
        keys = [i["key"] for i in ref.get("items") or []] or self.referenced(mount, wanted)
        assert keys, (f"Secret {name} is not rendered, its volume lists no items and nothing refers to "
                      f"a file under {mount}: the test cannot know which keys it holds")
        return {k: self.secret_value(name, k, mount, wanted, ref) for k in keys}

    def referenced(self, mount: str, wanted: dict[str, str]) -> list[str]:
        texts = list(wanted) + [str(v) for d in self.pod.docs if d.get("kind") == "ConfigMap"
                                for v in (d.get("data") or {}).values()]
        found = {m.group(0).rstrip(".")[len(mount) + 1:] for t in texts for m in ABS_PATH.finditer(t)
                 if m.group(0).startswith(mount + "/")}  # rstrip: a path ending a sentence
        return sorted(f for f in found if f and "/" not in f)

    def secret_value(self, secret: str, key: str, mount: str, wanted: dict[str, str],
                     ref: dict[str, Any]) -> bytes:
        path = next((i["path"] for i in ref.get("items") or [] if i["key"] == key), key)
        file = posixpath.join(mount, path)
        option = wanted.get(file) or wanted.get(mount)
        if option == "confdir":
            assert key in ca_files() or path in ca_files(), (
                f"Secret {secret} key {key!r} is mounted in the confdir, but fleetgate ca init "
                f"makes only {sorted(ca_files())}")
            value = ca_files()[path if path in ca_files() else key]
        elif option == "fleetgate_jwt_secret_file":
            value = (secrets.token_hex(32) + "\n").encode()
        elif option == "fleetgate_admin_token_file":
            value = (secrets.token_urlsafe(24) + "\n").encode()
        elif option == "fleetgate_admin_users_file":
            # as an operator writes it: the SHA-256 of each person's token, never the token
            token = secrets.token_urlsafe(24)
            self.operator_tokens["e2e-oncall"] = token
            value = yaml.safe_dump({"operators": [{
                "name": "e2e-oncall", "groups": ["oncall"],
                "tokenSha256": hashlib.sha256(token.encode()).hexdigest()}]}).encode()
        elif option == "fleetgate_approval_webhook_secret_file":
            value = (secrets.token_hex(32) + "\n").encode()
        elif option == "fleetgate_state_password_file":
            assert self.redis_password, f"{file} is mounted but the command line sets no redis:// state"
            value = (self.redis_password + "\n").encode()
        elif file in self.referenced_by_configmaps():
            value = f"e2e-placeholder-{key}\n".encode()  # e.g. an upstream key the rules inject
        else:
            raise AssertionError(f"Secret {secret} key {key!r} (mounted at {file}) is not used by any "
                                 "option in the command line this test knows how to fill")
        return value

    def referenced_by_configmaps(self) -> set[str]:
        return {m.group(0).rstrip("./") for d in self.pod.docs if d.get("kind") == "ConfigMap"
                for v in (d.get("data") or {}).values() for m in ABS_PATH.finditer(str(v))}

    # -- helpers --

    def local(self, container_path: str) -> Path:
        for mount in sorted(self.paths, key=len, reverse=True):
            if container_path == mount or container_path.startswith(mount + "/"):
                return self.paths[mount] / container_path[len(mount):].lstrip("/")
        raise AssertionError(f"{container_path} is on no volume of the container")

    def snapshot(self) -> dict[str, str]:
        out = {}
        for d in self.read_only:
            for p in sorted(d.rglob("*")):
                key = str(p.relative_to(self.root))
                if p.is_symlink():
                    out[key] = "-> " + os.readlink(p)
                elif p.is_file():
                    out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
                else:
                    out[key] = "dir"
        return out


def write_atomic(d: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """The kubelet's AtomicWriter layout: ``..<ts>/`` with the files, ``..data`` -> it, and a
    symlink ``..data/<first path part>`` per visible entry."""
    d.mkdir(mode=0o777)
    ts = d / "..2026_01_01_00_00_00.000000001"
    ts.mkdir(mode=0o755)
    for rel, (data, mode) in files.items():
        p = ts / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(mode)
    (d / "..data").symlink_to(ts.name)
    for top in sorted({rel.split("/")[0] for rel in files}):
        (d / top).symlink_to(f"..data/{top}")


def options(argv: list[str]) -> dict[str, str]:
    """mitmproxy options in argv: ``--set k=v`` and the listen host/port flags."""
    flags = {"--listen-port": "listen_port", "-p": "listen_port", "--listen-host": "listen_host"}
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--set", *flags) and i + 1 < len(argv):
            if a == "--set":
                k, _, v = argv[i + 1].partition("=")
                out[k] = v
            else:
                out[flags[a]] = argv[i + 1]
            i += 2
            continue
        for prefix in ("--set=", "--listen-port=", "--listen-host="):
            if a.startswith(prefix):
                if prefix == "--set=":
                    k, _, v = a[len(prefix):].partition("=")
                    out[k] = v
                else:
                    out[flags[prefix[:-1]]] = a[len(prefix):]
        i += 1
    return out


# -- the local command line -----------------------------------------------------------------


@dataclass
class Local:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    ports: dict[int, int]  # containerPort -> local port


def localize(pod: Pod, layout: Layout) -> Local:
    argv = container_argv(pod)
    image = pod.stages[-1]
    # the executable: drop an init (tini, dumb-init), then the same name from .venv/bin
    while argv and posixpath.basename(argv[0]) in ("tini", "dumb-init", "catatonit"):
        argv = argv[argv.index("--") + 1:] if "--" in argv else argv[1:]
    assert argv, "the container runs no command"
    exe = posixpath.basename(argv[0])
    image_venv = image.env.get("VIRTUAL_ENV")
    assert image_venv, ("deploy/Dockerfile: the image sets no VIRTUAL_ENV (the venv its wheel is "
                        "installed in, whose bin/ PATH leads to)")
    wheel = wheel_venv()
    local_exe = wheel.bin / exe
    assert local_exe.exists(), f"the container runs {argv[0]}; the image's venv would have no {exe}"
    assert exe in ("mitmdump", "mitmweb", "mitmproxy", "fleetgate") or exe.startswith("python"), (
        f"the container runs {argv[0]}, which this test does not know")

    def map_path(m: re.Match[str]) -> str:
        path = m.group(0)
        for mount in sorted(layout.paths, key=len, reverse=True):
            if path == mount or path.startswith(mount + "/"):
                return str(layout.paths[mount]) + path[len(mount):]
        if path == image_venv or path.startswith(image_venv.rstrip("/") + "/"):
            local = str(wheel.venv) + path[len(image_venv.rstrip("/")):]
            assert Path(local).exists(), f"{path} is not in the installed wheel's venv ({local})"
            return local
        repo_path = dc.image_path_to_repo(pod.stages, path)
        return str(repo_path) if repo_path is not None and repo_path.exists() else path

    def map_paths(s: str) -> str:
        return ABS_PATH.sub(map_path, s)

    ports = {int(p["containerPort"]): free_port() for p in pod.ports}
    out = []
    for i, a in enumerate(argv[1:], 1):
        a = map_paths(a).replace("0.0.0.0", "127.0.0.1")
        for cport, lport in ports.items():
            if a == str(cport) and argv[i - 1].startswith("-"):
                a = str(lport)
            a = re.sub(rf"(?<=[:=]){cport}$", str(lport), a)
        out.append(a)
    for cport in ports:
        assert any(str(cport) in a for a in argv[1:]), (
            f"containerPort {cport} does not appear in the container's command line "
            f"{shlex.join(argv)}: the gateway would listen on a default the test cannot move; "
            "spell the port out in args")

    env = {"PATH": f"{local_exe.parent}:/usr/local/bin:/usr/bin:/bin", "HOME": "/nonexistent",
           "LANG": "C.UTF-8"}
    for k, v in image.env.items():
        if k not in ("PATH", "VIRTUAL_ENV"):
            env[k] = map_paths(v)
    for k, v in k8s_env(pod).items():
        env[k] = map_paths(v)
    if "/tmp" in layout.paths:
        env["TMPDIR"] = str(layout.paths["/tmp"])
    cwd = Path(map_paths(image.workdir)) if Path(map_paths(image.workdir)).is_dir() else layout.root
    return Local([str(local_exe), *out], env, cwd, ports)


# -- isolation ---------------------------------------------------------------------------------


def _mountpoint(p: Path) -> str:
    p = p.resolve()
    while not os.path.ismount(p):
        p = p.parent
    return str(p)


def isolation_prefix(layout: Layout) -> list[str] | None:
    """unshare + a script remounting everything the gateway can see read-only but its emptyDirs."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    ro = sorted({"/", _mountpoint(layout.root), _mountpoint(REPO)})
    lines = ["set -e"]
    lines += [f"mount -o remount,bind,ro {shlex.quote(m)}" for m in ro]
    for d in layout.writable:
        q = shlex.quote(str(d))
        lines += [f"mount --bind {q} {q}", f"mount -o remount,bind,rw {q}"]
    lines.append('exec "$@"')
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    prefix = [unshare, *user, "--mount", "--propagation", "private", "--", "sh", "-c", "\n".join(lines), "sh"]
    check = f"! touch {shlex.quote(str(layout.root))}/.probe 2>/dev/null"
    probe = subprocess.run([*prefix, "sh", "-c", check], capture_output=True, text=True, timeout=30)
    return prefix if probe.returncode == 0 else None


def chmod_read_only(layout: Layout) -> None:
    for d in layout.read_only:
        for p in [d, *d.rglob("*")]:
            if p.is_symlink():
                continue
            p.chmod(0o555 if p.is_dir() else (p.stat().st_mode & 0o444))


# -- the running container ------------------------------------------------------------------


@dataclass
class Container:
    pod: Pod
    layout: Layout
    local: Local
    proc: subprocess.Popen[str] | None = None
    output: list[str] = field(default_factory=list)
    isolated: bool = False
    pump: threading.Thread | None = None

    def start(self, timeout: float = 45.0) -> Container:
        prefix = isolation_prefix(self.layout)
        self.isolated = prefix is not None
        if prefix is None:
            print("notice: no mount namespace here; read-only volumes are chmod 0555/0444 instead")
            chmod_read_only(self.layout)
        self.proc = subprocess.Popen(
            [*(prefix or []), *self.local.argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, cwd=self.local.cwd, env=self.local.env, start_new_session=True)
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                time.sleep(0.3)
                raise AssertionError(f"the gateway exited {self.proc.returncode}:\n{self.text()}")
            with contextlib.suppress(httpx.HTTPError):
                if self.probe("readinessProbe").status_code == 200:
                    return self
            time.sleep(0.1)
        raise AssertionError(f"the gateway did not become ready in {timeout}s:\n{self.text()}")

    def _pump(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            self.output.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.output)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, as the kubelet sends; the exit code, or None if it had to be killed."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                self.close()
                return None
        self.close()
        return self.proc.returncode

    def close(self) -> None:
        if self.pump is not None:
            self.pump.join(5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    # -- addresses --

    def local_port(self, ref: int | str) -> int:
        return self.local.ports[self.pod.port(ref)]

    def probe(self, name: str) -> httpx.Response:
        probe = self.pod.container.get(name)
        assert probe and "httpGet" in probe, f"the container has no httpGet {name}"
        get = probe["httpGet"]
        return httpx.get(f"http://127.0.0.1:{self.local_port(get['port'])}{get.get('path', '/')}",
                         timeout=5)

    @property
    def opts(self) -> dict[str, str]:
        return options(container_argv(self.pod))

    def listen_port(self, option: str) -> int:
        """The local port of a ``host:port`` listen option."""
        value = self.opts.get(option)
        assert value, f"the container's command line sets no {option}"
        return self.local.ports[int(value.rsplit(":", 1)[1])]

    @property
    def proxy_port(self) -> int:
        assert "listen_port" in self.opts, "the container's command line sets no --listen-port"
        return self.local.ports[int(self.opts["listen_port"])]

    def file(self, option: str) -> Path:
        return self.layout.local(self.opts[option])

    def ca_cert(self) -> Path:
        cert = self.layout.root / "gateway-ca-cert.pem"
        cert.write_bytes(ca_files()["mitmproxy-ca-cert.pem"])
        return cert

    def token(self, sub: str, role: str) -> str:
        return mint_token(self.file("fleetgate_jwt_secret_file").read_bytes().strip(), sub, 600,
                          {"agent_role": role})

    def client(self, token: str | None) -> httpx.Client:
        auth = f"agent:{token}@" if token else ""
        return httpx.Client(proxy=f"http://{auth}127.0.0.1:{self.proxy_port}",
                            verify=ssl.create_default_context(cafile=str(self.ca_cert())), timeout=10)


@contextlib.contextmanager
def run_container(overlay: Path | None,
                  extra_rules: Callable[[Layout], dict[str, str]] | None = None) -> Iterator[Container]:
    if overlay is None:
        pytest.fail(f"no overlay under {OVERLAYS_DIR.relative_to(REPO)} (issue #8 requires deploy/)")
    pod = gateway_pod(overlay)
    root = Path(tempfile.mkdtemp(prefix=f"fleetgate-pod-{overlay.name}-"))
    root.chmod(0o755)
    layout = Layout(pod, root, extra_rules=extra_rules)
    c = None
    redis: RedisServer | None = None
    try:
        argv = container_argv(pod)
        state = options(argv).get("fleetgate_state", "")
        if state:
            redis = RedisServer(root / "redis-server", password=secrets.token_hex(16)).start()
            layout.redis_password = redis.password
        layout.build(argv)
        local = localize(pod, layout)
        if redis is not None:
            local.argv = [redis_local(pod, a, redis) for a in local.argv]
        c = Container(pod, layout, local)
        before = layout.snapshot()
        c.start()
        yield c
        code = c.stop()
        grace = pod.pod.get("terminationGracePeriodSeconds", 30)
        assert code is not None, f"the gateway ignored SIGTERM for 10 s (grace period {grace} s)"
        after = layout.snapshot()
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, f"the gateway changed read-only volumes: {changed}"
    finally:
        if c is not None:
            c.stop()
            print(f"--- gateway output ({overlay.name}) ---\n{c.text()}")
        if redis is not None:
            redis.stop()
        for p in [root, *root.rglob("*")]:
            if not p.is_symlink() and p.is_dir():
                with contextlib.suppress(OSError):
                    p.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)


def redis_local(pod: Pod, arg: str, redis: RedisServer) -> str:
    """``fleetgate_state=redis://<service>:<port>/db`` -> the local server, once the Service is
    checked: rendered, with that port, selecting the pods of a rendered Redis workload."""
    if not arg.startswith("fleetgate_state="):
        return arg
    url = urlsplit(arg.partition("=")[2])
    assert url.scheme in ("redis", "rediss") and url.hostname, f"fleetgate_state {url.geturl()!r}"
    assert url.password is None, "the Redis password belongs in fleetgate_state_password_file, not args"
    service = pod.find("Service", url.hostname.split(".")[0])
    assert service is not None, f"fleetgate_state names {url.hostname}, which no rendered Service is"
    assert any(p.get("port") == (url.port or 6379) for p in service["spec"].get("ports") or []), (
        f"Service {url.hostname} has no port {url.port or 6379}")
    selector = service["spec"].get("selector") or {}
    workloads = [d for d in pod.docs if d.get("kind") in ("StatefulSet", "Deployment")
                 and selector and selector.items() <= (d["spec"]["template"]["metadata"].get("labels")
                                                       or {}).items()]
    assert workloads, f"Service {url.hostname} selects no rendered StatefulSet/Deployment"
    return "fleetgate_state=" + url._replace(scheme="redis",
                                             netloc=f"127.0.0.1:{redis.port}").geturl()


def example_role(c: Container) -> str:
    """A role the ConfigMap's rules define a profile for (``jwt.agent_role == "x"``)."""
    rules_dir = c.layout.local(c.opts["fleetgate_rules"])
    files = [rules_dir] if rules_dir.is_file() else sorted(rules_dir.glob("*.yaml"))
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            for agent in (doc or {}).get("agents") or []:
                m = re.fullmatch(r"""\s*(?:has\(jwt\.agent_role\)\s*&&\s*)?"""
                                 r"""jwt\.agent_role\s*==\s*["'](\w[\w.-]*)["']\s*""",
                                 agent.get("match", ""))
                if m:
                    return m.group(1)
    raise AssertionError(f"no agent profile selecting jwt.agent_role == '...' in {rules_dir}")


# -- tests -------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("overlay", _overlays())
def test_container_command_line(overlay: Path | None, upstream: Upstream) -> None:
    with run_container(overlay) as c:
        # the probes the kubelet would send
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in c.pod.container:
                r = c.probe(probe)
                assert r.status_code == 200, f"{probe}: {r.status_code} {r.text}"
        assert c.probe("readinessProbe").json()["ready"] is True
        # every containerPort is listened on (nothing declared that the gateway does not serve)
        for lport in c.local.ports.values():
            with socket.create_connection(("127.0.0.1", lport), 5):
                pass

        role = example_role(c)
        tok = c.token("e2e-agent", role)
        with c.client(tok) as agent:
            # the mounted CA signs what the agent sees; the mounted JWT secret verifies it
            me = agent.get("https://fleetgate.internal/v1/whoami")
            assert me.status_code == 200, me.text
            assert me.json()["agent"] == "e2e-agent" and me.json()["role"] == role
            # the example rules do not let it reach a loopback upstream: denied by the gateway
            r = agent.get(upstream.url + "/from-example-role")
            assert r.status_code == 403, r.text
            assert r.json()["fleetgate"]["rule"] in ("destinations.private", "egress", "default-deny"), r.text
            assert upstream.paths() == []
        # no credentials: 407 on the CONNECT
        with c.client(None) as anon, pytest.raises(httpx.ProxyError, match="407"):
            anon.get(upstream.url + "/anonymous")

        # the admin API, on its own port, with the token from the mounted file only
        admin = f"http://127.0.0.1:{c.listen_port('fleetgate_admin_listen')}"
        admin_token = c.file("fleetgate_admin_token_file").read_text().strip()
        assert httpx.get(admin + "/v1/status", timeout=5).status_code in (401, 403)
        assert httpx.get(admin + "/v1/status", headers={"Authorization": "Bearer wrong-token-0123456789"},
                         timeout=5).status_code in (401, 403)
        ok = httpx.get(admin + "/v1/status", headers={"Authorization": f"Bearer {admin_token}"}, timeout=5)
        assert ok.status_code == 200, ok.text
        if "fleetgate_admin_users_file" in c.opts:  # components/approvals
            operators(c, admin)
        # a stop through it is written to the state volume and refuses the agent at once
        r = httpx.post(admin + "/v1/actions", headers={"Authorization": f"Bearer {admin_token}"},
                       json={"verb": "stop", "scope": {"kind": "agent", "value": "e2e-agent"},
                             "reason": "container e2e"}, timeout=10)
        assert r.status_code == 200 and not r.json().get("error"), r.text
        with c.client(tok) as agent:
            r = agent.get("https://fleetgate.internal/v1/whoami")
            assert r.status_code == 503 and r.json()["fleetgate"]["rule"] == "killswitch.stop", r.text

        if "fleetgate_state" in c.opts:  # shared state: the stop is in Redis, for every replica
            assert c.layout.redis_password
            port = int(next(a for a in c.local.argv if a.startswith("fleetgate_state="))
                       .rsplit(":", 1)[1].split("/")[0])
            with redis_lib.Redis(port=port, password=c.layout.redis_password) as r:
                found = [k for k in r.scan_iter(match="*kill*") if b"e2e-agent" in
                         b"".join(str(v).encode() for v in _redis_values(r, k))]
            assert found, "the stop was not written to Redis"
        else:
            state = c.layout.local(c.opts["fleetgate_state_dir"])
            assert (state / "killswitch.sqlite").is_file() and (state / "budgets.sqlite").is_file(), \
                sorted(p.name for p in state.iterdir())
        print(f"isolated (read-only root file system): {c.isolated}")


def operators(c: Container, admin: str) -> None:
    """The mounted operators file is honoured: a person's token from it authenticates at the
    admin API and signs in to the console as that person; an unknown token does neither."""
    assert c.layout.operator_tokens, "fleetgate_admin_users_file is set but no operators file was made"
    name, token = next(iter(c.layout.operator_tokens.items()))
    r = httpx.get(admin + "/v1/approvals", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert r.status_code == 200, r.text
    r = httpx.get(admin + "/v1/approvals", headers={"Authorization": "Bearer unknown-token-0123456789"},
                  timeout=5)
    assert r.status_code == 401, r.text
    with httpx.Client(base_url=admin, timeout=5, follow_redirects=True) as browser:
        assert browser.post("/console/login", data={"token": "unknown-token-0123456789"}).status_code == 401
        page = browser.post("/console/login", data={"token": token})
        assert page.status_code == 200 and name in page.text, page.text[:500]


def _redis_values(r: redis_lib.Redis, key: bytes) -> list[object]:
    kind = r.type(key)
    if kind == b"hash":
        return list(r.hgetall(key).items())
    if kind == b"stream":
        return list(r.xrange(key))
    if kind == b"string":
        return [r.get(key)]
    if kind == b"set":
        return list(r.smembers(key))
    if kind == b"zset":
        return list(r.zrange(key, 0, -1))
    if kind == b"list":
        return list(r.lrange(key, 0, -1))
    return []


UPSTREAM_RULES = """apiVersion: fleetgate/v1
# NOT in the ConfigMap: added to the rules volume by tests/e2e/test_container_command.py so a
# request can reach the test's loopback upstream.
destinations:
  allowPrivate: ["127.0.0.1/32"]
agents:
- name: e2e-container-test
  match: 'jwt.agent_role == "e2e-container-test"'
  egress:
    hosts: ["127.0.0.1:{port}"]
  authorization:
    rules:
    - id: e2e-container-test.get
      allow: 'request.method == "GET"'
"""

CREDENTIAL_RULE = """credentials:
- id: e2e-container-test
  hosts: ["127.0.0.1"]
  ports: [{port}]
  header: x-e2e-upstream-key
  value: "{{secret}}"
  secretFile: {file}
"""


def credential_files(layout: Layout) -> list[str]:
    """Container paths of Secret files that the rendered rules read (credentials' secretFile)."""
    secret_mounts = [m["mountPath"] for m in layout.pod.container.get("volumeMounts") or []
                     if "secret" in layout.pod.volumes[m["name"]]
                     or any("secret" in src for src in
                            layout.pod.volumes[m["name"]].get("projected", {}).get("sources", []))]
    return sorted(p for p in layout.referenced_by_configmaps()
                  if any(p.startswith(m.rstrip("/") + "/") for m in secret_mounts))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overlay", _overlays())
def test_container_forwards_allowed_request(overlay: Path | None, plain_upstream: Upstream) -> None:
    def extra(layout: Layout) -> dict[str, str]:
        text = UPSTREAM_RULES.replace("{port}", str(plain_upstream.port))
        creds = credential_files(layout)
        if creds:  # the gateway's key for the upstream, from the mounted credentials Secret
            text += CREDENTIAL_RULE.format(port=plain_upstream.port, file=layout.local(creds[0]))
        return {"zz-e2e-container-test.yaml": text}

    with run_container(overlay, extra_rules=extra) as c, \
            c.client(c.token("e2e-forward", "e2e-container-test")) as agent:
        # by address: the container's command line names no fleetgate_resolve for test names
        r = agent.get(plain_upstream.ip_url + "/through-the-container")
        assert r.status_code == 200, r.text
        assert r.headers.get("x-fleetgate-decision-id")
        assert plain_upstream.paths() == ["/through-the-container"]
        seen = plain_upstream.seen[0].headers
        assert "proxy-authorization" not in seen  # the agent's credential is not forwarded
        creds = credential_files(c.layout)
        if creds:
            key = c.layout.local(creds[0]).read_text().strip()
            assert seen.get("x-e2e-upstream-key") == key, seen
        # the fleet-wide deny rules of the ConfigMap apply to this profile too
        assert agent.get(plain_upstream.ip_url + "/delete-everything").status_code == 403


def test_overlays_exist() -> None:
    assert (REPO / "deploy" / "Dockerfile").is_file(), "deploy/Dockerfile is missing"
    assert [p for p in _overlays() if p.values[0] is not None], "no overlay under deploy/kubernetes/overlays"
