"""The security requirements of issue #8, asserted on the rendered manifests.

Every kustomization under ``deploy/kubernetes`` is rendered by the same pinned kustomize as
``make deploy-check`` (``scripts/deploy_check.py``); these are cheap structural checks on
what would be applied: the gateway runs as uid 10001 with a read-only root file system and
no capabilities, its probes hit the real health endpoints, the admin port is reachable only
from the operators' namespaces, agents may reach only the gateway and DNS, the mounted files
are readable by the gateway's user, and no key of any kind is in the repository.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import secrets
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import deploy_check as dc  # scripts/ (pytest pythonpath): the same rendering CI checks
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UID = 10001




def _builds() -> list[Any]:
    try:
        builds, _ = dc.kustomization_dirs()
    except dc.CheckError as e:
        return [pytest.param(None, id=f"missing: {e}")]
    return [pytest.param(d, id=dc.rel(d).removeprefix("deploy/kubernetes/")) for d in builds]


BUILDS = _builds()
# the kustomizations that deploy the gateway: the base and every overlay (not agents/)
GATEWAY_BUILDS = [b for b in BUILDS if b.values[0] is None or dc.rel(b.values[0]) == "deploy/kubernetes/base"
                  or "/overlays/" in dc.rel(b.values[0])] or [pytest.param(None, id="no-gateway")]


def render(d: Path | None) -> list[dict[str, Any]]:
    if d is None:
        pytest.fail("deploy/kubernetes has no kustomization (issue #8 requires it)")
    try:
        return dc.render(d)
    except dc.CheckError as e:
        pytest.fail(str(e))


def gateway(d: Path | None, docs: list[dict[str, Any]] | None = None,
            ) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    found = dc.gateway_containers(render(d) if docs is None else docs)
    assert found, f"{dc.rel(d) if d else d} renders no Deployment running the fleetgate image"
    return found


def options(argv: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, a in enumerate(argv):
        if a == "--set" and i + 1 < len(argv):
            k, _, v = argv[i + 1].partition("=")
            out[k] = v
        elif a.startswith("--set="):
            k, _, v = a[len("--set="):].partition("=")
            out[k] = v
        elif a in ("--listen-port", "-p") and i + 1 < len(argv):
            out["listen_port"] = argv[i + 1]
        elif a.startswith("--listen-port="):
            out["listen_port"] = a.partition("=")[2]
        elif a == "--web-port" and i + 1 < len(argv):
            out["web_port"] = argv[i + 1]
    return out


def image() -> Any:
    return dc.parse_dockerfile(DEPLOY / "Dockerfile")[-1]


def argv_of(container: dict[str, Any]) -> list[str]:
    img = image()
    if container.get("command") is not None:
        return [*container["command"], *(container.get("args") or [])]
    return [*(img.entrypoint or []), *(container.get("args") or img.cmd or [])]  # [] is unset


def port_number(container: dict[str, Any], ref: int | str) -> int:
    if isinstance(ref, int):
        return ref
    for p in container.get("ports") or []:
        if p.get("name") == ref:
            return int(p["containerPort"])
    raise AssertionError(f"port {ref!r} is not a containerPort of {container['name']}")


def listen_port(container: dict[str, Any], option: str) -> int:
    value = options(argv_of(container)).get(option)
    assert value, f"{option} is not set on the command line"
    return int(value.rsplit(":", 1)[1])


# -- the image ------------------------------------------------------------------------------


def test_image_runs_as_uid_10001_in_exec_form() -> None:
    img = image()
    assert img.user is not None and img.user.split(":")[0] == str(UID), (
        f"deploy/Dockerfile: USER {img.user}; a numeric {UID} lets runAsNonRoot verify it")
    assert img.entrypoint and img.entrypoint[:2] != ["/bin/sh", "-c"], "ENTRYPOINT: use the exec (JSON) form"
    assert "mitmdump" in img.entrypoint[0] and any(a.endswith("/gateway.py") for a in img.entrypoint)


def _packaged_script(img: Any) -> str:
    """The image's path of the script the wheel ships: <VIRTUAL_ENV>/lib/pythonX.Y/site-packages/
    fleetgate/script/gateway.py, X.Y the Python of the base image's tag."""
    import fleetgate

    venv = img.env.get("VIRTUAL_ENV")
    assert venv, "deploy/Dockerfile: the image sets no VIRTUAL_ENV (the venv its wheel is installed in)"
    assert img.env.get("PATH", "").startswith(f"{venv}/bin:"), img.env.get("PATH")
    m = re.fullmatch(r"python:(\d+\.\d+)[\w.-]*(?:@sha256:[0-9a-f]{64})?", img.base)
    assert m, f"deploy/Dockerfile: base image {img.base!r} is not python:X.Y-... (the venv's Python)"
    package = Path(fleetgate.__file__).resolve().parent
    inside = fleetgate.script_path().relative_to(package.parent).as_posix()
    return f"{venv}/lib/python{m.group(1)}/site-packages/{inside}"


