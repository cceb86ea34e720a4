"""Where the admin commands find the running gateway and its token: one place, one order.

Every command that talks to the admin API (``status``, ``stop``, ``approvals``, ``trace``,
``mcp pins`` ...) takes ``--admin URL`` and ``--token-file FILE`` (:func:`add_admin_options`)
and resolves them here (:func:`resolve_admin`), first match wins:

- URL: ``--admin``, then ``$FLEETGATE_ADMIN_URL``, then ``admin_url`` in the config file,
  then ``http://127.0.0.1:15021`` (what ``fleetgate run`` listens on);
- token: ``--token-file``, then ``$FLEETGATE_ADMIN_TOKEN`` (the token itself), then
  ``admin_token_file`` in the config file, then ``state/admin-token`` in the current directory
  (what ``fleetgate run`` creates).

The config file is TOML at ``$FLEETGATE_CONFIG``, else ``$XDG_CONFIG_HOME/fleetgate/config.toml``
(``~/.config/fleetgate/config.toml``); a relative ``admin_token_file`` is relative to it. It
holds no token itself: a file naming a file keeps the secret's permissions where they are.
A refused token (HTTP 401) is reported with where it was taken from and where else was looked.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CONFIG_KEYS", "DEFAULT_ADMIN", "DEFAULT_TOKEN_FILE", "AdminTarget",
           "add_admin_options", "config_path", "read_config", "resolve_admin"]

DEFAULT_ADMIN = "http://127.0.0.1:15021"
DEFAULT_TOKEN_FILE = Path("state/admin-token")
CONFIG_KEYS = frozenset({"admin_url", "admin_token_file"})


@dataclass(frozen=True)
class AdminTarget:
    """The admin API to call and the token to send; ``token_from`` says where the token came
    from (``None`` when there is none), ``looked`` every place tried, in order."""

    url: str
    url_from: str
    token: str | None
    token_from: str | None
    looked: tuple[str, ...]

    def token_hint(self) -> str:
        """For a 401: which token was sent and where else one could have come from."""
        where = "; ".join(self.looked)
        if self.token is None:
            return f"no admin token was found (looked in: {where})"
        return f"the token sent came from {self.token_from} (order: {where})"


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("FLEETGATE_CONFIG"):
        return Path(env["FLEETGATE_CONFIG"]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    return Path(base) / "fleetgate" / "config.toml"


def read_config(path: Path, required: bool = False) -> dict[str, str]:
    """The config file's keys; ``{}`` when there is none (``SystemExit`` when
    ``$FLEETGATE_CONFIG`` names a missing file, or the file is unreadable or has unknown keys:
    a typo must not send the token to the wrong place)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if required:
            raise SystemExit(f"fleetgate: $FLEETGATE_CONFIG names {path}, which does not "
                             "exist") from None
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SystemExit(f"fleetgate: cannot read the config file {path}: {exc}") from None
    unknown = sorted(set(data) - CONFIG_KEYS)
    if unknown:
        raise SystemExit(f"fleetgate: {path}: unknown key(s) {unknown}; known: "
                         f"{sorted(CONFIG_KEYS)}")
    bad = sorted(k for k, v in data.items() if not isinstance(v, str) or not v)
    if bad:
        raise SystemExit(f"fleetgate: {path}: {', '.join(bad)} must be a non-empty string")
    return {str(k): str(v) for k, v in data.items()}


def resolve_admin(url: str | None = None, token_file: str | None = None,
                  env: Mapping[str, str] | None = None) -> AdminTarget:
    """``--admin``/``--token-file`` (``None``: not given) > environment > config > default."""
    env = os.environ if env is None else env
    cfg_path = config_path(env)
    cfg = read_config(cfg_path, required=bool(env.get("FLEETGATE_CONFIG")))
    if url:
        target_url, url_from = url, "--admin"
    elif env.get("FLEETGATE_ADMIN_URL"):
        target_url, url_from = env["FLEETGATE_ADMIN_URL"], "$FLEETGATE_ADMIN_URL"
    elif "admin_url" in cfg:
        target_url, url_from = cfg["admin_url"], f"admin_url in {cfg_path}"
    else:
        target_url, url_from = DEFAULT_ADMIN, "the default"
    looked: list[str] = []
    candidates: list[tuple[str, Path | None, str | None]] = []
    if token_file:
        candidates.append((f"--token-file {token_file}", Path(token_file).expanduser(), None))
    candidates.append(("$FLEETGATE_ADMIN_TOKEN", None, env.get("FLEETGATE_ADMIN_TOKEN") or ""))
    if "admin_token_file" in cfg:
        p = Path(cfg["admin_token_file"]).expanduser()
        p = p if p.is_absolute() else cfg_path.parent / p
        candidates.append((f"admin_token_file in {cfg_path} ({p})", p, None))
    else:
        looked_cfg = f"admin_token_file in {cfg_path} (not set)"
        candidates.append((looked_cfg, None, ""))
    candidates.append((f"{DEFAULT_TOKEN_FILE} (in {Path.cwd()})", DEFAULT_TOKEN_FILE, None))
    for label, path, value in candidates:
        looked.append(label)
        if path is not None:
            try:
                value = path.read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                if label.startswith("--token-file"):
                    raise SystemExit(f"fleetgate: --token-file {token_file}: no such file") from None
                continue
            except (OSError, UnicodeDecodeError) as exc:
                raise SystemExit(f"fleetgate: cannot read the admin token from {path}: {exc}"
                                 ) from None
        if value:
            return AdminTarget(target_url, url_from, value, label, tuple(looked))
    return AdminTarget(target_url, url_from, None, None, tuple(looked))


def add_admin_options(p: argparse.ArgumentParser) -> None:
    """``--admin`` and ``--token-file``, for every command that calls the admin API."""
    p.add_argument("--admin", metavar="URL", default=None,
                   help="the gateway's admin API URL (default: $FLEETGATE_ADMIN_URL, admin_url "
                        f"in the config file, or {DEFAULT_ADMIN})")
    p.add_argument("--token-file", metavar="FILE", default=None,
                   help="file holding your admin token (default: $FLEETGATE_ADMIN_TOKEN, "
                        "admin_token_file in the config file ($FLEETGATE_CONFIG or "
                        f"~/.config/fleetgate/config.toml), or {DEFAULT_TOKEN_FILE})")
