#!/usr/bin/env bash
# The CPU paths of condensed attention (flash forward + blocked backward, blocked, PyTorch SDPA with
# its autograd; the decode kernel against the blocked path) against the matmul rate measured
# in the same interleaved rounds (dtype auto: bf16 where native, else fp32). Extra flags go to lckv-bench-attention-cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${LCKV_BUILD_DIR:-build}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
mkdir -p bench/results
tmp=bench/results/.attention_cpu.json
"$build"/lckv-bench-attention-cpu --threads 2 --out "$tmp" "$@" > /dev/null
# Named by the dtype that ran (--dtype auto: bf16 where native, else fp32).
dtype=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["dtype"])' "$tmp")
out=bench/results/attention_cpu_${dtype}_$(date +%Y%m%d).json
mv "$tmp" "$out"
echo "wrote $out"
