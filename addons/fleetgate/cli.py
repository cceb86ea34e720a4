"""The operator CLI: ``fleetgate run | rules check | token mint | mcp | ca init`` and the
kill switch (``stop | kill | pause | throttle | resume | unrevoke | status | sessions |
killlog``, see :mod:`fleetgate.cli_kill`).

``run`` is a thin wrapper over ``mitmdump -s "$(fleetgate script-path)"`` (the script the
package ships) with our options: anything it does can be done with ``mitmdump``/``mitmweb``
and ``--set fleetgate_...`` directly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

import fleetgate
from fleetgate.cli_approvals import add_approvals_command
from fleetgate.cli_config import add_admin_options
from fleetgate.cli_kill import add_kill_commands, admin_call, emit
from fleetgate.cli_policytest import add_rules_test_command
from fleetgate.cli_pricing import add_pricing_command
from fleetgate.cli_replay import add_replay_command
from fleetgate.cli_trace import add_trace_command
from fleetgate.demo import add_demo_command
from fleetgate.identity.mint import mint_token, parse_ttl
from fleetgate.identity.tokens import parse_secrets

DEV_DIR = Path("certs/dev")
CA_BASENAME = "mitmproxy"  # the names mitmproxy looks for in its confdir
# mitmweb 12's default flow-list columns (its web_columns option), plus the comment: every
# flow's comment starts with who sent it (agent / role / session), then what fleetgate decided
WEB_COLUMNS = ("tls", "icon", "path", "method", "status", "size", "time", "comment")


def _script_path() -> Path:
    """The script the installed package ships (:func:`fleetgate.script_path`): ``run`` works
    from any directory, with no checkout."""
    try:
        return fleetgate.script_path()
    except FileNotFoundError as exc:
        raise SystemExit(f"fleetgate: {exc}") from None


def version_text() -> str:
    """``fleetgate --version``: this distribution's version and the mitmproxy it runs on."""
    from mitmproxy.version import VERSION as MITMPROXY_VERSION

    return f"fleetgate {fleetgate.__version__} (mitmproxy {MITMPROXY_VERSION})"


# -- ca ---------------------------------------------------------------------------------


def ca_init(confdir: Path, quiet: bool = False, cn: str = "fleetgate development CA",
            org: str = "fleetgate", days: int = 825) -> Path:
    """Create a CA in mitmproxy's confdir layout if none exists; return the public cert.

    mitmproxy's own CA builder (the extensions agents' TLS stacks expect) is used with our
    lifetime: its default is ten years, too long for a key that can impersonate every site
    to every agent. The DH parameters file is written too, so the directory can be mounted
    read-only (mitmproxy writes it into its confdir when missing).
    """
    import datetime
    from unittest import mock

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from mitmproxy import certs

    if days < 1:
        raise SystemExit("fleetgate: --days must be at least 1")
    cert = confdir / f"{CA_BASENAME}-ca-cert.pem"
    created = False
    if not (confdir / f"{CA_BASENAME}-ca.pem").exists():
        with mock.patch.object(certs, "CA_EXPIRY", datetime.timedelta(days=days)):
            certs.CertStore.create_store(confdir, CA_BASENAME, 2048, organization=org, cn=cn)
        os.chmod(confdir / f"{CA_BASENAME}-ca.pem", 0o600)
        os.chmod(confdir / f"{CA_BASENAME}-ca.p12", 0o600)
        created = True
    certs.CertStore.load_dhparam(confdir / f"{CA_BASENAME}-dhparam.pem")
    if not quiet:
        c = x509.load_pem_x509_certificate(cert.read_bytes())
        fp = c.fingerprint(hashes.SHA256()).hex(":").upper()
        print(f"{'created' if created else 'existing'} CA in {confdir}")
        print(f"  subject: {c.subject.rfc4514_string()}")
        print(f"  public certificate (give this to agents): {cert.resolve()}")
        print(f"  SHA-256 fingerprint: {fp}")
        print(f"  valid until: {c.not_valid_after_utc:%Y-%m-%d}")
        print(f"  private key (never commit it): {(confdir / f'{CA_BASENAME}-ca.pem').resolve()}")
    return cert


