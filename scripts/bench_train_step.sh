#!/usr/bin/env bash
# Training-step throughput, Llama identity vs LCKV w=2 (tiny shape, T=512), side by side in one
# process, with the FLOP ratio of the iteration plans. Extra flags go to lckv-bench-train-step.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
out=bench/results/train_step_cpu_$(date +%Y%m%d).json
./build/lckv-bench-train-step --configs configs/tiny-llama.json configs/tiny-lckv-w2.json \
  --seq-len 512 --batch 1 --threads 2 --dtype bf16 --out "$out" "$@"
echo "wrote $out"
