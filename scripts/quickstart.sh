#!/usr/bin/env bash
# The main job on a fresh machine: set up, then a short forward/backward demo of a tiny LCKV model
# that also checks the parallel iterative forward against the sequential definition.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
./build/lckv-demo --config configs/tiny-lckv-w2.json --threads 2 --steps 5