def dev_secret(path: Path) -> Path:
    """A random HS256 secret for development, created once, readable only by its owner."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    return path


# -- commands -------------------------------------------------------------------------


def sets_option(mitmproxy_args: list[str], confdir: Path, name: str) -> bool:
    """Whether the operator set mitmproxy option ``name`` themselves: ``--set name=...`` after
    ``--``, or in the confdir's config.yaml (which a ``--set`` of ours would override)."""
    for i, arg in enumerate(mitmproxy_args):
        value = arg.removeprefix("--set=") if arg.startswith("--set=") else (
            mitmproxy_args[i + 1] if arg == "--set" and i + 1 < len(mitmproxy_args) else "")
        if value.partition("=")[0] == name:
            return True
    for config in ("config.yaml", "config.yml"):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if any(line.partition(":")[0].strip() == name
                   for line in (confdir / config).read_text().splitlines()):
                return True
    return False


def cmd_run(args: argparse.Namespace) -> int:
    from fleetgate.workers import WorkersError, resolve_workers, usable_cores

    try:
        workers = resolve_workers(args.workers, args.state, usable_cores())
    except WorkersError as exc:
        print(f"fleetgate: {exc}", file=sys.stderr)
        return 2
    if workers > 1 and args.web:
        print("fleetgate: --web runs one mitmweb; it cannot be combined with --workers "
              f"{workers} (use --workers 1)", file=sys.stderr)
        return 2
    confdir = Path(args.confdir)
    opts: list[str] = [
        f"fleetgate_rules={args.rules}",
        f"confdir={confdir}",
        f"fleetgate_metrics_listen={args.metrics}",
        f"fleetgate_admin_listen={args.admin}",
        f"fleetgate_decision_log={args.decision_log}",
    ]
    if args.record:
        opts.append(f"fleetgate_record={args.record}")
    if args.state:
        opts.append(f"fleetgate_state={args.state}")
    if args.state_password_file:
        opts.append(f"fleetgate_state_password_file={args.state_password_file}")
    if args.state_dir:
        state = Path(args.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        opts.append(f"fleetgate_mcp_pins={state / 'mcp-pins.json'}")
        opts.append(f"fleetgate_state_dir={state}")
        opts.append(f"fleetgate_admin_token_file={dev_secret(state / 'admin-token')}")
    if args.dev:
        cert = ca_init(confdir, quiet=True)
        secret = dev_secret(confdir / "jwt-hs256.secret")
        opts.append(f"fleetgate_jwt_secret_file={secret}")
        host = "127.0.0.1" if args.listen_host in ("", "0.0.0.0") else args.listen_host
        print("fleetgate (development mode)")
        print(f"  proxy:   http://agent:<JWT>@{host}:{args.listen_port}")
        print(f"  CA:      {cert.resolve()}")
        print(f"  metrics: http://{args.metrics}/metrics   readiness: /healthz/ready")
        print(f"  admin:   http://{args.admin}/v1/status (token: {args.state_dir}/admin-token)")
        print(f"  rules:   {Path(args.rules).resolve()}")
        me = shutil.which("fleetgate", path=str(Path(sys.executable).parent)) or "fleetgate"
        print(f"  a token: {me} token mint --sub demo-security "
              "--claim agent_role=security --ttl 1h")
        # curl reads CURL_CA_BUNDLE before SSL_CERT_FILE when both are set (this machine does)
        print(f"  try it:  HTTPS_PROXY=http://agent:$TOKEN@{host}:{args.listen_port} "
              f"SSL_CERT_FILE={cert.resolve()} CURL_CA_BUNDLE={cert.resolve()} "
              "curl https://api.anthropic.com/v1/models",
              flush=True)
    elif args.jwt_secret_file:
        opts.append(f"fleetgate_jwt_secret_file={args.jwt_secret_file}")
    tool = "mitmweb" if args.web else "mitmdump"
    exe = shutil.which(tool, path=str(Path(sys.executable).parent)) or shutil.which(tool)
    if exe is None:
        print(f"fleetgate: {tool} not found; install fleetgate's dependencies", file=sys.stderr)
        return 2
    argv = [exe, "-s", str(_script_path()), "--listen-host", args.listen_host,
            "--listen-port", str(args.listen_port)]
    if args.web:
        argv += ["--web-host", "127.0.0.1", "--no-web-open-browser"]
        if not sets_option(args.mitmproxy_args, confdir, "web_columns"):
            for column in WEB_COLUMNS:  # a list option: one --set per item (mitmproxy appends)
                argv += ["--set", f"web_columns={column}"]
    else:
        argv += ["--flow-detail", "0"]
    if workers > 1:  # N mitmdumps on one port (SO_REUSEPORT) and a supervisor: workers.py
        from fleetgate.workers import Supervisor, redact, worker_options

        argvs = []
        for i in range(workers):
            w = list(argv)
            for o in worker_options(opts, i, args.admin):
                w += ["--set", o]
            argvs.append(w + args.mitmproxy_args)
        print(f"fleetgate: {workers} workers on {args.listen_host}:{args.listen_port}, "
              f"sharing state at {redact(args.state)}", file=sys.stderr, flush=True)
        return Supervisor(argvs, args.metrics).run()
    for o in opts:
        argv += ["--set", o]
    argv += args.mitmproxy_args
    os.execv(exe, argv)
    return 0  # pragma: no cover


def cmd_rules_check(args: argparse.Namespace) -> int:
    from fleetgate.policy.loader import PolicyError, iter_problems, load_policy

    try:
        policy = load_policy(args.path)
    except PolicyError as exc:
        for line in iter_problems(exc):
            print(line, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s); the rules would be rejected", file=sys.stderr)
        return 1
    # Warnings, not errors (fleetgate.policy.lint): legal rules that are probably not meant,
    # such as a claim no token carries or a comparison that can never be true.
    for warning in policy.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if policy.warnings and args.strict:
        print(f"{len(policy.warnings)} warning(s); --strict fails on warnings", file=sys.stderr)
        return 1
    print(f"ok: revision {policy.revision}, {len(policy.files)} file(s), "
          f"{len(policy.agents)} agent profile(s), {len(policy.rules)} global rule(s), "
          f"{len(policy.revoked.agents) + len(policy.revoked.tokens)} revocation(s), "
          f"{len(policy.mcp.servers)} MCP server(s), "
          f"{len(policy.mcp.rules) + sum(len(s.rules) for s in policy.mcp.servers)
             + sum(len(a.mcp_rules) for a in policy.agents)} MCP rule(s), "
          f"{len(policy.approvals)} approval tier(s), {len(policy.a2a.agents)} A2A agent(s)")
    return 0


