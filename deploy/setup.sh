#!/usr/bin/env bash
# Create .venv and install gridfleet with its test tools. torch is installed first, pinned, so that a
# CPU machine takes the local CPU wheel instead of pulling GBs of CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
# studios: lightning-sdk, so the tests check worker/studios.py against its real classes
.venv/bin/pip install -q -e '.[dev,studios]'
