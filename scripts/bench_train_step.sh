#!/usr/bin/env bash
# Training-step throughput, Llama identity vs LCKV w=2 of the quickstart shape (dtype auto: bf16
# autocast where native, else fp32; 2 threads) at T=128 (batch 16) and T=512 (batch 4), side by side in one process each: the FLOP
# ratio of the iteration plans, step GFLOP/s against the bf16 matmul rate of the same rounds, and
# the attention share of a step. Extra flags go to lckv-bench-train-step.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${LCKV_BUILD_DIR:-build}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
mkdir -p bench/results
for shape in "128 16" "512 4"; do
  read -r seq batch <<< "$shape"
  tmp=bench/results/.train_step_T${seq}.json
  "$build"/lckv-bench-train-step --configs configs/quickstart-llama.json configs/quickstart-lckv-w2.json \
    --seq-len "$seq" --batch "$batch" --threads 2 --dtype auto --steps 5 --warmup 1 --profiled-steps 2 --out "$tmp" "$@" \
    > /dev/null
  # The file is named by the dtype that ran (auto: bf16 where native, else fp32), so machines do not overwrite
  # each other's results of the same day.
  dtype=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["dtype"])' "$tmp")
  out=bench/results/train_step_cpu_T${seq}_${dtype}_$(date +%Y%m%d).json
  mv "$tmp" "$out"
  echo "wrote $out"
done