def cmd_rules_schema(args: argparse.Namespace) -> int:
    from fleetgate.policy.schema import schema_text

    sys.stdout.write(schema_text())
    return 0


def cmd_token_mint(args: argparse.Namespace) -> int:
    # a secret file may list several secrets (rotation): tokens are signed with the first
    if args.secret_file:
        source, data = args.secret_file, Path(args.secret_file).read_bytes()
    elif os.environ.get("FLEETGATE_JWT_SECRET"):
        source, data = "FLEETGATE_JWT_SECRET", os.environ["FLEETGATE_JWT_SECRET"].encode()
    else:
        default = DEV_DIR / "jwt-hs256.secret"
        if not default.exists():
            print(f"fleetgate: no secret: pass --secret-file, set FLEETGATE_JWT_SECRET, or run "
                  f"'make run' once to create {default}", file=sys.stderr)
            return 2
        source, data = str(default), default.read_bytes()
    try:
        secret = parse_secrets(data)[0]
    except ValueError as exc:
        print(f"fleetgate: {source}: {exc}", file=sys.stderr)
        return 2
    claims: dict[str, object] = {}
    for item in args.claim:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"fleetgate: --claim wants key=value, got {item!r}", file=sys.stderr)
            return 2
        try:
            claims[key] = json.loads(value)
        except json.JSONDecodeError:
            claims[key] = value
    try:
        ttl = parse_ttl(args.ttl)
    except ValueError as exc:
        print(f"fleetgate: {exc}", file=sys.stderr)
        return 2
    print(mint_token(secret, args.sub, ttl, claims, issuer=args.issuer, audience=args.audience))
    return 0


def _admin(args: argparse.Namespace, path: str, body: dict[str, Any] | None = None
           ) -> dict[str, Any]:
    return admin_call(args.admin, path, body, args.token_file)


def cmd_mcp_pins(args: argparse.Namespace) -> int:
    report = _admin(args, "/mcp/pins")
    if args.json:
        emit([json.dumps(report, indent=2)])
        return 0
    pending = report.get("pending") or []
    print(f"{sum(len(t) for t in (report.get('pins') or {}).values())} pinned tool(s), "
          f"{len(pending)} pending approval")
    for p in pending:
        print(f"  pending  {p['server']}  {p['tool']}  {p['state']}  sha256:{p['sha256'][:12]}")
    if args.all:
        for server, tools in sorted((report.get("pins") or {}).items()):
            for tool, digest in sorted(tools.items()):
                print(f"  pinned   {server}  {tool}  sha256:{digest[:12]}")
    return 0


