#!/usr/bin/env bash
# The test command (README, .ci/run): linters, the documentation (--strict: a broken link or anchor,
# one to a config key that no longer exists included, fails it), then the test suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests benchmarks docs/hooks
.venv/bin/ruff format --check src tests benchmarks docs/hooks
site="$(mktemp -d)" && trap 'rm -rf "$site"' EXIT
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet -d "$site"
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
