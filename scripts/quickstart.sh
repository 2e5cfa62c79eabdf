#!/usr/bin/env bash
# The main job on a fresh machine: set up, prepare the default corpus (the King James Bible, 4096-piece
# BPE), pretrain a tiny LCKV model (8 layers, hidden 256, w=2: layers 1-6 read layer 6's KVs) on CPU
# for a few minutes with lckv-train, report its validation perplexity and greedy-generate a few lines.
# LCKV_QUICKSTART_STEPS overrides the number of optimizer steps (default 300: on 2 cores ~2.5 minutes in bf16
# on an AMX CPU, ~10 minutes in fp32 on an AVX2-only one; --dtype auto picks the dtype the CPU computes natively).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/get_corpus.sh data/kjv 4096
rm -rf runs/quickstart
./build/lckv-train --model-config configs/quickstart-lckv-w2.json --data data/kjv --out runs/quickstart \
  --seq-len 128 --batch-size 8 --max-steps "${LCKV_QUICKSTART_STEPS:-300}" --lr 2e-3 --warmup-steps 30 \
  --eval-every 100 --log-every 10 --threads 2 --dtype auto \
  --prompt "And God said" --generate-tokens 48
