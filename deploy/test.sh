#!/usr/bin/env bash
# Set up (venv, pinned torch, deps; a running Postgres) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
bash deploy/postgres.sh
# tests/e2e/test_dashboard.py drives Debian's chromium through Playwright (never `playwright install`).
if ! command -v /usr/bin/chromium >/dev/null; then
  sudo=$([ "$(id -u)" = 0 ] || echo sudo)
  $sudo apt-get update -q && $sudo apt-get install -y -q chromium
fi
exec .venv/bin/python -m pytest -q "$@"
