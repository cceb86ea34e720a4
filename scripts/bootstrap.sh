#!/usr/bin/env bash
# Create .venv with a Python >= 3.12 and install fleetgate with its test tools.
# Idempotent: re-running only reinstalls when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local c
  for c in "${FLEETGATE_PYTHON:-}" python3.13 python3.12 python3 \
           "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python /root/.pyenv/versions/3.1[2-9]*/bin/python \
           /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9]; do
    [ -n "$c" ] || continue
    command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || continue
    if "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(0 if sys.version_info >= (3,12) else 1)'; then
  PY=$(find_python) || { echo "bootstrap: need Python >= 3.12 (set FLEETGATE_PYTHON=/path/to/python3.12)" >&2; exit 1; }
  echo "bootstrap: creating .venv with $PY ($("$PY" --version))" >&2
  rm -rf .venv
  "$PY" -m venv .venv
fi

stamp=.venv/.fleetgate-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing fleetgate and its dependencies into .venv" >&2
  if ! .venv/bin/python -m pip install -e '.[test]' > .venv/bootstrap.log 2>&1; then
    tail -n 30 .venv/bootstrap.log >&2
    echo "bootstrap: pip install failed (full log: .venv/bootstrap.log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
