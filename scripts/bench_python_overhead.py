#!/usr/bin/env python3
"""Python training-step overhead: the C++ trainer's step (lckv.train.Trainer.train_step: loader
batch, bf16 autocast, next-token loss, backward, gradient clipping, fused AdamW, all in C++) vs
the same step written as a user's Python loop around lckv.LCKVForCausalLM (the same loader,
torch.optim.AdamW(fused=True) over the same weight-decay groups, clip_grad_norm_). Both start
from identical weights and read identical batches; they run in alternating rounds in one
process. The overhead compares the fastest round of each (the least disturbed by other work on
the machine); medians are reported too.

    .venv/bin/python scripts/bench_python_overhead.py [--data data/kjv --config configs/tiny-lckv-w2.json ...]

JSON goes to bench/results/python_overhead.json (or --out).
"""

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import lckv
from lckv.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT / "data" / "kjv"), help="lckv-prepare output (made by get_corpus.sh if missing)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny-lckv-w2.json"))
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="training steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of each path (the first is warm-up too)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="bf16: fp32 weights under bf16 autocast")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "python_overhead.json"))
    args = ap.parse_args()

    if not (Path(args.data) / "meta.json").is_file():
        subprocess.run(["bash", str(ROOT / "scripts" / "get_corpus.sh"), args.data], check=True)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        options = {"model_config": args.config, "data": args.data, "out": tmp, "seq_len": args.seq_len,
                   "batch_size": args.batch, "max_steps": 10**6, "warmup_steps": 10, "dtype": args.dtype,
                   "threads": args.threads, "eval_every": 0, "save_every": 0}
        cpp = Trainer(options, log=False)
        model = lckv.LCKVForCausalLM(cpp.model.config, init_weights=False)
        model.load_state_dict(cpp.model.state_dict())
        o = cpp.options
        decay, no_decay = model.cpp_module._weight_decay_groups()
        opt = torch.optim.AdamW([{"params": [p for _, p in decay], "weight_decay": o.weight_decay},
                                 {"params": [p for _, p in no_decay], "weight_decay": 0.0}],
                                lr=o.lr, betas=(o.beta1, o.beta2), eps=o.adam_eps, fused=True)
        loader = lckv.data.TrainLoader(lckv.data.read_prepared(args.data)["train_shards"], args.seq_len, args.batch, o.seed)
        bf16 = args.dtype == "bf16"
        step = [0]

        def python_step():
            for group in opt.param_groups:
                group["lr"] = lckv._C.learning_rate(o, step[0], cpp.total_steps)
            tokens = loader.next()
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(tokens[:, :-1], labels=tokens[:, :-1]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), o.grad_clip)
            opt.step()
            step[0] += 1
            return loss.item()

        first = {"python": python_step(), "cpp": cpp.train_step().loss}  # also the warm-up
        per_step = {"python": [], "cpp": []}
        for _ in range(args.rounds):
            t = time.perf_counter()
            for _ in range(args.steps):
                python_step()
            per_step["python"].append((time.perf_counter() - t) / args.steps)
            t = time.perf_counter()
            for _ in range(args.steps):
                cpp.train_step()
            per_step["cpp"].append((time.perf_counter() - t) / args.steps)

    py_s, cpp_s = min(per_step["python"]), min(per_step["cpp"])
    py_med, cpp_med = statistics.median(per_step["python"]), statistics.median(per_step["cpp"])
    result = {
        "benchmark": "python_overhead",
        "what": "lckv.train.Trainer.train_step (C++) vs the same step as a Python loop around LCKVForCausalLM",
        "config": args.config,
        "layer_types": cpp.model.config.layer_types,
        "vocab_size": cpp.model.config.vocab_size,
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
        # Python's loss (HF label shifting) predicts seq_len - 1 tokens of the window, the trainer's seq_len.
        "first_loss": first,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
