#!/usr/bin/env python3
"""Plots lckv-train metrics (metrics.jsonl) as PNG curves: training loss and validation
perplexity against tokens, one line per run, several runs on one figure.

    .venv/bin/python scripts/plot_metrics.py runs/lckv/metrics.jsonl runs/llama/metrics.jsonl -o curves.png

A run directory may be given instead of its metrics.jsonl. Runs are labelled by their directory
name unless --labels is given.
"""
import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path):
    """The 'train' and 'eval' records of a metrics file, as lists of dicts."""
    train, evals = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"plot_metrics: {path}:{number}: not a JSON record ({e})")
            if rec.get("type") == "train":
                train.append(rec)
            elif rec.get("type") == "eval":
                evals.append(rec)
    if not train and not evals:
        sys.exit(f"plot_metrics: {path} has no 'train' or 'eval' records: is it an lckv-train metrics.jsonl?")
    return train, evals


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="metrics.jsonl files or run directories holding one")
    ap.add_argument("-o", "--out", default="metrics.png", help="PNG to write (default metrics.png)")
    ap.add_argument("--labels", nargs="+", help="one legend label per run")
    ap.add_argument("--title", default="", help="figure title")
    args = ap.parse_args()
    if args.labels and len(args.labels) != len(args.runs):
        sys.exit(f"plot_metrics: {len(args.labels)} labels for {len(args.runs)} runs")

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, run in enumerate(args.runs):
        path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
        if not os.path.isfile(path):
            sys.exit(f"plot_metrics: {path} not found")
        label = args.labels[i] if args.labels else os.path.basename(os.path.dirname(os.path.abspath(path)))
        train, evals = read_metrics(path)
        if train:
            ax_loss.plot([r["tokens"] for r in train], [r["loss"] for r in train], label=label)
        if evals:
            ax_loss.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o--", ms=3,
                         color=ax_loss.lines[-1].get_color() if train else None, label=f"{label} (val)")
            ax_ppl.plot([r["tokens"] for r in evals], [math.exp(r["val_loss"]) for r in evals], "o-", ms=3,
                        label=f"{label} (final {math.exp(evals[-1]['val_loss']):.2f})")
    ax_loss.set(xlabel="tokens", ylabel="loss", title="training loss (line) and validation loss (dashed)")
    ax_ppl.set(xlabel="tokens", ylabel="validation perplexity", title="validation perplexity", yscale="log")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    tmp = args.out + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, args.out)
    print(f"plot_metrics: wrote {args.out}")


if __name__ == "__main__":
    main()
