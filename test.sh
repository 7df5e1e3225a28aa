#!/usr/bin/env bash
# The test command: set up .venv if needed, then lint, type-check and run the whole suite.
#   ./test.sh                  # everything (CI runs this)
#   ./test.sh -m "not llm"     # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
.venv/bin/ruff check src tests benchmarks plugins
.venv/bin/ruff format --check src tests benchmarks plugins
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