def test_image_runs_the_script_the_wheel_ships() -> None:
    """ENTRYPOINT is mitmdump -s <the packaged script>, inside the venv the builder installed
    the wheel into; the builder checks the same path against ``fleetgate script-path``."""
    img = image()
    assert img.entrypoint is not None
    script = _packaged_script(img)
    assert img.entrypoint == ["mitmdump", "-s", script], img.entrypoint
    text = (DEPLOY / "Dockerfile").read_text()
    check = r'test "\$\(/opt/venv/bin/fleetgate script-path\)" = \\\n\s*' + re.escape(script)
    assert re.search(check, text), "the builder no longer checks the ENTRYPOINT's script against script-path"
    assert any(c[0] == img.env["VIRTUAL_ENV"] and c[1].startswith("stage:") for c in img.copies), img.copies


@pytest.mark.parametrize("build", GATEWAY_BUILDS)
def test_overlay_commands_load_the_same_script(build: Path | None) -> None:
    """An overlay that replaces the command (mitmweb) loads the script the ENTRYPOINT loads."""
    script = _packaged_script(image())
    for _dep, _pod, c in gateway(build):
        argv = argv_of(c)
        scripts = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-s"]
        assert scripts == [script], f"{c['name']}: {argv[:3]}"


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    """Every COPY from the build context is admitted by deploy/Dockerfile.dockerignore, and the
    image's version label is pyproject's version (the one place it is written)."""
    import tomllib

    ignore = [ln.strip() for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    admitted = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    assert ignore[0] == "*", "the context filter must start by excluding everything"
    sources = {src for st in dc.parse_dockerfile(DEPLOY / "Dockerfile") for _dest, src in st.copies
               if not src.startswith("stage:")}
    for src in sources:
        src = src.rstrip("/")
        assert src in admitted or any(src.startswith(a + "/") for a in admitted), (
            f"COPY {src}: not sent in the build context (deploy/Dockerfile.dockerignore)")
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    assert "uv.lock" in sources and "deploy/constraints.txt" not in sources
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert f'org.opencontainers.image.version="{version}"' in (DEPLOY / "Dockerfile").read_text()


# -- the gateway's pod -------------------------------------------------------------------------


def _effective(pod: dict[str, Any], container: dict[str, Any], key: str) -> Any:
    csc, psc = container.get("securityContext") or {}, pod.get("securityContext") or {}
    return csc.get(key, psc.get(key))


@pytest.mark.parametrize("build", GATEWAY_BUILDS)
def test_gateway_pod_security(build: Path | None) -> None:
    found = gateway(build)
    for dep, pod, c in found:
        where = f"{dep['metadata']['name']}/{c['name']}"
        csc = c.get("securityContext") or {}
        expected = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID}
        for key, want in expected.items():
            assert _effective(pod, c, key) == want, f"{where}: securityContext.{key} is not {want}"
        for key, want in {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False}.items():
            assert csc.get(key) is want, f"{where}: container securityContext.{key} is not {want}"
        assert not csc.get("privileged"), f"{where}: privileged"
        caps = csc.get("capabilities") or {}
        assert "ALL" in caps.get("drop", []) and not caps.get("add"), f"{where}: capabilities {caps}"
        seccomp = (_effective(pod, c, "seccompProfile") or {}).get("type")
        assert seccomp in ("RuntimeDefault", "Localhost"), f"{where}: seccompProfile {seccomp}"
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(key), f"{where}: {key}"
        assert pod.get("automountServiceAccountToken") is False, f"{where}: the gateway needs no API token"
        res = c.get("resources") or {}
        assert res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory"), where
        tag = str(c.get("image", "")).split("@")[0].rpartition(":")[2]
        assert "@sha256:" in str(c.get("image")) or (tag and tag != "latest" and "/" not in tag), (
            f"{where}: image {c.get('image')!r} must name a tag other than latest (or a digest)")


@pytest.mark.parametrize("build", GATEWAY_BUILDS)
def test_gateway_probes_and_ports(build: Path | None) -> None:
    docs = render(build)
    found = gateway(build, docs)
    for dep, _pod, c in found:
        metrics = listen_port(c, "fleetgate_metrics_listen")
        ready, live = c.get("readinessProbe", {}).get("httpGet"), c.get("livenessProbe", {}).get("httpGet")
        assert ready and ready.get("path") == "/healthz/ready", c.get("readinessProbe")
        assert live and live.get("path") == "/healthz/live", c.get("livenessProbe")
        assert port_number(c, ready["port"]) == metrics and port_number(c, live["port"]) == metrics
        if "startupProbe" in c:
            start = c["startupProbe"]["httpGet"]
            assert start["path"] in ("/healthz/live", "/healthz/ready")
            assert port_number(c, start["port"]) == metrics
        # every declared containerPort is one the command line listens on, and vice versa
        declared = {int(p["containerPort"]) for p in c.get("ports") or []}
        opts = options(argv_of(c))
        listened = {int(opts.get("listen_port", "8080")), metrics, listen_port(c, "fleetgate_admin_listen")}
        if "mitmweb" in argv_of(c)[0]:
            listened.add(int(opts.get("web_port", "8081")))
        assert declared == listened, (declared, listened)
        # Services that select the gateway point at its ports
        labels = dep["spec"]["template"]["metadata"].get("labels") or {}
        for svc in (d for d in docs if d.get("kind") == "Service"):
            sel = svc["spec"].get("selector") or {}
            if sel and all(labels.get(k) == v for k, v in sel.items()):
                for p in svc["spec"]["ports"]:
                    port_number(c, p.get("targetPort", p["port"]))