def cmd_mcp_approve(args: argparse.Namespace) -> int:
    out = _admin(args, "/mcp/approve", {"server": args.server, "tool": args.tool})
    emit([json.dumps(out, indent=2)] if args.json else [f"approved {args.tool} of {args.server}"])
    return 0


def cmd_script_path(args: argparse.Namespace) -> int:
    print(_script_path())
    return 0


def cmd_ca_init(args: argparse.Namespace) -> int:
    ca_init(Path(args.dir), cn=args.cn, org=args.org, days=args.days)
    return 0


DESCRIPTION = ("The operator CLI of fleetgate, the egress gateway for a fleet of AI agents: "
               "run the gateway, check and test rules, mint development tokens, operate the "
               "kill switch, approvals and MCP pins of a running gateway, trace sessions and "
               "check LLM pricing.")
EPILOG = ("Commands that call a running gateway find its admin API and token from --admin / "
          "--token-file, then $FLEETGATE_ADMIN_URL / $FLEETGATE_ADMIN_TOKEN, then the config "
          "file ($FLEETGATE_CONFIG or ~/.config/fleetgate/config.toml: admin_url, "
          "admin_token_file), then state/admin-token. Shell completion: "
          "fleetgate completion bash|zsh|tcsh.")


def cmd_completion(args: argparse.Namespace) -> int:
    """A static completion script for ``args.shell`` from the parser itself (shtab): new
    commands and flags are completed without anyone editing a script."""
    import shtab

    sys.stdout.write(shtab.complete(build_parser(), shell=args.shell))
    return 0


