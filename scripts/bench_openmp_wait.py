#!/usr/bin/env python3
"""What the OpenMP wait policy costs a training step, on an idle machine and next to one busy process.

lckv's programs make idle OpenMP workers sleep (OMP_WAIT_POLICY=PASSIVE): libgomp's default spin made training
next to one other busy process 4.7-12x slower. Sleeping has its own price: every parallel region wakes the
workers again, and on a VM an idle core can take ~80 us to wake (a 2048 x 256 bf16 add: 20 us on one thread,
100 us on two passive ones). This runs `lckv-bench-train-step` (quickstart Llama and LCKV w=2, 2 threads, dtype
auto, T=128 batch 16 and T=512 batch 4) under each policy in turn, round after round, first alone and then
beside a process that keeps one core busy, and writes every round plus the step-time ratios against PASSIVE to
bench/results/openmp_wait_<dtype>_<date>.json.

    scripts/bench_openmp_wait.py --rounds 2
"""
import argparse
import datetime
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_ab_train_step import CONFIGS, ROOT, SHAPES, run, summary, write_json_atomic

# name -> environment overrides. "spin" is a bounded spin: workers poll ~10000 times (tens to hundreds of
# microseconds, by the CPU's pause latency) before they sleep; libgomp's default is 300000.
POLICIES = {
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin10000": {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "10000"},
}


def environment(overrides: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(overrides)
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, default=ROOT / "build", help="build directory")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per config and run")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/openmp_wait_<dtype>_<date>.json)")
    args = ap.parse_args()
    if not (args.build / "lckv-bench-train-step").is_file():
        sys.exit(f"bench_openmp_wait: {args.build / 'lckv-bench-train-step'} does not exist: build it first")
    result = {"benchmark": "openmp_wait", "threads": 2, "cpus": os.cpu_count(), "policies": POLICIES,
              "scenarios": []}
    for neighbour in (False, True):
        # The neighbour: one process spinning on one core for the whole scenario.
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if neighbour else None
        try:
            for seq, batch in SHAPES:
                rounds = []
                for i in range(args.rounds):
                    order = list(POLICIES) if i % 2 == 0 else list(reversed(POLICIES))
                    rnd = {name: summary(run(args.build, seq, batch, args.steps, 0, environment(POLICIES[name])))
                           for name in order}
                    rounds.append(rnd)
                    print(f"busy neighbour {neighbour}, T={seq} round {i + 1}: " + ", ".join(
                        f"{name} {Path(x['config']).stem} {x['median_step_s']:.3f} s"
                        for name in POLICIES for x in rnd[name]["runs"]), flush=True)
                ratios = {}
                for j, config in enumerate(CONFIGS):
                    ratios[config] = {
                        f"{name}_over_passive_step_time_median": statistics.median(
                            r[name]["runs"][j]["median_step_s"] / r["passive"]["runs"][j]["median_step_s"]
                            for r in rounds)
                        for name in POLICIES if name != "passive"}
                result["scenarios"].append({"busy_neighbour": neighbour, "seq_len": seq, "batch": batch,
                                            "rounds": rounds, "step_time_ratios": ratios})
                result["dtype"] = rounds[0]["passive"]["dtype"]
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    out = args.out or ROOT / "bench" / "results" / f"openmp_wait_{result['dtype']}_{datetime.date.today():%Y%m%d}.json"
    write_json_atomic(out, result)
    for s in result["scenarios"]:
        print(f"busy neighbour {s['busy_neighbour']}, T={s['seq_len']}: "
              + ", ".join(f"{Path(c).stem} {v}" for c, v in s["step_time_ratios"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
