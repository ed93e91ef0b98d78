#!/usr/bin/env bash
# The whole test suite, as the README gives it: set-up (idempotent), lint, types, then pytest
# (including the tests that start real vLLM on the CPU with the tiny checkpoint).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
.venv/bin/ruff check suwen tests benchmarks scripts
.venv/bin/ruff format --check suwen tests benchmarks scripts
.venv/bin/mypy suwen
exec .venv/bin/python -m pytest "$@"