@pytest.mark.parametrize("build", GATEWAY_BUILDS)
def test_gateway_mounts(build: Path | None) -> None:
    """Every path on the command line is on a volume or in the image, written paths on a
    writable volume, and every mounted ConfigMap/Secret file readable by uid 10001."""
    found = gateway(build)
    stages = dc.parse_dockerfile(DEPLOY / "Dockerfile")
    for _dep, pod, c in found:
        mounts = {m["mountPath"].rstrip("/"): m for m in c.get("volumeMounts") or []}
        volumes = {v["name"]: v for v in pod.get("volumes") or []}

        def mount_of(path: str, mounts: dict[str, Any] = mounts) -> dict[str, Any] | None:
            best = [m for m in mounts if path == m or path.startswith(m + "/")]
            return mounts[max(best, key=len)] if best else None

        for option, value in options(argv_of(c)).items():
            if not value.startswith("/"):
                continue
            m = mount_of(value)
            if m is None:
                assert dc.image_path_to_repo(stages, value) is not None, (
                    f"{option}={value} is neither on a volume nor in the image")
                continue
            vol = volumes[m["name"]]
            if option in ("fleetgate_state_dir", "fleetgate_mcp_pins"):
                assert ("emptyDir" in vol or "persistentVolumeClaim" in vol) and not m.get("readOnly"), (
                    f"{option}={value}: the gateway writes there; {m['name']} is not writable")
        fs_group = (pod.get("securityContext") or {}).get("fsGroup")
        for m in c.get("volumeMounts") or []:
            vol = volumes[m["name"]]
            kind = next((k for k in ("configMap", "secret", "projected") if k in vol), None)
            if kind is None:
                continue
            default = vol[kind].get("defaultMode", 0o644)
            modes = [default]
            sources = vol[kind].get("sources", []) if kind == "projected" else [vol[kind]]
            for src in sources:
                for item in (src.get("configMap") or src.get("secret") or src).get("items") or []:
                    modes.append(item.get("mode", default))
            # the kubelet gives the files to group fsGroup with g+r; without it they stay root's
            readable = fs_group == UID or all(mode & 0o004 for mode in modes)
            assert readable, f"volume {m['name']}: modes {[oct(x) for x in modes]} with fsGroup {fs_group}"


def test_base_args_are_the_image_cmd() -> None:
    """deploy/Dockerfile: "The Deployment's args repeat CMD exactly" (the base; overlays patch)."""
    for _dep, _pod, c in gateway(DEPLOY / "kubernetes" / "base"):
        assert c.get("command") is None, "the base keeps the image's ENTRYPOINT"
        assert c.get("args") == image().cmd


def test_rules_configmap_is_the_repository_rules() -> None:
    """The base's ConfigMaps hold every rules/*.yaml and every KILLSWITCH.md the rules name,
    byte for byte (deploy/kubernetes/base keeps copies: kustomize reads nothing outside it)."""
    configmaps = [d for d in render(DEPLOY / "kubernetes" / "base") if d.get("kind") == "ConfigMap"]
    values = {k: v for cm in configmaps for k, v in (cm.get("data") or {}).items()}
    wanted = {f.name: f for f in sorted((REPO / "rules").glob("*.yaml")) if f.name != "kustomization.yaml"}
    for f in list(wanted.values()):
        for doc in yaml.safe_load_all(f.read_text()):
            for ks in ((doc or {}).get("killswitch") or {}).get("files") or []:
                wanted[ks] = REPO / "rules" / ks
    for name, f in wanted.items():
        text = f.read_text()
        assert text in values.values(), (
            f"rules/{f.relative_to(REPO / 'rules')} is not in any base ConfigMap as it is in the repository "
            f"(keys: {sorted(values)}); run deploy/kubernetes/sync-rules.sh")
        if name.endswith(".yaml"):
            assert values.get(name) == text, f"ConfigMap key {name} differs from rules/{name}"


@pytest.mark.parametrize("build", GATEWAY_BUILDS)
def test_credential_files_are_mounted_secrets(build: Path | None) -> None:
    """Every credentials secretFile in the rules ConfigMap is a file of a Secret volume of the
    gateway (and a key of that Secret where it is rendered): the e2e test cannot see these
    paths, which the rules name as they are inside the container."""
    docs = render(build)
    found = gateway(build, docs)
    _dep, pod, c = found[0]
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    files = []
    for cm in (d for d in docs if d.get("kind") == "ConfigMap"):
        for key, text in (cm.get("data") or {}).items():
            if not key.endswith((".yaml", ".yml")):
                continue
            for doc in yaml.safe_load_all(text):
                if isinstance(doc, dict) and doc.get("apiVersion") == "fleetgate/v1":
                    files += [r["secretFile"] for r in doc.get("credentials") or [] if "secretFile" in r]
    for path in files:
        mounts = [m for m in c.get("volumeMounts") or [] if path.startswith(m["mountPath"].rstrip("/") + "/")]
        assert mounts, f"secretFile {path} is on no volume of the gateway"
        m = max(mounts, key=lambda m: len(m["mountPath"]))
        vol = volumes[m["name"]]
        rel = path[len(m["mountPath"].rstrip("/")) + 1:]
        refs = [vol["secret"] | {"name": vol["secret"]["secretName"]}] if "secret" in vol else [
            src["secret"] for src in vol.get("projected", {}).get("sources", []) if "secret" in src]
        assert refs, f"secretFile {path} is on volume {m['name']}, which is no Secret"
        provided = set()
        for ref in refs:
            secret = next((d for d in docs if d.get("kind") == "Secret"
                           and d["metadata"]["name"] == ref["name"]), None)
            if ref.get("items"):
                provided |= {i["path"] for i in ref["items"]}
            elif secret is not None:
                provided |= set(secret.get("data") or {}) | set(secret.get("stringData") or {})
            else:
                provided.add(rel)  # made by the operator (deploy/README.md lists its keys)
        assert rel in provided, f"secretFile {path}: volume {m['name']} provides {sorted(provided)}"


