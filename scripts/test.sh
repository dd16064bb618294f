#!/usr/bin/env bash
# The test command (README, .ci/run): linters, then the test suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
