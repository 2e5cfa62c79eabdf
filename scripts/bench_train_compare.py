#!/usr/bin/env python3
"""LCKV w=2 against plain Llama, trained by lckv-train with the same token budget, seed, data
order and schedule: final validation perplexity and training tokens/s of each, and a PNG of the
curves (scripts/plot_metrics.py). JSON goes to bench/results/train_compare.json.

    .venv/bin/python scripts/bench_train_compare.py --data data/kjv --tokens 393216 --threads 2

The default budget (192 steps of 16 x 128 tokens) should take about 10 minutes on 2 idle cores
(estimated from the rates in docs/design.md §7, not measured: the cores were shared when this was
written). The paper compares at 100B tokens; a budget this small compares early training only.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def summarize(run_dir):
    recs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    run = next(r for r in recs if r["type"] == "run")
    train = [r for r in recs if r["type"] == "train"]
    evals = [r for r in recs if r["type"] == "eval"]
    # Each train record covers the steps since the previous one; tokens_per_s counts step time only.
    seconds, prev = 0.0, 0
    for r in train:
        seconds += (r["step"] - prev) * run["tokens_per_step"] / r["tokens_per_s"]
        prev = r["step"]
    return {"layer_types": run["layer_types"], "params": run["params"], "steps": train[-1]["step"],
            "tokens": train[-1]["tokens"], "train_seconds": seconds, "tokens_per_s": train[-1]["tokens"] / seconds,
            "final_train_loss": train[-1]["loss"], "val_loss": evals[-1]["val_loss"], "val_ppl": evals[-1]["val_ppl"],
            "val_ppl_curve": [[e["tokens"], e["val_ppl"]] for e in evals]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["configs/quickstart-llama.json", "configs/quickstart-lckv-w2.json"])
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "kjv"))
    ap.add_argument("--lckv-train", default=os.path.join(ROOT, os.environ.get("LCKV_BUILD_DIR", "build"), "lckv-train"))
    ap.add_argument("--tokens", type=int, default=393216, help="training tokens per model")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "bench_train_compare"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "train_compare.json"))
    args = ap.parse_args()
    result = {"benchmark": "train_compare", "tokens": args.tokens, "seq_len": args.seq_len,
              "batch_size": args.batch_size, "lr": args.lr, "threads": args.threads, "dtype": "bf16",
              "cpu_count": os.cpu_count(), "runs": []}
    load_before = os.getloadavg()
    run_dirs = []
    for path in args.configs:
        name = os.path.splitext(os.path.basename(path))[0]
        out = os.path.join(args.runs_dir, name)
        subprocess.run(["rm", "-rf", out], check=True)
        steps = -(-args.tokens // (args.seq_len * args.batch_size))
        cmd = [args.lckv_train, "--model-config", path, "--data", args.data, "--out", out,
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--max-tokens", str(args.tokens),
               "--lr", str(args.lr), "--warmup-steps", str(max(1, steps // 10)), "--threads", str(args.threads),
               "--dtype", "bf16", "--eval-every", str(max(1, steps // 4)), "--save-every", "0", "--log-every", "10"]
        print("bench_train_compare: " + " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
        summary = summarize(out)
        summary["config"] = path
        result["runs"].append(summary)
        run_dirs.append(out)
    base = result["runs"][0]
    for r in result["runs"]:
        r["val_ppl_over_first"] = r["val_ppl"] / base["val_ppl"]
        r["tokens_per_s_over_first"] = r["tokens_per_s"] / base["tokens_per_s"]
    result["load_average_before_after"] = [load_before, os.getloadavg()]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    png = os.path.splitext(args.out)[0] + ".png"
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plot_metrics.py"), *run_dirs, "-o", png,
                    "--title", f"lckv-train, {args.tokens} tokens, T={args.seq_len}, batch {args.batch_size}"],
                   check=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
