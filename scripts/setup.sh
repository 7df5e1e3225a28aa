#!/usr/bin/env bash
# Create .venv and install alto with everything the main job and the tests need.
# Idempotent: a second run only checks. The first run builds llama-cpp-python from source
# (about 7 minutes on 2 cores); pip keeps the built wheel in its cache for later runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=.venv/.alto-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # torch is pinned to the CPU build in pyproject (torch==2.13.0): never a CUDA download.
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
    .venv/bin/python -m pip install -q -e '.[llm,dev,ray]'
  touch "$stamp"
fi
