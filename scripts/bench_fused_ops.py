#!/usr/bin/env python3
"""The fused CPU ops of lckv.ops (rms_norm, apply_rotary, swiglu, residual add, cross_entropy)
against the same math composed from PyTorch ops, forward and forward+backward, side by side in one
process at the shapes of a quickstart-model training step (T=256, batch 16, hidden 256, 4 heads of
64, MLP 768, vocab 4096), bf16 as under autocast; and residual_add_rms_norm against lckv's own
residual_add then rms_norm (what it replaces in a decoder layer). JSON goes to
bench/results/fused_ops_cpu.json.

    .venv/bin/python scripts/bench_fused_ops.py [--threads 2] [--rounds 5]

Each number is the median over rounds of the mean time of --iters calls.
"""
import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import lckv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def cases(batch, seq, hidden, heads, head_dim, mlp, vocab):
    rows = batch * seq
    bf16 = torch.bfloat16

    def leaf(*shape, dtype=bf16, scale=1.0):
        return (torch.randn(*shape) * scale).to(dtype).requires_grad_(True)

    x, w = leaf(rows, hidden, dtype=torch.float32), torch.ones(hidden, requires_grad=True)
    q = leaf(batch, seq, heads, head_dim)  # a linear's output; attention reads its [B, H, T, D] view
    angles = torch.rand(1, 1, seq, head_dim // 2) * 6
    cos, sin = torch.cat((angles.cos(), angles.cos()), -1), torch.cat((angles.sin(), angles.sin()), -1)
    cos_b, sin_b = cos.to(bf16), sin.to(bf16)
    gate, up = leaf(rows, mlp), leaf(rows, mlp)
    stream, branch = leaf(rows, hidden, dtype=torch.float32), leaf(rows, hidden)
    logits, targets = leaf(batch, seq, vocab, scale=3.0), torch.randint(0, vocab, (batch, seq))

    def composed_rms_norm():
        xs = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        return (w * xs).to(bf16)  # what autocast's next linear would cast

    # name: (fused, composed, the inputs gradients are taken for)
    return {
        "rms_norm": (lambda: lckv.ops.rms_norm(x, w, 1e-5, out_dtype=bf16), composed_rms_norm, [x, w]),
        "apply_rotary": (lambda: lckv.ops.apply_rotary(q.transpose(1, 2), cos, sin),
                         lambda: q.transpose(1, 2) * cos_b + rotate_half(q.transpose(1, 2)) * sin_b, [q]),
        "swiglu": (lambda: lckv.ops.swiglu(gate, up), lambda: F.silu(gate) * up, [gate, up]),
        "residual_add": (lambda: lckv.ops.residual_add(stream, branch), lambda: stream + branch, [stream, branch]),
        "residual_add_rms_norm": (
            lambda: lckv.ops.residual_add_rms_norm(stream, branch, w, 1e-5, bf16),
            lambda: (lambda s: (s, lckv.ops.rms_norm(s, w, 1e-5, bf16)))(lckv.ops.residual_add(stream, branch)),
            [stream, branch, w]),
        "cross_entropy": (lambda: lckv.ops.cross_entropy(logits, targets),
                          lambda: F.cross_entropy(logits.float().view(-1, vocab), targets.view(-1)), [logits]),
    }


def timed(fn, inputs, iters):
    """Mean seconds per call of fn (inputs is None) or of fn and its backward (gradients returned,
    not accumulated into .grad, so both sides do the same autograd work). fn returns a tensor or a
    tuple of them (every output then gets a gradient)."""
    t0 = time.perf_counter()
    for _ in range(iters):
        y = fn()
        if inputs is not None:
            outs = list(y) if isinstance(y, tuple) else [y]
            torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs])
    return (time.perf_counter() - t0) / iters


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "fused_ops_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"benchmark": "fused_ops_cpu", "threads": args.threads, "torch": torch.__version__,
              "kernel_variant": lckv.ops.fused_cpu_capability(), "cpu_count": os.cpu_count(),
              "load_average": os.getloadavg(), "shape": "T=256, batch 16, hidden 256, 4x64 heads, MLP 768, vocab 4096, bf16",
              "ops": {}}
    for name, (fused, composed, inputs) in cases(16, 256, 256, 4, 64, 768, 4096).items():
        row = {}
        for backward in (False, True):
            grads_of = inputs if backward else None
            times = {"fused": [], "composed": []}
            for fn in (fused, composed):  # warm-up
                timed(fn, grads_of, 2)
            for _ in range(args.rounds):  # alternate, so both see the same machine
                times["fused"].append(timed(fused, grads_of, args.iters))
                times["composed"].append(timed(composed, grads_of, args.iters))
            key = "forward_backward" if backward else "forward"
            f_ms, c_ms = (1e3 * statistics.median(times[k]) for k in ("fused", "composed"))
            row[key] = {"fused_ms": f_ms, "composed_ms": c_ms, "speedup": c_ms / f_ms}
        result["ops"][name] = row
        print(f"{name:22s} fwd {row['forward']['fused_ms']:7.2f} vs {row['forward']['composed_ms']:7.2f} ms "
              f"({row['forward']['speedup']:.2f}x)   fwd+bwd {row['forward_backward']['fused_ms']:7.2f} vs "
              f"{row['forward_backward']['composed_ms']:7.2f} ms ({row['forward_backward']['speedup']:.2f}x)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