# -- network -------------------------------------------------------------------------------------


def _selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return False
    ok = all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())
    for expr in selector.get("matchExpressions") or []:
        v = labels.get(expr["key"])
        op = expr["operator"]
        ok &= {"In": v in expr.get("values", []), "NotIn": v not in expr.get("values", []),
               "Exists": v is not None, "DoesNotExist": v is None}[op]
    return ok


def _covers(rule: dict[str, Any], port: int, names: dict[str, int]) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    for p in ports:
        if "port" not in p:
            return True
        n = names.get(p["port"], p["port"]) if isinstance(p["port"], str) else p["port"]
        if n == port or (p.get("endPort") and n <= port <= p["endPort"]):
            return True
    return False


@pytest.mark.parametrize("build", GATEWAY_BUILDS)
def test_gateway_ingress(build: Path | None) -> None:
    """The gateway's pods are under an Ingress policy; the admin port is open only to the
    operators' namespaces, the proxy port only to namespaces (the agents'), never to an IP block."""
    docs = render(build)
    found = gateway(build, docs)
    for dep, _pod, c in found:
        labels = dep["spec"]["template"]["metadata"].get("labels") or {}
        policies = [d for d in docs if d.get("kind") == "NetworkPolicy"
                    and "Ingress" in (d["spec"].get("policyTypes") or ["Ingress"])
                    and _selects(d["spec"].get("podSelector"), labels)]
        assert policies, "no NetworkPolicy restricts ingress to the gateway"
        names = {p["name"]: int(p["containerPort"]) for p in c.get("ports") or [] if p.get("name")}
        admin = listen_port(c, "fleetgate_admin_listen")
        proxy = int(options(argv_of(c)).get("listen_port", "8080"))
        for pol in policies:
            for rule in pol["spec"].get("ingress") or []:
                peers = rule.get("from")
                for port, who in ((admin, "operator"), (proxy, "agent")):
                    if not _covers(rule, port, names):
                        continue
                    assert peers, f"{pol['metadata']['name']}: port {port} open to every source"
                    for peer in peers:
                        assert "ipBlock" not in peer, f"{pol['metadata']['name']}: port {port} open to {peer}"
                        ns = peer.get("namespaceSelector")
                        keys = " ".join(f"{k}={v}" for k, v in ((ns or {}).get("matchLabels") or {}).items())
                        assert ns is not None and who in keys, (
                            f"{pol['metadata']['name']}: port {port} open to {peer}, not only {who}s")


def test_agents_reach_only_the_gateway_and_dns() -> None:
    """An egress policy for agent pods: every rule goes to the gateway's pods on its proxy port
    or to cluster DNS on port 53; nothing to an IP block, nothing unrestricted."""
    agents = DEPLOY / "kubernetes" / "agents"
    if not agents.is_dir():
        pytest.fail("deploy/kubernetes/agents is missing (the agents' NetworkPolicy)")
    docs = render(agents)
    egress = [d for d in docs if d.get("kind") == "NetworkPolicy"
              and "Egress" in (d["spec"].get("policyTypes") or [])]
    assert egress, "deploy/kubernetes/agents has no egress NetworkPolicy"
    base = render(DEPLOY / "kubernetes" / "base")
    gw = dc.gateway_containers(base)
    assert gw
    gw_labels = gw[0][0]["spec"]["template"]["metadata"]["labels"]
    gw_ns = gw[0][0]["metadata"].get("namespace")
    proxy = int(options(argv_of(gw[0][2])).get("listen_port", "8080"))
    for pol in egress:
        name = pol["metadata"]["name"]
        for rule in pol["spec"].get("egress") or []:
            peers, ports = rule.get("to"), rule.get("ports")
            assert peers and ports, f"{name}: an egress rule without 'to' or 'ports' allows too much"
            numbers = {p.get("port") for p in ports}
            for peer in peers:
                assert "ipBlock" not in peer, f"{name}: egress to an IP block {peer}"
                pods = peer.get("podSelector")
                ns = (peer.get("namespaceSelector") or {}).get("matchLabels") or {}
                to_gateway = _selects(pods, gw_labels) and (
                    gw_ns is None or ns.get("kubernetes.io/metadata.name") == gw_ns)
                to_dns = (pods or {}).get("matchLabels", {}).get("k8s-app") == "kube-dns"
                assert to_gateway or to_dns, f"{name}: egress to {peer}"
                if to_gateway:
                    assert numbers <= {proxy, "proxy"}, f"{name}: gateway ports {numbers}"
                else:
                    assert numbers <= {53}, f"{name}: DNS ports {numbers}"


