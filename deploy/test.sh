#!/usr/bin/env bash
# Set up (venv, pinned torch, deps; a running Postgres) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
bash deploy/postgres.sh
exec .venv/bin/python -m pytest -q "$@"
