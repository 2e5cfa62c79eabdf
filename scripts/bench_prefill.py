#!/usr/bin/env python3
"""Exact prefill by convergence vs the iterative prefill: for prompts of T tokens, the iterations the
exact prefill needs until the top targets' KVs converge, its logits against the sequential
definition (max |difference| relative to the logit scale), and its time against the iterative
prefill's (generate with max_new_tokens=1, the two alternating in one process, best of --repeat).
For a trained checkpoint and for the same config with random weights.

    .venv/bin/python scripts/bench_prefill.py --checkpoint runs/quickstart/step_000300 --data data/kjv

JSON goes to bench/results/prefill_cpu.json (or --out).
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import lckv

ROOT = Path(__file__).resolve().parents[1]


def measure(model, ids, repeat, check_sequential):
    T = ids.shape[1]
    iterations = set()
    tol = lckv._C.convergence_tolerance(next(model.parameters()).dtype)
    with torch.no_grad():
        exact = model(ids, forward_passes=T, backward_passes=1, convergence_tolerance=tol,
                      kv_observer=lambda seg, it, layer, k, v: iterations.add((seg, it))).logits
        # Iterations run per cyclic segment (the loop skips the rest once converged).
        per_segment = {}
        for seg, _ in iterations:
            per_segment[seg] = per_segment.get(seg, 0) + 1
        row = {"tokens": T, "iterations": max(per_segment.values()), "tolerance": tol}
        if check_sequential:
            seq = model(ids, sequential=True).logits
            row["max_abs_diff_vs_sequential"] = (exact - seq).abs().max().item()
            row["logit_scale"] = seq.abs().max().item()
            row["relative_diff_vs_sequential"] = row["max_abs_diff_vs_sequential"] / row["logit_scale"]
    prompt = [ids[0].tolist()]
    times = {"exact": [], "iterative": []}
    for _ in range(repeat):
        for mode in times:
            t = time.perf_counter()
            model.generate(prompt, max_new_tokens=1, prefill=mode)
            times[mode].append(time.perf_counter() - t)
    row.update({f"{m}_s": min(v) for m, v in times.items()})
    row["exact_over_iterative"] = row["exact_s"] / row["iterative_s"]
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "runs" / "quickstart" / "step_000300"))
    ap.add_argument("--data", default=str(ROOT / "data" / "kjv"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    ap.add_argument("--sequential-up-to", type=int, default=512, help="check against the sequential definition up to this T")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "prefill_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    trained = lckv.LCKVForCausalLM.from_pretrained(args.checkpoint).eval()
    torch.manual_seed(0)
    random = lckv.LCKVForCausalLM(trained.config).eval()
    loader = lckv.data.SequentialLoader(lckv.data.read_prepared(args.data)["val_shards"], max(args.lengths), 1)
    text = loader.next()[:, : max(args.lengths)]
    result = {"benchmark": "prefill", "checkpoint": args.checkpoint, "layer_types": trained.config.layer_types,
              "forward_passes": trained.config.forward_passes, "backward_passes": trained.config.backward_passes,
              "dtype": "fp32", "threads": args.threads, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "runs": []}
    for name, model in (("trained", trained), ("random", random)):
        for T in args.lengths:
            if T > model.config.max_position_embeddings:
                continue
            row = {"model": name, **measure(model, text[:, :T], args.repeat, T <= args.sequential_up_to)}
            print(json.dumps(row), flush=True)
            result["runs"].append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