# -- no keys in the repository ---------------------------------------------------------------------

KEY_PATTERNS = {
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "Anthropic key": re.compile(r"sk-ant-[A-Za-z0-9_-]{20,}"),
    "OpenAI key": re.compile(r"\bsk-(?:proj-)?[A-Za-z0-9_-]{32,}"),
    "xAI key": re.compile(r"\bxai-[A-Za-z0-9]{32,}"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}"),
    "AWS access key": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "JWT": re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\."),
}


def _findings(text: str) -> list[str]:
    return [name for name, pat in KEY_PATTERNS.items() if pat.search(text)]


def test_no_keys_in_deploy_files() -> None:
    assert DEPLOY.is_dir(), "deploy/ is missing"
    bad = {}
    for f in sorted(DEPLOY.rglob("*")):
        if f.is_file():
            found = _findings(f.read_text(errors="replace"))
            if found:
                bad[dc.rel(f)] = found
    assert not bad, f"keys in the repository: {bad}"


@pytest.mark.parametrize("build", BUILDS)
def test_no_keys_in_rendered_secrets(build: Path | None) -> None:
    for doc in render(build):
        if doc.get("kind") != "Secret":
            continue
        values = [base64.b64decode(v).decode(errors="replace") for v in (doc.get("data") or {}).values()]
        values += [str(v) for v in (doc.get("stringData") or {}).values()]
        for v in values:
            assert not _findings(v), f"Secret {doc['metadata']['name']}: {_findings(v)}"
            if "CERTIFICATE" in v:
                continue
            # a long random-looking value is a real key, whatever its format: placeholders must say so
            obvious = re.search(r"(?i)placeholder|example|change|replace|fake|dummy|not-a", v)
            if len(v.strip()) >= 24 and not obvious:
                assert len(set(v.strip())) < 16, (
                    f"Secret {doc['metadata']['name']}: a value looks like a real key; make it an obvious "
                    "placeholder (say 'placeholder')")


def test_ip_blocks_parse() -> None:
    """Every ipBlock CIDR (and except entry) is a valid network (kubernetes-validate takes strings)."""
    seen = 0
    for b in BUILDS:
        if b.values[0] is None:
            continue
        for doc in render(b.values[0]):
            if doc.get("kind") != "NetworkPolicy":
                continue
            for direction in ("ingress", "egress"):
                for rule in doc["spec"].get(direction) or []:
                    for peer in rule.get("from", []) + rule.get("to", []):
                        if "ipBlock" in peer:
                            net = ipaddress.ip_network(peer["ipBlock"]["cidr"])
                            for cidr in peer["ipBlock"].get("except", []):
                                sub = ipaddress.ip_network(cidr)
                                assert sub.version == net.version and sub.subnet_of(net), cidr
                            seen += 1
    assert seen >= 2  # the gateway's internet egress, IPv4 and IPv6


# -- replicated: three gateways sharing state in Redis (issue 17) ------------------------------

REPLICATED = DEPLOY / "kubernetes" / "overlays" / "replicated"


def _replicated() -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(documents, gateway Deployment, its pod spec, its container) of overlays/replicated."""
    assert REPLICATED.is_dir(), "deploy/kubernetes/overlays/replicated is missing"
    docs = render(REPLICATED)
    found = gateway(REPLICATED, docs)
    assert len(found) == 1, [(d["metadata"]["name"], c["name"]) for d, _p, c in found]
    dep, pod, c = found[0]
    return docs, dep, pod, c


def _pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"].get("labels") or {})


def _redis(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Redis StatefulSet the gateway's fleetgate_state URL names (through its Service)."""
    _dep, _pod, c = dc.gateway_containers(docs)[0]
    url = urlsplit(options(argv_of(c))["fleetgate_state"])
    svc = next((d for d in docs if d.get("kind") == "Service" and d["metadata"]["name"] == url.hostname),
               None)
    assert svc is not None, f"fleetgate_state names {url.hostname!r}, which is no rendered Service"
    sets = [d for d in docs if d.get("kind") == "StatefulSet"
            and _selects({"matchLabels": svc["spec"]["selector"]}, _pod_labels(d))]
    assert len(sets) == 1, f"Service {url.hostname} selects {len(sets)} StatefulSets"
    ss = sets[0]
    redis = ss["spec"]["template"]["spec"]["containers"][0]
    port = next(p for p in svc["spec"]["ports"] if p["port"] == (url.port or 6379))
    target = port.get("targetPort", port["port"])
    assert port_number(redis, target) == 6379, f"Service {url.hostname} port {port} is not Redis's 6379"
    return ss, redis


