#!/usr/bin/env bash
# Debian's headless Chromium for the browser tests (tests/test_browser.py): Playwright's
# Python package drives it through its executable path, so no browser is downloaded.
# Idempotent: does nothing when chromium is already on PATH. Installing needs root (CI
# runs as root); without root it says what to install and goes on, and the browser tests
# skip (fail under CI=true) with the same advice.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "browser_packages: chromium not found; install it as root: apt-get install chromium" >&2
  exit 0
fi
command -v apt-get >/dev/null 2>&1 || { echo "browser_packages: no apt-get; install Chromium and put 'chromium' on PATH" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
chromium --version
