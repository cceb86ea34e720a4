#!/usr/bin/env bash
# The benchmark's tools (dependency group bench in pyproject.toml, pinned by uv.lock) into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
exec ./scripts/bootstrap.sh test bench
