"""python -m lckv.eval: lckv-eval from Python — the perplexity of a checkpoint on a split of an
lckv-prepare data directory, computed by the C++ code lckv-train validates with (so the same
windows, batch, dtype and threads reproduce the trainer's validation loss exactly).

    python -m lckv.eval --model runs/quickstart/step_000300 --data data/kjv --seq-len 128 --batch-size 8
"""

import argparse
import json
import math
import sys
from typing import List, Optional

import torch

from . import _C
from .model import LCKVForCausalLM


def evaluate(model: LCKVForCausalLM, data: str, *, split: str = "val", seq_len: int = 256, batch_size: int = 16,
             max_batches: int = 0, dtype: str = "bf16", prefill: str = "iterative") -> dict:
    """Loss, perplexity and bits per token of `model` on `data`'s split (a dict, as lckv-eval prints)."""
    if split not in ("val", "train"):
        raise ValueError(f"split must be 'val' or 'train', got {split!r}")
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be 'bf16' or 'fp32', got {dtype!r}")
    if prefill not in ("iterative", "exact"):
        raise ValueError(f"prefill must be 'iterative' or 'exact', got {prefill!r}")
    shards = _C.read_prepared(data)[f"{split}_shards"]
    if not shards:
        raise ValueError(f"'{data}/meta.json' lists no {split} shards")
    e = _C.evaluate_windows(model.cpp_module, shards, seq_len, batch_size, max_batches, dtype == "bf16",
                            prefill == "exact")
    return {"data": data, "split": split, "seq_len": seq_len, "batch_size": batch_size, "dtype": dtype,
            "prefill": prefill, "tokens": e.tokens, "loss": e.loss, "ppl": e.ppl,
            "bits_per_token": e.loss / math.log(2.0)}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lckv.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (config.json, model.safetensors)")
    ap.add_argument("--data", required=True, help="directory written by lckv-prepare")
    ap.add_argument("--split", default="val", choices=["val", "train"])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-batches", type=int, default=0, help="0: the whole split")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--prefill", default="iterative", choices=["iterative", "exact"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    try:
        torch.set_num_threads(args.threads)
        result = {"model": args.model, **evaluate(
            LCKVForCausalLM.from_pretrained(args.model), args.data, split=args.split, seq_len=args.seq_len,
            batch_size=args.batch_size, max_batches=args.max_batches, dtype=args.dtype, prefill=args.prefill)}
    except (_C.TrainError, _C.ConfigError, _C.CheckpointError, RuntimeError, OSError, ValueError) as e:
        print(f"python -m lckv.eval: error: {e}", file=sys.stderr)
        return 1
    result["threads"] = args.threads
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
