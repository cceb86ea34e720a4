#!/usr/bin/env bash
# The console's e2e test (tests/e2e/test_console.py) drives a real headless Chromium through
# chromedriver (selenium): install the OS packages when they are missing (Debian/Ubuntu
# apt-get, as root or through sudo). Idempotent; fast when installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
SUDO=
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "need-chromium: chromium/chromedriver are missing and this user cannot install them (apt-get install chromium chromium-driver)" >&2; exit 1; }
  SUDO=sudo
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "need-chromium: chromium and chromedriver are missing; install them with this system's package manager" >&2
  exit 1
fi
echo "need-chromium: installing chromium and chromium-driver (apt-get)" >&2
$SUDO apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2
command -v chromium >/dev/null && command -v chromedriver >/dev/null