def test_replicated_runs_three_gateways_without_a_shared_volume() -> None:
    """3 replicas, surge-first rollouts, spread over nodes; no ReadWriteOnce claim in the pod
    (three pods cannot share one; the state is in Redis)."""
    docs, dep, pod, _c = _replicated()
    assert dep["spec"]["replicas"] == 3
    strategy = dep["spec"].get("strategy") or {}
    assert strategy.get("type", "RollingUpdate") == "RollingUpdate", strategy
    claims = [v for v in pod.get("volumes") or [] if "persistentVolumeClaim" in v or "ephemeral" in v]
    assert not claims, f"a volume claim mounted into every replica: {claims}"
    assert not [d for d in docs if d.get("kind") == "PersistentVolumeClaim"
                and d["metadata"]["name"] == "fleetgate-state"], "persistent-state's PVC is rendered"
    labels = _pod_labels(dep)
    spread = [t for t in pod.get("topologySpreadConstraints") or []
              if t["topologyKey"] == "kubernetes.io/hostname" and _selects(t.get("labelSelector"), labels)]
    anti = [t for t in ((pod.get("affinity") or {}).get("podAntiAffinity") or {}).get(
                "requiredDuringSchedulingIgnoredDuringExecution", [])
            if t["topologyKey"] == "kubernetes.io/hostname" and _selects(t.get("labelSelector"), labels)]
    assert anti or any(t["whenUnsatisfiable"] == "DoNotSchedule" and t["maxSkew"] == 1 for t in spread), (
        "the gateways are not spread across nodes (hostname topology spread or anti-affinity)")


def test_replicated_pdb_allows_one_down() -> None:
    docs, dep, _pod, _c = _replicated()
    pdbs = [d for d in docs if d.get("kind") == "PodDisruptionBudget"
            and _selects(d["spec"].get("selector"), _pod_labels(dep))]
    assert len(pdbs) == 1, [p["metadata"]["name"] for p in pdbs]
    spec = pdbs[0]["spec"]
    assert spec.get("maxUnavailable") == 1 and "minAvailable" not in spec, spec


def test_replicated_hpa_scales_the_gateway_on_cpu() -> None:
    docs, dep, _pod, c = _replicated()
    hpas = [d for d in docs if d.get("kind") == "HorizontalPodAutoscaler"]
    assert len(hpas) == 1, [h["metadata"]["name"] for h in hpas]
    hpa = hpas[0]
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    target = (ref.get("apiVersion"), ref["kind"], ref["name"])
    assert target == ("apps/v1", "Deployment", dep["metadata"]["name"]), target
    assert hpa["spec"]["minReplicas"] == dep["spec"]["replicas"] == 3
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    cpu = [m["resource"]["target"] for m in hpa["spec"]["metrics"]
           if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and cpu[0]["type"] == "Utilization" and 0 < cpu[0]["averageUtilization"] <= 90, cpu
    # utilization is of the request: without a CPU request the HPA cannot compute it
    assert (c.get("resources") or {}).get("requests", {}).get("cpu"), "the gateway requests no CPU"


def test_replicated_gateway_uses_redis_with_the_secret_password() -> None:
    """The gateway's args carry fleetgate_state (a Redis Service that selects the StatefulSet)
    and the password file, which is the key of the very Secret Redis takes its requirepass from."""
    docs, _dep, pod, c = _replicated()
    opts = options(argv_of(c))
    assert opts.get("fleetgate_state") == "redis://fleetgate-redis:6379/0", opts.get("fleetgate_state")
    path = opts.get("fleetgate_state_password_file")
    assert path == "/var/run/fleetgate/redis/password", path
    ss, redis = _redis(docs)

    def secret_file(pod_spec: dict[str, Any], container: dict[str, Any], file: str) -> tuple[str, str]:
        mounts = [m for m in container.get("volumeMounts") or []
                  if file.startswith(m["mountPath"].rstrip("/") + "/")]
        assert mounts, f"{file} is on no volume of {container['name']}"
        m = max(mounts, key=lambda m: len(m["mountPath"]))
        vol = next(v for v in pod_spec["volumes"] if v["name"] == m["name"])
        assert "secret" in vol, f"{file}: volume {m['name']} is not a Secret"
        name = file[len(m["mountPath"].rstrip("/")) + 1:]
        key = next((i["key"] for i in vol["secret"].get("items") or [] if i["path"] == name), name)
        return vol["secret"]["secretName"], key

    gw_secret = secret_file(pod, c, path)
    script = " ".join([*(redis.get("command") or []), *(redis.get("args") or [])])
    m = re.search(r"pw=\$\(cat (\S+)\)", script)
    assert m and "requirepass $pw" in script, "Redis does not take requirepass from a file"
    assert secret_file(ss["spec"]["template"]["spec"], redis, m.group(1)) == gw_secret
    assert any(d.get("kind") == "Secret" and d["metadata"]["name"] == gw_secret[0] for d in docs)


def test_redis_pod_is_hardened_and_durable() -> None:
    docs, _dep, _pod, _c = _replicated()
    ss, redis = _redis(docs)
    pod = ss["spec"]["template"]["spec"]
    assert ss["spec"]["replicas"] == 1, "one primary: the component is no Redis cluster"
    for key in ("runAsNonRoot",):
        assert _effective(pod, redis, key) is True
    assert _effective(pod, redis, "runAsUser") not in (None, 0)
    csc = redis.get("securityContext") or {}
    assert csc.get("readOnlyRootFilesystem") is True and csc.get("allowPrivilegeEscalation") is False
    assert "ALL" in (csc.get("capabilities") or {}).get("drop", []) and not csc.get("privileged")
    assert (_effective(pod, redis, "seccompProfile") or {}).get("type") == "RuntimeDefault"
    assert pod.get("automountServiceAccountToken") is False
    res = redis.get("resources") or {}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res.get(kind) or {}), f"Redis resources.{kind}: {res}"
    tag = str(redis["image"]).split("@")[0].rpartition(":")[2]
    assert "@sha256:" in redis["image"] or (tag and tag != "latest" and "/" not in tag), redis["image"]
    for probe in ("readinessProbe", "livenessProbe"):
        cmd = " ".join((redis.get(probe) or {}).get("exec", {}).get("command") or [])
        # redis-cli exits 0 on NOAUTH/LOADING: only the PONG reply may pass
        assert "redis-cli" in cmd and " ping" in cmd and "PONG" in cmd, f"{probe}: {cmd!r}"
    # AOF on, on the claim, never evicting
    mounts = {m["mountPath"]: m["name"] for m in redis.get("volumeMounts") or []}
    claims = {t["metadata"]["name"] for t in ss["spec"].get("volumeClaimTemplates") or []}
    conf_vol = next(v for v in pod["volumes"] if v["name"] == mounts.get("/etc/redis"))
    conf = next(d for d in docs if d.get("kind") == "ConfigMap"
                and d["metadata"]["name"] == conf_vol["configMap"]["name"])["data"]["redis.conf"]
    settings = dict(ln.split(None, 1) for ln in conf.splitlines() if ln.strip() and not ln.startswith("#"))
    assert settings.get("appendonly") == "yes" and settings.get("appendfsync") in ("always", "everysec")
    assert settings.get("maxmemory-policy") == "noeviction", settings.get("maxmemory-policy")
    assert mounts.get(settings["dir"]) in claims, f"Redis's dir {settings['dir']} is not on a volume claim"
    assert "requirepass" not in settings, "the password belongs in the Secret, not the ConfigMap"


