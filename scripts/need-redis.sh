#!/usr/bin/env bash
# The test suite runs a real redis-server (tests/redisd.py): install the OS package when it is
# missing (Debian/Ubuntu apt-get, as root or through sudo). Idempotent; fast when installed.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1 || command -v valkey-server >/dev/null 2>&1; then
  exit 0
fi
SUDO=
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "need-redis: redis-server is missing and this user cannot install it (apt-get install redis-server)" >&2; exit 1; }
  SUDO=sudo
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "need-redis: redis-server is missing; install Redis 7 or Valkey with this system's package manager" >&2
  exit 1
fi
echo "need-redis: installing redis-server (apt-get)" >&2
$SUDO apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server >&2
# the package starts a system service on Debian; the tests start their own servers
$SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true
command -v redis-server >/dev/null
