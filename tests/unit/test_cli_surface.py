"""The CLI's surface: help on every flag and subcommand, ``--version``, shell completion, the
admin URL and token resolved in one order (flag > environment > config file > state/), a 401
that says where the token was looked for, ``--json`` wherever data is printed, and a clean exit
when the reader of the output goes away."""

from __future__ import annotations

import argparse
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetgate import cli
from fleetgate.cli_config import DEFAULT_ADMIN, config_path, read_config, resolve_admin

REPO = Path(__file__).resolve().parents[2]
FLEETGATE = [sys.executable, "-m", "fleetgate.cli"]


def walk(parser: argparse.ArgumentParser, prog: str = "fleetgate"
         ) -> Iterator[tuple[str, argparse.Action | None, str | None]]:
    """(command path, action or None for a subcommand, its help) for every argument and
    subcommand below ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{prog} {name}", None, helps.get(name)
                yield from walk(sub, f"{prog} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield prog, action, action.help


def test_every_flag_argument_and_subcommand_has_help() -> None:
    missing = [f"{prog}: {'/'.join(a.option_strings) or a.dest}" if a else prog
               for prog, a, help_text in walk(cli.build_parser())
               if not help_text or help_text == argparse.SUPPRESS]
    assert missing == []


def test_walk_sees_nested_commands() -> None:
    """The help test is only as good as the walk: it reaches a sub-subcommand's options."""
    seen = {(prog, a.dest if a else None) for prog, a, _ in walk(cli.build_parser())}
    assert ("fleetgate approvals list", "json") in seen
    assert ("fleetgate pricing check", "strict") in seen
    assert ("fleetgate mcp pins", "token_file") in seen


def test_top_level_help_reads_as_sentences_without_rest_markup() -> None:
    text = cli.build_parser().format_help()
    assert "``" not in text and ":mod:" not in text
    description = cli.build_parser().description or ""
    assert description.endswith(".") and "pricing" in description


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("fleetgate ")


@pytest.mark.parametrize("shell", ["bash", "zsh", "tcsh"])
def test_completion_script_names_the_commands(shell: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["completion", shell]) == 0
    script = capsys.readouterr().out
    for word in ("approvals", "pricing", "killlog"):
        assert word in script, (shell, word)
    if shell != "tcsh":  # shtab's tcsh script completes commands and choices only
        assert "--token-file" in script


def test_completion_bash_is_valid_bash(tmp_path: Path) -> None:
    out = subprocess.run([*FLEETGATE, "completion", "bash"], capture_output=True, text=True,
                         check=True, timeout=60)
    (tmp_path / "c.bash").write_text(out.stdout)
    subprocess.run(["bash", "-n", str(tmp_path / "c.bash")], check=True, timeout=30)


# -- the admin URL and token ----------------------------------------------------------------

