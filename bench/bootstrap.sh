#!/usr/bin/env bash
# Install the benchmark's extras (pyproject.toml [project.optional-dependencies] bench) into
# .venv, after scripts/bootstrap.sh made it. Re-runs only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

stamp=.venv/.fleetgate-bench-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bench: installing the bench extras into .venv" >&2
  if ! .venv/bin/python -m pip install -e '.[test,bench]' > .venv/bench-bootstrap.log 2>&1; then
    tail -n 30 .venv/bench-bootstrap.log >&2
    echo "bench: pip install failed (full log: .venv/bench-bootstrap.log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