def test_only_the_gateway_reaches_redis() -> None:
    """Every policy on the Redis pods: ingress only from the gateway's pods (this namespace, by
    their labels) on 6379, and no egress; the gateway's egress allows Redis on 6379."""
    docs, dep, _pod, _c = _replicated()
    ss, _redis_c = _redis(docs)
    redis_labels, gw_labels = _pod_labels(ss), _pod_labels(dep)
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"
                and _selects(d["spec"].get("podSelector"), redis_labels)]
    assert any("Ingress" in (p["spec"].get("policyTypes") or ["Ingress"]) for p in policies), (
        "no NetworkPolicy restricts ingress to Redis")
    assert any("Egress" in (p["spec"].get("policyTypes") or []) for p in policies), (
        "no NetworkPolicy restricts Redis's egress")
    for pol in policies:
        name = pol["metadata"]["name"]
        assert not pol["spec"].get("egress"), f"{name}: Redis may reach {pol['spec']['egress']}"
        for rule in pol["spec"].get("ingress") or []:
            assert rule.get("from"), f"{name}: an ingress rule open to every source"
            assert rule.get("ports") and all(p.get("port") in (6379, "redis") and not p.get("endPort")
                                             for p in rule["ports"]), f"{name}: ports {rule.get('ports')}"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"{name}: peer {peer} is not the gateway's pods"
                sel = peer["podSelector"]
                assert _selects(sel, gw_labels) and not sel.get("matchExpressions"), f"{name}: {sel}"
                # exactly the gateway's selecting labels, not a subset that other pods carry too
                assert sel.get("matchLabels") == dep["spec"]["selector"]["matchLabels"], f"{name}: {sel}"
    egress = [d for d in docs if d.get("kind") == "NetworkPolicy"
              and "Egress" in (d["spec"].get("policyTypes") or [])
              and _selects(d["spec"].get("podSelector"), gw_labels)]
    rules = [rule for pol in egress for rule in pol["spec"].get("egress") or []]
    assert any(_selects(peer.get("podSelector"), redis_labels) and "namespaceSelector" not in peer
               and _covers(rule, 6379, {}) for rule in rules for peer in rule.get("to") or []), (
        "the gateway's egress policies do not let it reach Redis on 6379")


def _redis_start(tmp_path: Path, password: bytes) -> subprocess.CompletedProcess[str]:
    """The Redis container's start script, run by sh with its paths in tmp_path and a
    ``redis-server`` that prints what it would have been given (argv, then stdin)."""
    docs = render(REPLICATED)
    _ss, redis = _redis(docs)
    argv = [*(redis.get("command") or []), *(redis.get("args") or [])]
    assert argv[:2] == ["/bin/sh", "-c"], argv
    (tmp_path / "secret").mkdir(parents=True)
    (tmp_path / "secret" / "password").write_bytes(password)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "redis-server"
    fake.write_text('#!/bin/sh\necho "ARGV $*"\ncat\n')
    fake.chmod(0o755)
    script = argv[2].replace("/var/run/redis/", f"{tmp_path}/secret/")
    return subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=10,
                          env={"PATH": f"{bindir}:/usr/bin:/bin"})


