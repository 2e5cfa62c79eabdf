#!/usr/bin/env bash
# The CPU paths of condensed attention (flash forward + blocked backward, blocked, PyTorch SDPA with
# its autograd; the decode kernel against the blocked path) against the bf16 matmul rate measured
# in the same interleaved rounds. Extra flags go to lckv-bench-attention-cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${LCKV_BUILD_DIR:-build}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
mkdir -p bench/results
out=bench/results/attention_cpu_$(date +%Y%m%d).json
"$build"/lckv-bench-attention-cpu --threads 2 --out "$out" "$@" > /dev/null
echo "wrote $out"
