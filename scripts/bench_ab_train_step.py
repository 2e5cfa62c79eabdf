#!/usr/bin/env python3
"""Before/after training-step benchmark of two builds, in alternating processes.

The machines drift ~2x between runs, so a change is measured against the build before it in one session:
build the earlier commit in a worktree (git worktree add ../base <commit>; build its lckv-bench-train-step),
then

    scripts/bench_ab_train_step.py --before ../base/build --after build --rounds 3

runs `lckv-bench-train-step` (the quickstart Llama and LCKV w=2 configs, 2 threads, dtype auto) from each build
in turn, round after round, at T=128 (batch 16) and T=512 (batch 4), and writes every round's JSON plus the
after/before step-time ratios (median over rounds, and each round's) to bench/results/.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["configs/quickstart-llama.json", "configs/quickstart-lckv-w2.json"]
SHAPES = [(128, 16), (512, 4)]


def run(build: Path, seq: int, batch: int, steps: int, profiled: int, env: Optional[dict] = None) -> dict:
    """One lckv-bench-train-step run of the two configs; `env` replaces the environment (default: this one, with
    OMP_WAIT_POLICY=PASSIVE where unset)."""
    exe = build / "lckv-bench-train-step"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [str(exe), "--configs", *CONFIGS, "--seq-len", str(seq), "--batch", str(batch), "--threads", "2",
               "--dtype", "auto", "--steps", str(steps), "--warmup", "1", "--profiled-steps", str(profiled),
               "--out", str(out)]
        if env is None:
            env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(out.read_text())


def write_json_atomic(out: Path, result: dict) -> None:
    """Writes result to out through a temporary file: a killed run leaves the previous file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


def summary(r: dict) -> dict:
    return {"matmul_gflop_per_s": r["matmul_gflop_per_s"], "dtype": r["dtype"],
            "runs": [{k: x[k] for k in ("config", "median_step_s", "fraction_of_matmul_rate", "attention_share",
                                        "tokens_per_s")} for x in r["runs"]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, type=Path, help="build directory of the earlier commit")
    ap.add_argument("--after", required=True, type=Path, help="build directory of the change")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per config and run")
    ap.add_argument("--profiled-steps", type=int, default=1, help="steps timing the attention share")
    ap.add_argument("--note", default="", help="what before and after are")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/train_step_ab_<dtype>_<date>.json)")
    args = ap.parse_args()
    for b in (args.before, args.after):
        if not (b / "lckv-bench-train-step").is_file():
            sys.exit(f"bench_ab_train_step: {b / 'lckv-bench-train-step'} does not exist: build that directory first")
    result = {"benchmark": "train_step_ab", "note": args.note, "threads": 2, "before": str(args.before),
              "after": str(args.after), "shapes": []}
    for seq, batch in SHAPES:
        rounds = []
        for i in range(args.rounds):
            rnd = {}
            for which in ("after", "before") if i % 2 == 0 else ("before", "after"):
                rnd[which] = summary(run(getattr(args, which), seq, batch, args.steps, args.profiled_steps))
            rounds.append(rnd)
            print(f"T={seq} round {i + 1}: " + ", ".join(
                f"{Path(x['config']).stem} after/before "
                f"{x['median_step_s'] / y['median_step_s']:.3f}"
                for x, y in zip(rnd["after"]["runs"], rnd["before"]["runs"])), flush=True)
        ratios = {}
        for j, config in enumerate(CONFIGS):
            per_round = [r["after"]["runs"][j]["median_step_s"] / r["before"]["runs"][j]["median_step_s"] for r in rounds]
            ratios[config] = {"after_over_before_step_time_median": statistics.median(per_round),
                              "per_round": per_round}
        result["shapes"].append({"seq_len": seq, "batch": batch, "rounds": rounds, "step_time_ratios": ratios})
        result["dtype"] = rounds[0]["after"]["dtype"]
    out = args.out or ROOT / "bench" / "results" / f"train_step_ab_{result['dtype']}_{datetime.date.today():%Y%m%d}.json"
    write_json_atomic(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
