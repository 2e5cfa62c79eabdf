#!/usr/bin/env python3
"""Load an LCKV checkpoint, compute its perplexity on a text, and plot how the KVs of the
parallel iterations converge (the paper's Figure 3): the mean squared difference between the
KVs that a top-target layer holds after iteration i and after iteration i + 1. By the theorem
it reaches exactly 0 once i + 1 >= the number of tokens; in practice it falls much sooner,
which is why m + b = 9 iterations suffice in training.

    .venv/bin/python examples/perplexity_and_convergence.py \\
        --checkpoint runs/tiny/step_001000 --data data/kjv --text some.txt --out convergence.png

The tokenizer is --tokenizer, else the one of the lckv-prepare directory --data, else
<checkpoint>/tokenizer.model. Without --text the script uses a built-in paragraph.
"""

# %% imports
import argparse
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import lckv  # noqa: E402

DEFAULT_TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
    "And God said, Let there be light: and there was light. And God saw the light, that it was good: "
    "and God divided the light from the darkness."
)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + model.safetensors)")
    ap.add_argument("--tokenizer", help="SentencePiece tokenizer.model")
    ap.add_argument("--data", help="lckv-prepare directory whose tokenizer to use")
    ap.add_argument("--text", help="UTF-8 text file (default: a built-in paragraph)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per evaluated window")
    ap.add_argument("--iterations", type=int, default=16, help="parallel iterations to trace")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="kv_convergence.png")
    return ap.parse_args()


def tokenizer_path(args) -> str:
    if args.tokenizer:
        return args.tokenizer
    if args.data:
        return lckv.data.read_prepared(args.data)["tokenizer"]
    return str(Path(args.checkpoint) / "tokenizer.model")


# %% perplexity: mean next-token loss over consecutive windows, the config's m and b
@torch.no_grad()
def perplexity(model, ids, seq_len):
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(ids) - 1, seq_len):
        window = torch.tensor([ids[start : start + seq_len + 1]])
        if window.shape[1] < 2:
            break
        loss = model(window, labels=window).loss
        n = window.shape[1] - 1
        total_loss += loss.item() * n
        total_tokens += n
    return math.exp(total_loss / total_tokens), total_tokens


# %% KV convergence: observe the top targets' KVs after every iteration
@torch.no_grad()
def kv_convergence(model, window, iterations):
    kvs = defaultdict(list)

    def observer(segment, iteration, layer, k, v):
        kvs[layer].append(torch.cat([k, v], dim=-1).double().clone())

    # Without autograd the iterations stop at T (all positions exact), so trace at most T.
    model(window, forward_passes=iterations - 1, backward_passes=1, kv_observer=observer)
    return {layer: [((b - a) ** 2).mean().item() for a, b in zip(seq, seq[1:])] for layer, seq in kvs.items()}


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    model = lckv.LCKVForCausalLM.from_pretrained(args.checkpoint).eval()
    config = model.config
    tok = lckv.data.Tokenizer.load(tokenizer_path(args))
    if tok.vocab_size > config.vocab_size:
        raise SystemExit(f"the tokenizer has {tok.vocab_size} ids but the model only {config.vocab_size}")
    text = Path(args.text).read_text() if args.text else DEFAULT_TEXT
    ids = ([tok.bos_id] if tok.bos_id >= 0 else []) + tok.encode(text)
    seq_len = min(args.seq_len, config.max_position_embeddings)

    ppl, n = perplexity(model, ids, seq_len)
    print(f"{args.checkpoint}: layer_types {config.layer_types}, m={config.forward_passes} b={config.backward_passes}")
    print(f"perplexity {ppl:.2f} over {n} tokens")

    window = torch.tensor([ids[:seq_len]])
    curves = kv_convergence(model, window, args.iterations)
    if not curves:
        raise SystemExit("this model has no cyclic segment (e.g. a plain Llama): its KVs need no iterations")
    fig, ax = plt.subplots(figsize=(6, 4))
    for layer, mse in curves.items():
        steps = list(range(1, len(mse) + 1))
        print(f"layer {layer}: " + ", ".join(f"{i}->{i + 1}: {m:.3g}" for i, m in zip(steps, mse)))
        # Exact zeros (converged) cannot be drawn on a log axis: show them at the axis floor.
        floor = min([m for m in mse if m > 0], default=1e-30) / 10
        ax.plot(steps, [max(m, floor) for m in mse], marker="o", label=f"KVs of layer {layer}")
    ax.set_yscale("log")
    ax.set_xlabel("iteration i (MSE between iterations i and i+1)")
    ax.set_ylabel("MSE of the KVs")
    ax.set_title(f"KV convergence, {window.shape[1]} tokens, layer_types {config.layer_types}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