def test_redis_refuses_the_placeholder_password(tmp_path: Path) -> None:
    """Applied as it is, the overlay's placeholder Secret starts no Redis (nothing runs with a
    password printed in a repository); a real password reaches redis-server on stdin only."""
    docs = render(REPLICATED)
    ss, _redis_c = _redis(docs)
    secret_name = next(v["secret"]["secretName"] for v in ss["spec"]["template"]["spec"]["volumes"]
                       if "secret" in v)
    secret = next(d for d in docs if d.get("kind") == "Secret" and d["metadata"]["name"] == secret_name)
    assert (secret["metadata"].get("labels") or {}).get("fleetgate.io/placeholder") == "true"
    placeholder = base64.b64decode(secret["data"]["password"])
    refused = _redis_start(tmp_path / "a", placeholder)
    assert refused.returncode != 0 and "ARGV" not in refused.stdout, refused
    assert "placeholder" in refused.stderr
    for bad in (b"", b"short-but-real-1234\n", b"has a space in it and is long enough to pass\n"):
        r = _redis_start(tmp_path / f"b{len(bad)}", bad)
        assert r.returncode != 0 and "ARGV" not in r.stdout, (bad, r)
    real = secrets.token_hex(32)
    ok = _redis_start(tmp_path / "c", (real + "\n").encode())
    assert ok.returncode == 0, ok
    assert f"requirepass {real}\n" in ok.stdout and real not in ok.stdout.splitlines()[0], ok.stdout
    assert ok.stdout.splitlines()[0] == "ARGV /etc/redis/redis.conf -", ok.stdout


def test_no_redis_password_in_deploy_files() -> None:
    """No requirepass value and no password in a Redis URL anywhere under deploy/."""
    bad = []
    for f in sorted(DEPLOY.rglob("*")):
        if not f.is_file():
            continue
        text = f.read_text(errors="replace")
        for m in re.finditer(r"(?m)^\s*requirepass\s+(\S+)", text):  # a config line
            if m.group(1) != "$pw":
                bad.append(f"{dc.rel(f)}: requirepass {m.group(1)}")
        for m in re.finditer(r"rediss?://[^\s/@]*:([^\s/@]+)@", text):
            if not re.fullmatch(r"<[^>]*>|\*+|PASSWORD|\$\{?\w+\}?", m.group(1)):
                bad.append(f"{dc.rel(f)}: password in {m.group(0)}")
    assert not bad, bad


# -- human approval (issue 19): components/approvals ------------------------------------------

EXAMPLE = DEPLOY / "kubernetes" / "overlays" / "example"
APPROVALS_DIR = "/etc/fleetgate/approvals"


@pytest.mark.parametrize("build", GATEWAY_BUILDS)
def test_every_mounted_file_volume_is_used(build: Path | None) -> None:
    """Every ConfigMap/Secret volume the gateway mounts is named by an option or by the rules: a
    mount whose option was dropped (an overlay that restates the args) would go unread."""
    docs = render(build)
    for _dep, pod, c in gateway(build, docs):
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        paths = [v for v in options(argv_of(c)).values() if v.startswith("/")]
        paths += [str(v) for d in docs if d.get("kind") == "ConfigMap"
                  for v in (d.get("data") or {}).values()]
        for m in c.get("volumeMounts") or []:
            if not any(k in volumes[m["name"]] for k in ("configMap", "secret", "projected")):
                continue
            mount = m["mountPath"].rstrip("/")
            assert any(mount == p or mount + "/" in p for p in paths), (
                f"volume {m['name']} ({mount}) is mounted but no option or rules file names it")


@pytest.mark.parametrize("build", [b for b in GATEWAY_BUILDS if b.values[0] is not None
                                   and "fleetgate-approvals" in str(render(b.values[0]))])
def test_approvals_read_the_operators_and_webhook_secret(build: Path) -> None:
    """components/approvals: both options name the keys of the fleetgate-approvals Secret,
    mounted read-only; the webhook URL, a secret, is never a literal in the args."""
    docs = render(build)
    for _dep, pod, c in gateway(build, docs):
        opts = options(argv_of(c))
        assert opts.get("fleetgate_admin_users_file") == f"{APPROVALS_DIR}/operators.yaml", opts
        assert opts.get("fleetgate_approval_webhook_secret_file") == f"{APPROVALS_DIR}/webhook-secret", opts
        mount = next(m for m in c["volumeMounts"] if m["mountPath"].rstrip("/") == APPROVALS_DIR)
        assert mount.get("readOnly") is True
        vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert vol["secret"]["secretName"].startswith("fleetgate-approvals")
        assert {(i["key"], i["path"]) for i in vol["secret"]["items"]} == {
            ("operators.yaml", "operators.yaml"), ("webhook-secret", "webhook-secret")}
        hook = opts.get("fleetgate_approval_webhook", "")
        ref = re.fullmatch(r"\$\((\w+)\)", hook)
        assert not hook or ref, f"fleetgate_approval_webhook is a literal URL in the args: {hook}"
        if ref:
            env = next(e for e in c.get("env") or [] if e["name"] == ref.group(1))
            assert "secretKeyRef" in env.get("valueFrom", {}), env


def test_example_approvals_placeholders() -> None:
    """The example's placeholder operators file parses and lists nobody; its webhook secret is
    too short for the gateway to start with (as every other placeholder)."""
    from fleetgate.approvals.operators import parse_operators

    docs = render(EXAMPLE)
    secret = next(d for d in docs if d.get("kind") == "Secret"
                  and d["metadata"]["name"].startswith("fleetgate-approvals"))
    assert secret["metadata"]["labels"].get("fleetgate.io/placeholder") == "true"
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert len(parse_operators(data["operators.yaml"].decode())) == 0
    assert len(data["webhook-secret"].strip()) < 16
