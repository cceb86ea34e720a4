#!/usr/bin/env bash
# Install exactly what uv.lock says into .venv (Python >= 3.12), and nothing else.
#
#   scripts/bootstrap.sh                 the runtime: what `make run` needs
#   scripts/bootstrap.sh test lint ...   the runtime plus those dependency groups (demo: the extra)
#   scripts/bootstrap.sh --env DIR GROUP an environment of its own (e.g. .venv-mcp1 for the
#                                        MCP SDK 1.x, which cannot share .venv with 2.x)
#
# uv itself comes from PyPI, hash-checked (scripts/uv-requirements.txt), into .tools/uv.
# Installs never change the lock (--frozen): `make lock` is the one way to change versions.
# Idempotent and fast when nothing changed (uv checks the environment against the lock).
set -euo pipefail
cd "$(dirname "$0")/.."

env_dir=.venv
project=1
if [ "${1:-}" = "--env" ]; then
  env_dir=$2; project=0; shift 2
fi

find_python() {
  local c
  for c in "${FLEETGATE_PYTHON:-}" python3.13 python3.12 python3 \
           "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python /root/.pyenv/versions/3.1[2-9]*/bin/python \
           /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9]; do
    [ -n "$c" ] || continue
    command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || continue
    if "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      command -v "$c" 2>/dev/null || echo "$c"; return 0
    fi
  done
  return 1
}

UV=.tools/uv/bin/uv
want=$(sed -n 's/^uv==\([0-9.]*\).*/\1/p' scripts/uv-requirements.txt)
if [ ! -x "$UV" ] || [ "$("$UV" --version 2>/dev/null | cut -d' ' -f2)" != "$want" ]; then
  echo "bootstrap: installing uv $want (hash-checked) into .tools/uv" >&2
  rm -rf .tools/uv
  PYB=$(command -v python3 || find_python)
  "$PYB" -m venv .tools/uv
  .tools/uv/bin/python -m pip install -q --disable-pip-version-check --require-hashes \
    -r scripts/uv-requirements.txt >&2
fi

PY=$(find_python) || { echo "bootstrap: need Python >= 3.12 (set FLEETGATE_PYTHON=/path/to/python3.12)" >&2; exit 1; }
# --compile-bytecode: this machine (and CI) sets PYTHONDONTWRITEBYTECODE, so without .pyc files
# every mitmdump start compiled mitmproxy from source: 4.5 s to listening instead of 1.3 s.
args=(--frozen --python "$PY" --no-python-downloads --compile-bytecode)
for g in "$@"; do
  case $g in
    demo) args+=(--extra "$g") ;;   # [project.optional-dependencies]: pip install 'fleetgate[demo]'
    *) args+=(--group "$g") ;;
  esac
done
if [ "$project" = 1 ]; then
  # --inexact: one group's sync keeps the others' tools (`make run` after `make test`)
  args+=(--inexact)
else
  # a side environment holds only its group (no fleetgate, no runtime dependencies)
  args=(--frozen --python "$PY" --no-python-downloads --compile-bytecode --no-install-project)
  for g in "$@"; do args+=(--only-group "$g"); done
fi
if ! UV_PROJECT_ENVIRONMENT="$env_dir" "$UV" sync --quiet "${args[@]}" 2> "${TMPDIR:-/tmp}/fleetgate-bootstrap.$$"; then
  cat "${TMPDIR:-/tmp}/fleetgate-bootstrap.$$" >&2
  rm -f "${TMPDIR:-/tmp}/fleetgate-bootstrap.$$"
if [ "$project" = 1 ]; then
  # the project's own code is installed editable: byte-compile it too (stale files are ignored)
  "$env_dir/bin/python" -m compileall -q -j 0 addons >/dev/null || true
fi
  echo "bootstrap: uv sync failed (groups: ${*:-runtime only}, environment: $env_dir)" >&2
  exit 1
fi
rm -f "${TMPDIR:-/tmp}/fleetgate-bootstrap.$$"
if [ "$project" = 1 ]; then
  # the project's own code is installed editable: byte-compile it too (stale files are ignored)
  "$env_dir/bin/python" -m compileall -q -j 0 addons >/dev/null || true
fi
