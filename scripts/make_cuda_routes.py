#!/usr/bin/env python3
"""The measured CUDA routes (csrc/lckv/ops/cuda_routes.h) from a GPU run of scripts/gpu_check.sh: which
shapes the `auto` backend sends to our CUDA kernels instead of PyTorch's SDPA.

    python3 scripts/make_cuda_routes.py bench/results/bench_attention_kernels_<card>_<day>.json \\
        --cuda-tests passed [--out csrc/lckv/ops/cuda_routes_measured.inc]

A point says ours where our kernel beat SDPA on the same work (forward: fwd_ratio = SDPA ms / ours >= 1 and
the outputs within --max-diff of SDPA's; backward: bwd_ratio >= 1; decode: ratio >= 1 and within --max-diff at
every measured batch of that context). --cuda-tests must be "passed" (gpu_check's [cuda] tests, which check
every kernel against the CPU op on every mask): without that no route goes to our kernels. Only standard
library: it runs with the GPU machine's python3.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "csrc" / "lckv" / "ops" / "cuda_routes_measured.inc"
DTYPES = {"bf16": "c10::ScalarType::BFloat16", "fp16": "c10::ScalarType::Half", "fp32": "c10::ScalarType::Float"}


def fail(message):
    print(f"make_cuda_routes: {message}", file=sys.stderr)
    sys.exit(2)


def need(row, key, where):
    if key not in row:
        fail(f"{where}: field '{key}' is missing")
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(f"{where}: field '{key}' must be a number, got {value!r}")
    return value


def points_from(bench, max_diff):
    """[(kind, head_dim, size, ours_faster)] of one lckv-bench-attention JSON (its kernels part)."""
    points = []
    for i, row in enumerate(bench.get("attention", [])):
        where = f"attention[{i}]"
        D, T = int(need(row, "D", where)), int(need(row, "T", where))
        correct = need(row, "max_abs_diff_vs_sdpa", where) <= max_diff
        points.append(("kForward", D, T, correct and need(row, "fwd_ratio", where) >= 1.0))
        points.append(("kBackward", D, T, correct and need(row, "bwd_ratio", where) >= 1.0))
    by_context = {}
    for i, row in enumerate(bench.get("decode", [])):
        where = f"decode[{i}]"
        key = (int(need(row, "D", where)), int(need(row, "context", where)))
        ok = need(row, "ratio", where) >= 1.0 and need(row, "max_abs_diff_vs_sdpa", where) <= max_diff
        by_context[key] = by_context.get(key, True) and ok
    points += [("kDecode", D, S, ok) for (D, S), ok in sorted(by_context.items())]
    return points


def render(bench, points, source):
    lines = ["// Measured CUDA routes (cuda_routes.h), written by scripts/make_cuda_routes.py from a GPU run's",
             "// lckv-bench-attention JSON; each line: {kind, sm, dtype, head_dim, size, ours_faster}.",
             f"// From {source}: {bench.get('card', 'unknown card')}, {bench.get('date', 'unknown date')}, "
             f"torch {bench.get('torch', '?')}."]
    sm = int(need(bench, "sm", "the JSON"))
    dtype = DTYPES[bench.get("dtype", "bf16")]
    for kind, D, size, ours in points:
        lines.append(f"{{CudaRouteKind::{kind}, {sm}, {dtype}, {D}, {size}, {'true' if ours else 'false'}}},")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_json", type=Path, help="lckv-bench-attention --parts kernels output of the GPU run")
    ap.add_argument("--cuda-tests", required=True, choices=["passed", "failed"],
                    help="how that run's [cuda] tests ended (gpu_check.sh's status JSON says)")
    ap.add_argument("--max-diff", type=float, default=0.05,
                    help="largest |ours - SDPA| of a bf16 output that counts as the same result")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    try:
        bench = json.loads(args.bench_json.read_text())
    except (OSError, ValueError) as e:
        fail(f"{args.bench_json}: {e}")
    if not isinstance(bench, dict) or bench.get("benchmark") != "condensed_attention_cuda":
        fail(f"{args.bench_json}: not an lckv-bench-attention result (benchmark != condensed_attention_cuda)")
    if bench.get("dtype", "bf16") not in DTYPES:
        fail(f"{args.bench_json}: dtype {bench.get('dtype')!r} is not one of {sorted(DTYPES)}")
    if args.cuda_tests != "passed":
        fail("the [cuda] tests of that run did not pass: no shape may be routed to our kernels")
    points = points_from(bench, args.max_diff)
    if not points:
        fail(f"{args.bench_json}: no attention or decode rows (run lckv-bench-attention --parts kernels)")
    text = render(bench, points, args.bench_json.name)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)  # atomic
    ours = sum(1 for p in points if p[3])
    print(f"make_cuda_routes: {len(points)} points ({ours} to our kernels) -> {args.out}")


if __name__ == "__main__":
    main()
