#!/usr/bin/env python3
"""Python training-step overhead: the same batch, model and thread count, N training steps
(forward + backward + AdamW) driven from Python (lckv.LCKVForCausalLM + torch.optim.AdamW) vs
entirely in C++ (the extension's C++ loop with torch::optim::AdamW). The two run in alternating
rounds in one process, from identical weights. The overhead compares the fastest round of each
path (the one least disturbed by other work on the machine); medians are reported too.

    .venv/bin/python scripts/bench_python_overhead.py [--config configs/tiny-lckv-w2.json ...]

JSON goes to bench/results/python_overhead.json (or --out).
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import lckv

ROOT = Path(__file__).resolve().parents[1]


def python_steps(model, opt, ids, steps, bf16):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny-lckv-w2.json"))
    ap.add_argument("--vocab", type=int, default=4096, help="override the config's vocab_size (0 keeps it)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="training steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of each path (the first is warm-up too)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="bf16: fp32 weights under bf16 autocast")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "python_overhead.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    config = lckv.LCKVConfig.from_json_file(args.config)
    if args.vocab > 0:
        config.vocab_size = args.vocab
    torch.manual_seed(0)
    py_model = lckv.LCKVForCausalLM(config)
    cpp_model = lckv.LCKVForCausalLM(config, init_weights=False)
    cpp_model.load_state_dict(py_model.state_dict())
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    bf16 = args.dtype == "bf16"
    opt = torch.optim.AdamW(py_model.parameters(), lr=args.lr, weight_decay=0.0)

    # Warm-up (first-call allocations, oneDNN kernel selection), then check that both paths
    # compute the same first loss from the same weights.
    first_py = python_steps(py_model, opt, ids, 1, bf16)[0]
    first_cpp = cpp_model.cpp_module._cpp_train_steps(ids, ids, 1, args.lr, 0.0, bf16)[0]

    per_step = {"python": [], "cpp": []}
    for _ in range(args.rounds):
        t = time.perf_counter()
        python_steps(py_model, opt, ids, args.steps, bf16)
        per_step["python"].append((time.perf_counter() - t) / args.steps)
        t = time.perf_counter()
        cpp_model.cpp_module._cpp_train_steps(ids, ids, args.steps, args.lr, 0.0, bf16)
        per_step["cpp"].append((time.perf_counter() - t) / args.steps)

    py_s, cpp_s = min(per_step["python"]), min(per_step["cpp"])
    py_med, cpp_med = statistics.median(per_step["python"]), statistics.median(per_step["cpp"])
    result = {
        "benchmark": "python_overhead",
        "config": args.config,
        "layer_types": config.layer_types,
        "vocab_size": config.vocab_size,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "dtype": args.dtype,
        "threads": args.threads,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "python_step_s": py_s,
        "cpp_step_s": cpp_s,
        "overhead_percent": 100.0 * (py_s - cpp_s) / cpp_s,
        "median_python_step_s": py_med,
        "median_cpp_step_s": cpp_med,
        "median_overhead_percent": 100.0 * (py_med - cpp_med) / cpp_med,
        "per_round_step_s": per_step,
        "first_loss": {"python": first_py, "cpp": first_cpp},
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
