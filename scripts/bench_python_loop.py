#!/usr/bin/env python3
"""Training throughput of lckv-train (C++) against a plain Python/PyTorch training loop, same
model, batch, data, torch, threads, bf16 autocast and AdamW, measured one after the other in one
run. Writes JSON with both tokens/s and the ratio to bench/results/.

BENCHMARK-ONLY BASELINE: the Python model below is a compact plain-PyTorch re-implementation of
the LCKV forward (Llama blocks, layers that read the KVs of the layer named by `layer_types`,
the parallel iterative forward of cyclic segments with m no-grad and b grad iterations, only the
layers up to the last top target in all but the last iteration). It exists to time what a
straightforward Python training loop costs; it is not the project's model (that is the C++
library, wrapped by python/lckv) and is not checked for exactness.

    .venv/bin/python scripts/bench_python_loop.py --data data/kjv --threads 2
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Data: the shard format of csrc/lckv/data/shards.h

def read_shard(path):
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:8] != b"LCKVTOK\0":
            sys.exit(f"bench_python_loop: {path} is not a token shard")
        dtype = {1: np.uint16, 2: np.uint32}[int.from_bytes(header[12:16], "little")]
        count = int.from_bytes(header[16:24], "little")
        return np.frombuffer(f.read(), dtype=dtype, count=count).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Model

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Layer(nn.Module):
    def __init__(self, c, index, target, computes_kv):
        super().__init__()
        H, self.nh, self.nkv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        self.hd = H // self.nh
        self.index, self.target, self.strict = index, target, target > index
        self.input_layernorm = RMSNorm(H, c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(H, c["rms_norm_eps"])
        self.q_proj = nn.Linear(H, self.nh * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, H, bias=False)
        if computes_kv:
            self.k_proj = nn.Linear(H, self.nkv * self.hd, bias=False)
            self.v_proj = nn.Linear(H, self.nkv * self.hd, bias=False)
        I = c["intermediate_size"]
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def kv(self, x, cos, sin):
        """K/V of this layer from its (pre-norm) input."""
        B, T, _ = x.shape
        h = self.input_layernorm(x)
        k = self.k_proj(h).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.nkv, self.hd).transpose(1, 2)
        return k * cos + rotate_half(k) * sin, v

    def forward(self, x, cos, sin, kvs, strict_mask):
        B, T, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(B, T, self.nh, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        if hasattr(self, "k_proj") and self.target == self.index:
            kvs[self.index] = self.kv(x, cos, sin)
        k, v = kvs[self.target]
        if self.strict:  # query p sees keys < p; position 0 gets zeros
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=strict_mask, enable_gqa=True)
            a = a * (torch.arange(T, device=x.device) > 0).view(1, 1, T, 1).to(a.dtype)
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, T, -1))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def plan(targets):
    """Cyclic segments [first, last] (a layer attending top starts one, extended until no layer
    inside attends beyond its end) and single layers, as in csrc/lckv/config.cpp."""
    out, i, L = [], 0, len(targets)
    while i < L:
        if targets[i] > i:
            last = targets[i]
            j = i
            while j <= last:
                last = max(last, targets[j])
                j += 1
            tops = sorted({targets[k] for k in range(i, last + 1) if targets[k] > k})
            out.append((i, last, True, tops))
            i = last + 1
        else:
            out.append((i, i, False, []))
            i += 1
    return out


class LCKV(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        L = c["num_hidden_layers"]
        self.targets = [int(t.rstrip("s")) for t in c["layer_types"].split("_")]
        kv_layers = set(self.targets)
        # Enough for the llama / sandwich presets: every KV layer attends to its own KVs.
        assert all(self.targets[t] == t for t in kv_layers), "baseline supports only self-attending KV layers"
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Layer(c, i, self.targets[i], i in kv_layers) for i in range(L))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        self.plan = plan(self.targets)
        self.m, self.b = c.get("forward_passes", 7), c.get("backward_passes", 2)
        for n, p in self.named_parameters():
            nn.init.ones_(p) if "norm" in n else nn.init.normal_(p, std=c.get("initializer_range", 0.02))

    def forward(self, ids):
        B, T = ids.shape
        hd = self.c["hidden_size"] // self.c["num_attention_heads"]
        inv = 1.0 / (self.c.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        strict = torch.ones(T, T, dtype=torch.bool).tril(-1)
        strict[0, 0] = True  # row 0 would be empty; its output is zeroed
        x = self.embed_tokens(ids)
        kvs = {}
        nkv = self.c["num_key_value_heads"]
        for first, last, cyclic, tops in self.plan:
            if not cyclic:
                x = self.layers[first](x, cos, sin, kvs, strict)
                continue
            for t in tops:
                z = torch.zeros(B, nkv, T, hd, dtype=x.dtype)
                kvs[t] = (z, z)
            iters = self.m + self.b
            for it in range(iters):
                final = it == iters - 1
                with torch.set_grad_enabled(it >= self.m and torch.is_grad_enabled()):
                    h = x
                    stop = last if final else tops[-1]
                    for i in range(first, stop + 1):
                        if not final and i == stop:
                            kvs[i] = self.layers[i].kv(h, cos, sin)
                        else:
                            h = self.layers[i](h, cos, sin, kvs, strict)
            x = h
        return self.lm_head(self.norm(x))


# ----------------------------------------------------------------------------------------------

def rates(tokens_per_step, step_times):
    """tokens/s from the median step time (robust to other processes' bursts on a shared CPU),
    the fastest step, and the mean."""
    ts = sorted(step_times)
    return {"tokens_per_s": tokens_per_step / ts[len(ts) // 2], "tokens_per_s_best": tokens_per_step / ts[0],
            "tokens_per_s_mean": tokens_per_step * len(ts) / sum(ts), "step_seconds": step_times}


def python_loop(cfg, tokens, args):
    torch.manual_seed(0)
    model = LCKV(cfg)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    rng = np.random.default_rng(0)
    T, Bsz = args.seq_len, args.batch_size
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        starts = rng.integers(0, len(tokens) - T - 1, Bsz)
        batch = torch.from_numpy(np.stack([tokens[s:s + T + 1] for s in starts]))
        for g in opt.param_groups:
            g["lr"] = args.lr
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        print(f"python {cfg['layer_types']} step {step}: loss {losses[-1]:.4f}, {time.perf_counter() - t0:.2f} s",
              file=sys.stderr)
    return rates(T * Bsz, times) | {"first_loss": losses[0], "last_loss": losses[-1]}


def cpp_loop(config_path, args):
    with tempfile.TemporaryDirectory() as out:
        cmd = [args.lckv_train, "--model-config", config_path, "--data", args.data, "--out", out,
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
               "--max-steps", str(args.warmup + args.steps), "--lr", str(args.lr), "--warmup-steps", "0",
               "--min-lr-ratio", "1", "--threads", str(args.threads), "--dtype", "bf16", "--log-every", "1",
               "--eval-every", "0", "--eval-batches", "1", "--save-every", "0"]
        print("running " + " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
        recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
        train = [r for r in recs if r["type"] == "train"]
        tokens = args.batch_size * args.seq_len
        times = [tokens / r["tokens_per_s"] for r in train[args.warmup:]]
        return rates(tokens, times) | {"first_loss": train[0]["loss"], "last_loss": train[-1]["loss"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["configs/quickstart-llama.json", "configs/quickstart-lckv-w2.json"])
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "kjv"))
    ap.add_argument("--lckv-train", default=os.path.join(ROOT, os.environ.get("LCKV_BUILD_DIR", "build"), "lckv-train"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per program and config")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "train_python_vs_cpp.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    meta = json.load(open(os.path.join(args.data, "meta.json")))
    tokens = np.concatenate([read_shard(os.path.join(args.data, s)) for s in meta["train_shards"]])
    result = {"benchmark": "train_python_vs_cpp", "threads": args.threads, "seq_len": args.seq_len,
              "batch_size": args.batch_size, "steps": args.steps, "dtype": "bf16 autocast, fp32 AdamW",
              "torch": torch.__version__, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "runs": []}
    for path in args.configs:
        cfg = json.load(open(path))
        cfg["vocab_size"] = meta["vocab_size"]
        cpp = cpp_loop(path, args)
        py = python_loop(cfg, tokens, args)
        result["runs"].append({"config": path, "layer_types": cfg["layer_types"], "cpp": cpp, "python": py,
                               "cpp_over_python": cpp["tokens_per_s"] / py["tokens_per_s"],
                               "cpp_over_python_best": cpp["tokens_per_s_best"] / py["tokens_per_s_best"]})
        print(json.dumps(result["runs"][-1]), file=sys.stderr)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
