#!/usr/bin/env bash
# Generation throughput under a fixed KV-cache budget (the paper's Figure 4 and throughput table)
# and StreamingLLM latency/memory against the cache size (Figure 5), for Llama identity, LCKV w=2,
# CLA and YOCO of the tiny shape, side by side in one process; then the plots. CPU scale: the
# paper's 5+8187 / 512+1024 / 2048+2048 tokens on 24 GB become 5+251 / 64+128 / 128+128 on budgets
# of 8 MiB (Llama's batch is small: the memory-bound regime the paper is in) and 32 MiB (batches
# large enough to make this CPU compute-bound). Default run: under ~10 minutes on 2 cores. Extra flags go to lckv-bench-throughput,
# e.g. --budget-mib 1024, or --configs configs/small-llama.json configs/small-lckv-w10.json ...
# for LCKV w=10 (it needs more than 10 layers: the small shape).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${LCKV_BUILD_DIR:-build}
# Idle OpenMP threads sleep instead of spinning: on a shared CPU spinning workers starve each
# other (measured here: 470 ms/token spinning vs 23 ms/token passive for the same decode).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
mkdir -p bench/results
out=bench/results/throughput_cpu_$(date +%Y%m%d).json
"$build"/lckv-bench-throughput \
  --configs configs/tiny-llama.json configs/tiny-lckv-w2.json configs/tiny-cla.json configs/tiny-yoco.json \
  --scenarios 5+251 64+128 128+128 --budget-mib 8 32 --vocab 4096 --dtype bf16 --threads 2 \
  --streaming-cache-sizes 32 64 128 --streaming-tokens 256 --out "$out" "$@" > /dev/null
echo "wrote $out"
if .venv/bin/python -c "import matplotlib" 2>/dev/null; then
  .venv/bin/python scripts/plot_throughput.py "$out"
else
  echo "matplotlib not in .venv: skipping the plots (pip install matplotlib)"
fi
