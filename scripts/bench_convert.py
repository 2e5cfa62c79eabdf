#!/usr/bin/env python3
"""Peak memory and time of lckv-convert on a synthetic 1.1B checkpoint (TinyLlama's shape: 22 layers,
hidden 2048, intermediate 5632, 32/4 heads, vocab 32000, bf16, about 2.2 GB), converted to LCKV w=2
(configs/tinyllama-1.1b-lckv-w2.json's layer_types) with --kv-init average.

The checkpoint is written here tensor by tensor (random bf16 values, in the safetensors layout), the
conversion runs as a child process whose peak RSS (getrusage ru_maxrss, which counts the resident
pages of the memory-mapped source too) is compared with the checkpoint's size (target: <= 1.3x), and
the synthetic files are deleted afterwards. Result: bench/results/convert_1.1b.json.

    python scripts/bench_convert.py [--build build] [--work DIR] [--out bench/results/convert_1.1b.json]
"""
import argparse
import json
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def hf_tensors(c):
    """(name, shape) of a Llama checkpoint of config `c`, in Hugging Face names."""
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", [v, h])]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", [h]), (p + "post_attention_layernorm.weight", [h]),
                (p + "self_attn.q_proj.weight", [h, h]), (p + "self_attn.k_proj.weight", [kv, h]),
                (p + "self_attn.v_proj.weight", [kv, h]), (p + "self_attn.o_proj.weight", [h, h]),
                (p + "mlp.gate_proj.weight", [i, h]), (p + "mlp.up_proj.weight", [i, h]),
                (p + "mlp.down_proj.weight", [h, i])]
    out += [("model.norm.weight", [h]), ("lm_head.weight", [v, h])]
    return out


def write_checkpoint(directory: Path, config: dict) -> int:
    """A bf16 safetensors checkpoint with random values, written one tensor at a time (never all in memory)."""
    directory.mkdir(parents=True)
    specs = hf_tensors(config)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        n = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    gen = torch.Generator().manual_seed(0)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape in specs:
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            f.write(t.view(torch.int16).numpy().tobytes())
    (directory / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}, indent=2))
    return (directory / "model.safetensors").stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=str(ROOT / "build"))
    ap.add_argument("--work", default="/tmp/lckv_bench_convert", help="where the synthetic files go (deleted after)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "convert_1.1b.json"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    source_config = json.loads((ROOT / "configs" / "tinyllama-1.1b-llama.json").read_text())
    lckv_types = json.loads((ROOT / "configs" / "tinyllama-1.1b-lckv-w2.json").read_text())["layer_types"]
    work = Path(args.work)
    free = shutil.disk_usage(work.parent if not work.exists() else work).free
    if free < 6e9:
        print(f"bench_convert: only {free / 1e9:.1f} GB free under {work.parent}; need ~5 GB", file=sys.stderr)
        return 1
    if work.exists():
        shutil.rmtree(work)
    try:
        t0 = time.time()
        size = write_checkpoint(work / "llama", source_config)
        print(f"wrote the synthetic checkpoint ({size / 1e9:.2f} GB) in {time.time() - t0:.0f} s", flush=True)
        cmd = [str(Path(args.build) / "lckv-convert"), str(work / "llama"), str(work / "lckv"),
               "--layer-types", lckv_types, "--kv-init", "average"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        start = time.time()
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.time() - start
        output = child.stdout.read()
        if status != 0:
            print(output, file=sys.stderr)
            return 1
        out_size = (work / "lckv" / "model.safetensors").stat().st_size
        peak = usage.ru_maxrss * 1024  # kilobytes on Linux
        # The program's own footprint (LibTorch and its libraries loaded, no checkpoint read): a run that
        # fails at once on a missing source, measured by /usr/bin/time (a child forked from this Python
        # process would count this process's pages until its exec).
        probe = subprocess.run(["/usr/bin/time", "-f", "%M", cmd[0], str(work / "missing"), str(work / "none")],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        baseline = int(probe.stderr.strip().splitlines()[-1]) * 1024
        result = {
            "benchmark": "lckv-convert of a synthetic TinyLlama-shape (1.1B) bf16 checkpoint to LCKV w=2, kv-init average",
            "command": " ".join(cmd[1:]).replace(str(work), "<work>"),
            "source_bytes": size,
            "output_bytes": out_size,
            "parameters": sum(int(torch.Size(s).numel()) for _, s in hf_tensors(source_config)),
            "peak_rss_bytes": peak,
            "peak_rss_over_source": round(peak / size, 3),
            "target_peak_rss_over_source": 1.3,
            "baseline_rss_bytes": baseline,
            "peak_rss_above_baseline_over_source": round((peak - baseline) / size, 3),
            "seconds": round(seconds, 2),
            "user_s": round(usage.ru_utime, 2),
            "system_s": round(usage.ru_stime, 2),
            "program_output": output.strip(),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "date": time.strftime("%Y-%m-%d")},
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0 if peak <= 1.3 * size else 2
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