def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path), **extra}


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "xdg" / "fleetgate" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with no state/admin-token."""
    d = tmp_path / "cwd"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


def test_flag_beats_env_beats_config_beats_default(tmp_path: Path, elsewhere: Path) -> None:
    (tmp_path / "flag-token").write_text("from-flag\n")
    (tmp_path / "cfg-token").write_text("from-config\n")
    _config(tmp_path, 'admin_url = "http://cfg:1"\nadmin_token_file = "../../cfg-token"\n')
    env = _env(tmp_path, FLEETGATE_ADMIN_URL="http://env:2", FLEETGATE_ADMIN_TOKEN="from-env")
    t = resolve_admin("http://flag:3", str(tmp_path / "flag-token"), env)
    assert (t.url, t.token) == ("http://flag:3", "from-flag")
    t = resolve_admin(None, None, env)
    assert (t.url, t.url_from, t.token) == ("http://env:2", "$FLEETGATE_ADMIN_URL", "from-env")
    t = resolve_admin(None, None, _env(tmp_path))
    assert (t.url, t.token) == ("http://cfg:1", "from-config")  # relative to the config file
    (tmp_path / "xdg" / "fleetgate" / "config.toml").unlink()
    (elsewhere / "state").mkdir()
    (elsewhere / "state" / "admin-token").write_text("from-state\n")
    t = resolve_admin(None, None, _env(tmp_path))
    assert (t.url, t.token) == (DEFAULT_ADMIN, "from-state")


def test_fleetgate_config_names_the_file(tmp_path: Path, elsewhere: Path) -> None:
    cfg = tmp_path / "team.toml"
    cfg.write_text('admin_url = "http://team:9"\n')
    env = _env(tmp_path, FLEETGATE_CONFIG=str(cfg))
    assert config_path(env) == cfg
    assert resolve_admin(None, None, env).url == "http://team:9"
    with pytest.raises(SystemExit, match="does not exist"):
        resolve_admin(None, None, _env(tmp_path, FLEETGATE_CONFIG=str(tmp_path / "nope")))


@pytest.mark.parametrize(("text", "message"), [
    ('admin_uri = "http://x"\n', r"unknown key\(s\) \['admin_uri'\]"),
    ("admin_url = 3\n", "must be a non-empty string"),
    ("admin_url = \n", "cannot read the config file"),
])
def test_config_file_mistakes_stop_the_command(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        read_config(_config(tmp_path, text))


def test_missing_token_file_flag_is_an_error_not_a_fallback(tmp_path: Path,
                                                             elsewhere: Path) -> None:
    with pytest.raises(SystemExit, match="no such file"):
        resolve_admin(None, str(tmp_path / "missing"), _env(tmp_path))


class _Admin(http.server.BaseHTTPRequestHandler):
    """An admin API that wants the token 'right' and answers /v1/status."""

    def do_GET(self) -> None:  # http.server calls it by this name
        if self.headers.get("Authorization") != "Bearer right":
            body = b'{"error": "unauthorized"}'
            self.send_response(401)
        else:
            body = json.dumps({"actions": [], "sessions": 0, "live_flows": 0,
                               "bound_tunnels": 0}).encode()
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def admin() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Admin)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FLEETGATE_")}
    return subprocess.run([*FLEETGATE, *args], capture_output=True, text=True, timeout=60,
                          env={**full, "PYTHONPATH": str(REPO / "addons"), **env}, cwd=cwd)


def test_401_says_where_the_token_was_looked_for(admin: str, tmp_path: Path,
                                                 elsewhere: Path) -> None:
    out = _run(["status", "--admin", admin], _env(tmp_path), elsewhere)
    assert out.returncode == 1
    assert "HTTP 401" in out.stderr and "no admin token was found" in out.stderr
    assert "$FLEETGATE_ADMIN_TOKEN" in out.stderr and "state/admin-token" in out.stderr
    out = _run(["status", "--admin", admin], _env(tmp_path, FLEETGATE_ADMIN_TOKEN="wrong"),
               elsewhere)
    assert "the token sent came from $FLEETGATE_ADMIN_TOKEN" in out.stderr


def test_admin_url_and_token_from_the_config_file(admin: str, tmp_path: Path,
                                                  elsewhere: Path) -> None:
    (tmp_path / "tok").write_text("right\n")
    _config(tmp_path, f'admin_url = "{admin}"\nadmin_token_file = "{tmp_path / "tok"}"\n')
    out = _run(["status", "--json"], _env(tmp_path), elsewhere)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["sessions"] == 0


# -- output --------------------------------------------------------------------------------

def test_every_command_that_prints_admin_data_offers_json() -> None:
    without = [prog for prog, a, _ in walk(cli.build_parser())
               if a is not None and a.dest == "token_file"
               and not any(b is not None and b.dest == "json" and p == prog
                           for p, b, _ in walk(cli.build_parser()))]
    assert without == []


def _into_closed_pipe(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``fleetgate ARGS`` with its stdout a pipe whose reader is already gone: every
    write fails (EPIPE), as in ``fleetgate ... | head -1`` once head has exited."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([*FLEETGATE, *args], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(REPO / "addons")})
    finally:
        os.close(write)


@pytest.mark.parametrize("args", [
    ["pricing", "check", "--all", "--rules", str(REPO / "rules")],  # emit()
    ["completion", "bash"],  # a plain write
    ["rules", "check", str(REPO / "rules")],  # print()
    ["script-path"],
])
def test_output_into_a_closed_pipe_exits_0_without_a_traceback(args: list[str]) -> None:
    out = _into_closed_pipe(args)
    assert (out.returncode, out.stderr) == (0, "")


def test_piped_into_head_prints_the_first_line() -> None:
    out = subprocess.run(
        f"{sys.executable} -m fleetgate.cli pricing check --all --rules {REPO / 'rules'} "
        "| head -1", shell=True, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO / "addons")})
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout.startswith("price list: litellm ")
