"""python -m lckv.eval: lckv-eval from Python — the perplexity of a checkpoint on a split of an
lckv-prepare data directory, computed by the C++ code lckv-train validates with (so the same
windows, batch, dtype and threads reproduce the trainer's validation loss exactly), or on text /
JSONL files tokenized with the checkpoint's tokenizer (lckv-eval's text scoring, the same C++ code:
sliding windows of --context ids moving by --stride, or --streaming).

    python -m lckv.eval --model runs/quickstart/step_000300 --data data/kjv --seq-len 128 --batch-size 8
    python -m lckv.eval --model runs/quickstart/step_000300 --jsonl val.jsonl --context 256 --stride 128
"""

import argparse
import json
import math
import sys
import time
from typing import Callable, List, Optional, Sequence

import torch

from . import _C
from .model import LCKVForCausalLM


def evaluate(model: LCKVForCausalLM, data: str, *, split: str = "val", seq_len: int = 256, batch_size: int = 16,
             max_batches: int = 0, dtype: str = "auto", prefill: str = "iterative") -> dict:
    """Loss, perplexity and bits per token of `model` on `data`'s split (a dict, as lckv-eval prints)."""
    if split not in ("val", "train"):
        raise ValueError(f"split must be 'val' or 'train', got {split!r}")
    dtype = _C.resolve_compute_dtype(dtype)  # auto: bf16 where this CPU computes it natively, else fp32
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


def evaluate_text(model: LCKVForCausalLM, files: Sequence[str], tokenizer: str, *, jsonl: bool = False,
                  text_field: str = "text", context: Optional[int] = None, stride: Optional[int] = None,
                  batch_size: int = 16, dtype: str = "auto", prefill: str = "iterative", streaming: bool = False,
                  sink_tokens: int = 4, progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Loss, perplexity and bits per token of `model` on documents of text files (one per file) or
    JSONL files (one per line, its `text_field`), tokenized with the SentencePiece model `tokenizer`;
    as lckv-eval --text / --jsonl prints it (csrc/lckv/train/evaluate.h states the long-text policy)."""
    dtype = _C.resolve_compute_dtype(dtype)  # auto: bf16 where this CPU computes it natively, else fp32
    if prefill not in ("iterative", "exact"):
        raise ValueError(f"prefill must be 'iterative' or 'exact', got {prefill!r}")
    if not files:
        raise ValueError("no input files")
    if streaming and stride is not None:
        raise ValueError("stride applies to windows, not streaming")
    files = [str(f) for f in files]
    documents = _C.tokenize_documents(files, jsonl, text_field, str(tokenizer), model.cpp_module)
    context = context or model.config.max_position_embeddings
    stride = stride or context
    loss_sum, tokens, windows = _C.text_loss_sum(model.cpp_module, documents, context, stride, batch_size,
                                                 dtype == "bf16", prefill == "exact",
                                                 sink_tokens if streaming else None, progress)
    e = _C.eval_stats(loss_sum, tokens)
    result = {"inputs": files, "format": "jsonl" if jsonl else "text", "tokenizer": str(tokenizer),
              "documents": len(documents), "context": context, "batch_size": batch_size, "dtype": dtype,
              "prefill": prefill, "windows": windows, "tokens": e.tokens, "loss": e.loss, "ppl": e.ppl,
              "bits_per_token": e.loss / math.log(2.0)}
    if jsonl:
        result["text_field"] = text_field
    if streaming:
        result["streaming"] = {"sink_tokens": sink_tokens}
    else:
        result["stride"] = stride
    return result


def _print_progress(unit: str) -> Callable[[int, int], None]:
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < 2.0:
            return
        last[0] = now
        print(f"python -m lckv.eval: {done}/{total} {unit}", file=sys.stderr)

    return report


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lckv.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (config.json, model.safetensors)")
    inputs = ap.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--data", help="directory written by lckv-prepare")
    inputs.add_argument("--text", nargs="+", help="text files, one document each")
    inputs.add_argument("--jsonl", nargs="+", help="JSONL files, one document per line (--text-field)")
    ap.add_argument("--split", choices=["val", "train"], help="(--data) default val")
    ap.add_argument("--seq-len", type=int, help="(--data) tokens per window, default 256")
    ap.add_argument("--max-batches", type=int, help="(--data) 0 (default): the whole split")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--text-field", help="(--jsonl) the records' text field, default text")
    ap.add_argument("--tokenizer", help="(--text/--jsonl) SentencePiece model (default: <model>/tokenizer.model)")
    ap.add_argument("--context", type=int, help="(--text/--jsonl) ids per window (default: max_position_embeddings)")
    ap.add_argument("--stride", type=int, help="(--text/--jsonl) predictions a window moves on by (default: context)")
    ap.add_argument("--streaming", action="store_true", help="(--text/--jsonl) token by token, StreamingLLM cache")
    ap.add_argument("--sink-tokens", type=int, help="(--streaming) sink tokens kept, default 4")
    ap.add_argument("--dtype", default="auto", choices=list(_C.compute_dtype_names()),
                    help="auto (default): bf16 where this CPU computes it natively (AMX, avx512_bf16), else fp32")
    ap.add_argument("--prefill", default="iterative", choices=["iterative", "exact"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    texts = args.text or args.jsonl
    # Options of the other kind of input are refused, not ignored (as lckv-eval does).
    wrong = ([("--split", args.split), ("--seq-len", args.seq_len), ("--max-batches", args.max_batches)] if texts else
             [("--text-field", args.text_field), ("--tokenizer", args.tokenizer), ("--context", args.context),
              ("--stride", args.stride), ("--streaming", args.streaming or None), ("--sink-tokens", args.sink_tokens)])
    if args.text and args.text_field is not None:
        wrong.append(("--text-field", args.text_field))
    if args.sink_tokens is not None and not args.streaming:
        wrong.append(("--sink-tokens", args.sink_tokens))
    for name, value in wrong:
        if value is not None:
            ap.error(f"{name} does not apply to these inputs")
    try:
        torch.set_num_threads(args.threads)
        model = LCKVForCausalLM.from_pretrained(args.model)
        if texts:
            result = {"model": args.model, **evaluate_text(
                model, texts, args.tokenizer or _C.checkpoint_tokenizer(args.model), jsonl=bool(args.jsonl),
                text_field=args.text_field or "text", context=args.context, stride=args.stride,
                batch_size=args.batch_size, dtype=args.dtype, prefill=args.prefill, streaming=args.streaming,
                sink_tokens=4 if args.sink_tokens is None else args.sink_tokens,
                progress=_print_progress("documents" if args.streaming else "windows"))}
        else:
            result = {"model": args.model, **evaluate(
                model, args.data, split=args.split or "val", seq_len=args.seq_len or 256, batch_size=args.batch_size,
                max_batches=args.max_batches or 0, dtype=args.dtype, prefill=args.prefill)}
    except (_C.TrainError, _C.ConfigError, _C.CheckpointError, RuntimeError, OSError, ValueError) as e:
        print(f"python -m lckv.eval: error: {e}", file=sys.stderr)
        return 1
    result["threads"] = args.threads
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