def _add_completion_command(sub: Any) -> None:
    p = sub.add_parser("completion", help="print a shell completion script",
                       description="Print a completion script for SHELL. bash: "
                       "fleetgate completion bash > ~/.local/share/bash-completion/completions/"
                       "fleetgate; zsh: fleetgate completion zsh > \"${fpath[1]}/_fleetgate\".")
    p.add_argument("shell", choices=["bash", "zsh", "tcsh"], help="the shell to complete in")
    p.set_defaults(func=cmd_completion)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleetgate", description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--version", action="version", version=version_text(),
                   help="print fleetgate's and mitmproxy's versions and exit")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the gateway (mitmdump with fleetgate's addons)")
    run.add_argument("--rules", default="rules", help="rules file or directory (default: rules)")
    run.add_argument("--listen-host", default="127.0.0.1",
                     help="address agents connect to (default: %(default)s)")
    run.add_argument("--listen-port", type=int, default=8080,
                     help="port agents connect to, as their HTTPS_PROXY (default: %(default)s)")
    run.add_argument("--metrics", default="127.0.0.1:15020", help="host:port for /metrics")
    run.add_argument("--admin", default="127.0.0.1:15021",
                     help="host:port of the admin API (kill switch, MCP approvals)")
    run.add_argument("--confdir", default=str(DEV_DIR), help="mitmproxy confdir holding the CA")
    run.add_argument("--decision-log", default="-", help="'-' (stdout), a file, or ''")
    run.add_argument("--record", default="", metavar="FILE",
                     help="record every flow to FILE (mitmproxy's flow format, credential "
                          "headers masked) for 'fleetgate replay'; '+FILE' appends "
                          "(fleetgate_record)")
    run.add_argument("--jwt-secret-file", default="", help="HS256 secret file")
    run.add_argument("--dev", action="store_true",
                     help="create a development CA and HS256 secret under --confdir if missing")
    run.add_argument("--web", action="store_true", help="run mitmweb (UI on 127.0.0.1:8081)")
    run.add_argument("--state-dir", default="state",
                     help="where state that must survive restarts lives (budget spend, MCP "
                          "tool pins); "
                          "'' keeps it in memory")
    run.add_argument("--state", default="",
                     help="shared state: '' (default: embedded SQLite in --state-dir, one "
                          "process) or redis://HOST:6379/0, rediss://..., unix:///path.sock "
                          "(fleetgate_state)")
    run.add_argument("--state-password-file", default="",
                     help="file holding the Redis password (fleetgate_state_password_file)")
    run.add_argument("--workers", type=int, default=None,
                     help="gateway processes sharing the listen port (SO_REUSEPORT) under a "
                          "supervisor that serves the merged --metrics; default: every "
                          "usable core with a Redis --state, else 1 (more than 1 needs "
                          "--state)")
    run.add_argument("mitmproxy_args", nargs=argparse.REMAINDER,
                     help="after '--': more mitmdump arguments")
    run.set_defaults(func=cmd_run)

    script = sub.add_parser("script-path", help="print the path of the mitmproxy script "
                            "(mitmdump -s \"$(fleetgate script-path)\")")
    script.set_defaults(func=cmd_script_path)

    rules = sub.add_parser("rules", help="work with rules files").add_subparsers(
        dest="rules_cmd", required=True)
    check = rules.add_parser("check", help="validate rules offline, as a reload would")
    check.add_argument("path", help="rules file or directory")
    check.add_argument("--strict", action="store_true",
                       help="exit 1 when there are warnings too (for CI)")
    check.set_defaults(func=cmd_rules_check)
    schema = rules.add_parser("schema", help="print the JSON Schema of the rules format "
                              "(rules/fleetgate-rules.schema.json), for editors")
    schema.set_defaults(func=cmd_rules_schema)
    add_rules_test_command(rules)  # fleetgate rules test: see fleetgate.cli_policytest

    token = sub.add_parser("token", help="development tokens").add_subparsers(
        dest="token_cmd", required=True)
    mint = token.add_parser("mint", help="mint an HS256 agent token")
    mint.add_argument("--sub", required=True, help="agent id")
    mint.add_argument("--claim", action="append", default=[], metavar="KEY=VALUE",
                      help="extra claim (JSON values allowed), repeatable")
    mint.add_argument("--ttl", default="1h",
                      help="lifetime, e.g. 30m, 1h, 7d (default: %(default)s)")
    mint.add_argument("--issuer", help="the iss claim (when the gateway checks one)")
    mint.add_argument("--audience", help="the aud claim (when the gateway checks one)")
    mint.add_argument("--secret-file", help=f"default: {DEV_DIR}/jwt-hs256.secret")
    mint.set_defaults(func=cmd_token_mint)

    mcp = sub.add_parser("mcp", help="MCP tool pins of a running gateway").add_subparsers(
        dest="mcp_cmd", required=True)
    pins = mcp.add_parser("pins", help="list tools waiting for approval (--all: and pins)")
    pins.add_argument("--all", action="store_true", help="list the approved pins too")
    pins.set_defaults(func=cmd_mcp_pins)
    approve = mcp.add_parser("approve", help="approve a pending tool definition")
    approve.add_argument("server", help="the MCP server's name (as fleetgate mcp pins shows it)")
    approve.add_argument("tool", help="the tool whose pending definition to approve")
    approve.set_defaults(func=cmd_mcp_approve)
    for sp in (pins, approve):
        sp.add_argument("--json", action="store_true", help="print the admin API's JSON")
        add_admin_options(sp)

    add_kill_commands(sub)
    add_approvals_command(sub)  # fleetgate approvals list|show|approve|deny
    add_demo_command(sub)  # fleetgate demo: see fleetgate.demo
    add_trace_command(sub)  # fleetgate trace SESSION: see fleetgate.cli_trace
    add_replay_command(sub)  # fleetgate replay FLOWS --rules NEW: see fleetgate.cli_replay
    add_pricing_command(sub)  # fleetgate pricing check: see fleetgate.cli_pricing

    ca = sub.add_parser("ca", help="certificate authority").add_subparsers(
        dest="ca_cmd", required=True)
    init = ca.add_parser("init", help="create a CA in mitmproxy's confdir layout")
    init.add_argument("--dir", default=str(DEV_DIR),
                      help="the confdir to create it in (default: %(default)s)")
    init.add_argument("--cn", default="fleetgate development CA",
                      help="the CA's common name (agents' TLS errors show it)")
    init.add_argument("--org", default="fleetgate", help="the CA's organization")
    init.add_argument("--days", type=int, default=825,
                      help="lifetime in days (default 825; rotate before it ends)")
    init.set_defaults(func=cmd_ca_init)
    _add_completion_command(sub)  # fleetgate completion bash|zsh|tcsh
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "mitmproxy_args", None) and args.mitmproxy_args[0] == "--":
        args.mitmproxy_args = args.mitmproxy_args[1:]
    try:
        code = int(args.func(args))
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (fleetgate ... | head -1): what it read is what it wanted.
        # Python flushes stdout again at exit: point it at /dev/null so that flush succeeds.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())

