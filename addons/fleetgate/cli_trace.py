"""``fleetgate trace SESSION``: a session family's call tree in the terminal, no tracing backend.

By default the running gateway's admin API answers (``GET /v1/trace/<session>``, the families
it keeps in memory; the admin URL and token are found as for the kill-switch commands, see
:mod:`fleetgate.cli_kill`). With ``--log FILE`` the decision log files are read instead:
offline, after a restart, or for a session the gateway no longer keeps. Each FILE brings its
rotated siblings (``FILE.1`` ... and ``FILE.N.gz``); ``-`` reads standard input (``kubectl logs``
of a gateway logging to stdout: lines that are not decision records are skipped and counted).

Both paths hand decision records to :func:`fleetgate.telemetry.tree.build`, so the picture is
the same whichever answered.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from fleetgate.cli_config import add_admin_options, resolve_admin
from fleetgate.cli_kill import admin_call
from fleetgate.telemetry.tree import build, family_of, render_text, to_json

__all__ = ["add_trace_command", "cmd_trace", "read_family"]


class _Skipped:
    """Lines of the log files that are not decision records (counted once, in pass one)."""

    def __init__(self) -> None:
        self.lines = 0
        self.read = 0


def _with_rotated(path: Path) -> list[Path]:
    """``path`` and the rotated files beside it, oldest first (``path.N`` ... ``path.1``)."""
    pattern = re.compile(re.escape(path.name) + r"\.(\d+)(\.gz)?$")
    rotated: list[tuple[int, Path]] = []
    if path.parent.is_dir():
        for p in path.parent.iterdir():
            m = pattern.match(p.name)
            if m:
                rotated.append((int(m.group(1)), p))
    return [p for _, p in sorted(rotated, reverse=True)] + [path]


def _open(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return path.open(encoding="utf-8", errors="replace")


def _records(lines: Iterator[str], skipped: _Skipped | None) -> Iterator[dict[str, Any]]:
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if skipped is not None:
            skipped.read += 1
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or "decision_id" not in rec or "ts" not in rec:
            if skipped is not None:
                skipped.lines += 1
            continue
        yield rec


def _file_lines(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        try:
            with _open(path) as f:
                yield from f
        except OSError as exc:
            raise SystemExit(f"fleetgate: cannot read {path}: {exc}") from None


def read_family(files: list[str], session: str, ancestors: bool = False
                ) -> tuple[list[dict[str, Any]], _Skipped]:
    """The records of ``session``'s family in decision log ``files``. Two passes over files
    (the family's sessions from a session -> parent map, then their records), so a large log
    costs one dict entry per session, not one per line; standard input is read once."""
    skipped = _Skipped()
    paths: list[Path] = []
    stdin: list[dict[str, Any]] | None = None
    for name in files:
        if name == "-":
            stdin = list(_records(iter(sys.stdin), skipped))
            continue
        path = Path(name)
        if not path.exists():
            raise SystemExit(f"fleetgate: no such decision log file: {name}")
        paths += [p for p in _with_rotated(path) if p not in paths]
    parents: dict[str, str] = {}

    def note(rec: dict[str, Any]) -> None:
        sid, parent = rec.get("session"), rec.get("parent_session")
        if isinstance(sid, str) and isinstance(parent, str) and parent and parent != sid:
            parents.setdefault(sid, parent)

    for rec in stdin or ():
        note(rec)
    for rec in _records(_file_lines(paths), skipped):
        note(rec)
    wanted = family_of(parents, session, ancestors)
    out = [r for r in stdin or () if r.get("session") in wanted]
    out += [r for r in _records(_file_lines(paths), None) if r.get("session") in wanted]
    return out, skipped


def cmd_trace(args: argparse.Namespace) -> int:
    session: str = args.session
    dropped: dict[str, int] = {}
    if args.log:
        records, skipped = read_family(args.log, session, args.ancestors)
        if skipped.lines:
            print(f"fleetgate: skipped {skipped.lines:,} of {skipped.read:,} line(s) that are "
                  "not decision records", file=sys.stderr)
        where = ", ".join(args.log)
        hint = (f"check the session id (the 'session' field of a decision line), or ask the "
                f"running gateway: fleetgate trace {session} (without --log)")
    else:
        path = f"/v1/trace/{quote(session, safe='')}"
        if args.ancestors:
            path += "?ancestors=1"
        out = admin_call(args.admin, path, token_file=args.token_file)  # 404: exits, says why
        records = [r for r in out.get("records") or [] if isinstance(r, dict)]
        dropped = {str(k): int(v) for k, v in (out.get("dropped") or {}).items()}
        where = f"the gateway at {resolve_admin(args.admin, args.token_file).url}"
        hint = f"read the decision log instead: fleetgate trace {session} --log FILE"
    trace = build(records, session, context=args.ancestors, dropped=dropped)
    if trace is None:
        print(f"fleetgate: no decision records of session {session!r} in {where}; {hint}",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(to_json(trace), indent=2))
    else:
        print(render_text(trace, ascii_only=args.ascii or not _utf8(sys.stdout)))
    return 0


def _utf8(stream: IO[str]) -> bool:
    """Box-drawing characters only where the terminal's encoding has them."""
    return "utf" in (getattr(stream, "encoding", None) or "").lower()


def add_trace_command(sub: Any) -> None:
    p = sub.add_parser("trace", help="a session's calls and sub-agents as a tree, with "
                       "durations, tokens, cost and denials")
    p.add_argument("session", help="the agent session id (the 'session' field of the decision "
                   "log, the token's session_id)")
    p.add_argument("--json", action="store_true", help="the tree as JSON")
    p.add_argument("--ascii", action="store_true", help="ASCII lines instead of box drawing")
    p.add_argument("--ancestors", action="store_true",
                   help="show a sub-agent's session inside its parents' trace")
    p.add_argument("--log", metavar="FILE", action="extend", nargs="+",
                   help="read decision log files (with their rotated FILE.N siblings; '-': "
                        "stdin) instead of asking the running gateway")
    add_admin_options(p)
    p.set_defaults(func=cmd_trace)
