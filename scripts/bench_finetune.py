#!/usr/bin/env python3
"""The fine-tuning recipe, measured: pretrain a plain Llama of the quickstart shape
(configs/quickstart-llama.json) on the default corpus, convert it to LCKV w=2 (the layer_types of
configs/quickstart-lckv-w2.json) with lckv-convert --kv-init copy and average, fine-tune each with
lckv-train --init-from for the same token budget, and compare validation perplexity (lckv-eval,
the whole val split) before conversion, right after, after fine-tuning, and against LCKV w=2 trained
from scratch for the same total tokens. Writes bench/results/finetune_quickstart.{json,png}.

    python scripts/bench_finetune.py [--data data/kjv] [--pretrain-steps 200] [--finetune-steps 100]

Affordable on 2 cores (the default 200 + 100 steps: 35 minutes on the shared 2-core machine). The paper's version of this
(TinyLlama -> w=2, 8.514 vs 9.746 from scratch) is the same comparison at 1.1B scale.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd, log):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    start = time.time()
    with open(log, "w") as f:
        rc = subprocess.call([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.stderr.write(Path(log).read_text()[-3000:])
        raise SystemExit(f"bench_finetune: {cmd[0]} failed (exit {rc}); log {log}")
    return time.time() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=str(ROOT / "build"))
    ap.add_argument("--data", default=str(ROOT / "data" / "kjv"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_finetune"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "finetune_quickstart"))
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON of an earlier run")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.out).with_suffix(".json").read_text()), Path(args.out).with_suffix(".png"))
        return 0

    build, work = Path(args.build), Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    lckv_types = json.loads((ROOT / "configs" / "quickstart-lckv-w2.json").read_text())["layer_types"]
    common = ["--data", args.data, "--seq-len", 128, "--batch-size", 8, "--threads", args.threads, "--dtype", "bf16",
              "--log-every", 10, "--eval-every", 50]
    tokens_per_step = 128 * 8
    seconds = {}

    def train(name, steps, extra):
        seconds[f"train {name}"] = round(run([build / "lckv-train", "--out", work / name, "--max-steps", steps,
                                              *common, *extra], work / f"{name}.log"), 1)

    def evaluate(name, model):
        out = work / f"eval_{name}.json"
        run([build / "lckv-eval", "--model", model, "--data", args.data, "--seq-len", 128, "--batch-size", 16,
             "--threads", args.threads, "--dtype", "bf16", "--out", out], work / f"eval_{name}.log")
        return json.loads(out.read_text())["ppl"]

    P, F = args.pretrain_steps, args.finetune_steps
    pretrain = ["--lr", "2e-3", "--warmup-steps", 30]
    # Fine-tuning: a fresh schedule (short warmup, lower peak) and another data order than pretraining's.
    finetune = ["--lr", "1e-3", "--warmup-steps", 10, "--seed", 1235]
    train("llama", P, ["--model-config", ROOT / "configs" / "quickstart-llama.json", *pretrain])
    ppl = {"llama pretrained": evaluate("llama", work / "llama")}
    for init in ("copy", "average"):
        converted = work / f"lckv_{init}"
        seconds[f"convert {init}"] = round(run([build / "lckv-convert", work / "llama", converted, "--layer-types",
                                                lckv_types, "--kv-init", init], work / f"convert_{init}.log"), 2)
        ppl[f"lckv {init}: converted"] = evaluate(f"{init}_converted", converted)
        train(f"ft_{init}", F, ["--init-from", converted, *finetune])
        ppl[f"lckv {init}: fine-tuned"] = evaluate(f"{init}_finetuned", work / f"ft_{init}")
    train("scratch", P + F, ["--model-config", ROOT / "configs" / "quickstart-lckv-w2.json", *pretrain])
    ppl["lckv from scratch"] = evaluate("scratch", work / "scratch")

    # Validation curves of the runs (the trainer's eval records), for the plot.
    def curve(name, offset):
        points = []
        for line in (work / name / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("type") == "eval" and "val_loss" in r:
                points.append(((r["step"] + offset) * tokens_per_step, r.get("val_ppl", 2.718281828 ** r["val_loss"])))
        return points

    curves = {"llama (pretraining)": curve("llama", 0), "lckv w=2 from scratch": curve("scratch", 0),
              "lckv w=2 from llama, copy": curve("ft_copy", P), "lckv w=2 from llama, average": curve("ft_average", P)}
    result = {
        "benchmark": "fine-tuning a pretrained Llama into LCKV w=2 vs LCKV w=2 from scratch (quickstart shape, KJV)",
        "layer_types": lckv_types,
        "pretrain_steps": P,
        "finetune_steps": F,
        "tokens_per_step": tokens_per_step,
        "total_tokens_each": (P + F) * tokens_per_step,
        "val_ppl": {k: round(v, 3) for k, v in ppl.items()},
        "fine_tuned_beats_scratch": {init: ppl[f"lckv {init}: fine-tuned"] < ppl["lckv from scratch"]
                                     for init in ("copy", "average")},
        "seconds": seconds,
        "curves_tokens_ppl": curves,
        "eval": "lckv-eval, whole val split, seq_len 128, bf16, iterative prefill (the config's m + b)",
        "date": time.strftime("%Y-%m-%d"),
        "cores": os.cpu_count(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["val_ppl"], indent=2))

    plot(result, out.with_suffix(".png"))
    return 0


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    P, F, tokens_per_step, ppl = result["pretrain_steps"], result["finetune_steps"], result["tokens_per_step"], result["val_ppl"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = {}
    for label, points in result["curves_tokens_ppl"].items():
        if points:
            line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=label)
            colors[label] = line.get_color()
    x_convert, x_end = P * tokens_per_step, (P + F) * tokens_per_step
    for init, marker in (("copy", "v"), ("average", "^")):
        color = colors.get(f"lckv w=2 from llama, {init}")
        ax.scatter([x_convert], [ppl[f"lckv {init}: converted"]], marker=marker, s=60, zorder=5, color=color,
                   label=f"{init}: right after conversion {ppl[f'lckv {init}: converted']:.1f}, "
                         f"fine-tuned {ppl[f'lckv {init}: fine-tuned']:.1f}")
        ax.scatter([x_end], [ppl[f"lckv {init}: fine-tuned"]], marker=marker, s=60, zorder=5, color=color)
    ax.scatter([x_end], [ppl["lckv from scratch"]], marker="s", s=40, zorder=5, color=colors.get("lckv w=2 from scratch"),
               label=f"from scratch {ppl['lckv from scratch']:.1f}")
    ax.axvline(x_convert, color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation perplexity (log)")
    ax.set_title(f"LCKV w=2: fine-tuned from a Llama vs from scratch ({P} + {F} steps)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
