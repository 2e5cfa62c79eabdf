#!/usr/bin/env python3
"""Plots a lckv-bench-throughput JSON: Figure 4 (throughput against batch size, each config up to
the largest batch its KV cache allows under the budget) and Figure 5 (StreamingLLM per-token
latency and cache memory against the cache size). Writes <json stem>_fig4.png and _fig5.png."""
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def label(config_path, configs):
    info = next(c for c in configs if c["config"] == config_path)
    return f'{pathlib.Path(config_path).stem} ({info["kv_layers"]}/{info["num_layers"]} KV layers)'


def main(path):
    path = pathlib.Path(path)
    r = json.loads(path.read_text())
    configs = r["configs"]
    if "sweep" in r:
        s = r["sweep"]
        budget_mib = s["budget_bytes"] / 2**20
        fig, ax = plt.subplots(figsize=(6, 4))
        for curve in s["curves"]:
            pts = curve["points"]
            ax.plot([p["batch"] for p in pts], [p["tokens_per_s"] for p in pts], marker="o",
                    label=label(curve["config"], configs))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("generation throughput (tokens/s)")
        ax.set_title(f'{s["prompt"]}+{s["generate"]} tokens, KV budget {budget_mib:g} MiB, '
                     f'{r["dtype"]}, {r["threads"]} threads')
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out = path.with_name(path.stem + "_fig4.png")
        fig.savefig(out, dpi=120)
        print(f"wrote {out}")
    if "streaming" in r:
        s = r["streaming"]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for curve in s["curves"]:
            pts = curve["points"]
            sizes = [p["cache_size"] for p in pts]
            name = label(curve["config"], configs)
            ax1.plot(sizes, [p["decode_ms_per_step"] for p in pts], marker="o", label=name)
            ax2.plot(sizes, [p["cache_bytes"] / 2**20 for p in pts], marker="o", label=name)
        ax1.set_ylabel("decode latency (ms/token)")
        ax2.set_ylabel("KV cache memory (MiB)")
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("cache size (tokens)")
            ax.grid(True, alpha=0.3)
        ax1.legend(fontsize=8)
        fig.suptitle(f'StreamingLLM (sink {s["sink"]}), batch 1, {s["tokens"]} generated tokens')
        fig.tight_layout()
        out = path.with_name(path.stem + "_fig5.png")
        fig.savefig(out, dpi=120)
        print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: plot_throughput.py RESULT.json")
    main(sys.argv[1])
