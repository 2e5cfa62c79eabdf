#!/usr/bin/env bash
# The test command: sets up what is missing (scripts/setup.sh is idempotent), builds
# incrementally, and runs every default test. Slow checks run with LCKV_SLOW_TESTS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo
echo "== C++ tests (ctest)"
ctest --test-dir build --output-on-failure -j2
echo
echo "== Python tests (pytest)"
.venv/bin/python -m pytest -q tests/python
