#!/usr/bin/env bash
# Data-parallel training on this machine: tokens/s of lckv-train at 1 and 2 ranks (Gloo over
# 127.0.0.1, same global batch, the same cores split between the ranks), and the gradient bytes
# all-reduced per step against the parameter bytes, for several iteration counts (m, b) to show they
# do not depend on them (LCKV's iterations multiply compute, not communication). Synthetic tokens;
# a tiny LCKV model (configs/tiny-lckv-w2.json). JSON into bench/results/.
#   LCKV_BENCH_STEPS (default 12) steps per run; extra flags go to every lckv-train run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${LCKV_PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p bench/results
out=bench/results/distributed_cpu_$(date +%Y%m%d).json
"$PY" - "$out" "${LCKV_BENCH_STEPS:-12}" "$@" <<'EOF'
import json, os, socket, struct, subprocess, sys, tempfile, time
from pathlib import Path

out, steps, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
binary = str(Path("build/lckv-train").resolve())
cores = os.cpu_count() or 2
tmp = Path(tempfile.mkdtemp(prefix="lckv_bench_dist_"))

# Shards as lckv-prepare writes them (uint16 tokens, 64-byte header), random ids.
import random
rng = random.Random(0)
vocab = 512
data = tmp / "data"
data.mkdir()
def shard(name, n):
    tokens = [rng.randrange(3, vocab) for _ in range(n)]
    with open(data / name, "wb") as f:
        f.write(b"LCKVTOK\0" + struct.pack("<IIQI", 1, 1, n, vocab) + b"\0" * 36 + struct.pack(f"<{n}H", *tokens))
shard("train_000000.bin", 400_000)
shard("val_000000.bin", 20_000)
(data / "meta.json").write_text(json.dumps({"tokenizer": "tokenizer.model", "vocab_size": vocab, "eos_id": 2,
                                            "train_shards": ["train_000000.bin"], "val_shards": ["val_000000.bin"]}))

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def run(ranks, m, b, shard_opt=False, threads=None):
    threads = threads or max(1, cores // ranks)
    cfg = json.loads(Path("configs/tiny-lckv-w2.json").read_text())
    cfg.update(vocab_size=vocab, forward_passes=m, backward_passes=b)
    name = f"r{ranks}_t{threads}_m{m}_b{b}{'_shard' if shard_opt else ''}"
    (tmp / f"{name}.json").write_text(json.dumps(cfg))
    args = [binary, "--model-config", str(tmp / f"{name}.json"), "--data", str(data), "--out", str(tmp / name),
            "--seq-len", "128", "--batch-size", "8", "--max-steps", str(steps), "--eval-every", "0", "--save-every",
            "0", "--log-every", "1", "--dtype", "bf16", "--threads", str(threads)] + extra
    if shard_opt:
        args.append("--shard-optimizer")
    port, procs = free_port(), []
    for r in range(ranks):
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        if ranks > 1:
            env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            sys.exit(f"{name}: lckv-train failed ({p.returncode}):\n{err}")
    recs = [json.loads(l) for l in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    run_rec = next(r for r in recs if r["type"] == "run")
    train = [r for r in recs if r["type"] == "train"][2:]  # the first steps warm up
    tok_s = sum(r["tokens_per_s"] for r in train) / len(train)
    res = {"ranks": ranks, "forward_passes": m, "backward_passes": b, "shard_optimizer": shard_opt,
           "threads_per_rank": threads, "tokens_per_step": run_rec["tokens_per_step"],
           "tokens_per_s": round(tok_s, 1), "params": run_rec["params"], "param_bytes_fp32": 4 * run_rec["params"]}
    if ranks > 1:
        res["bytes_all_reduced_per_step"] = train[-1]["bytes_reduced_per_step"]
        res["ratio_to_param_bytes"] = round(res["bytes_all_reduced_per_step"] / res["param_bytes_fp32"], 4)
        res["optimizer_state_bytes_rank0"] = train[-1]["optimizer_state_bytes"]
    print(json.dumps(res), flush=True)
    return res

results = [run(1, 2, 1), run(1, 2, 1, threads=1), run(2, 2, 1), run(2, 2, 1, shard_opt=True), run(1, 4, 2),
           run(2, 4, 2)]
summary = {"machine": f"{cores} CPU cores, Gloo over 127.0.0.1", "model": "configs/tiny-lckv-w2.json (vocab 512)",
           "seq_len": 128, "global_batch": 8, "steps": steps, "runs": results,
           "load_average": os.getloadavg(),
           "note": "2 ranks share the same cores as 1 rank (threads split), so tokens/s cannot rise in principle: "
                   "the comparison shows the cost of the all-reduce and of splitting the batch, and on a shared, "
                   "loaded machine 1 process with 2 OpenMP threads suffers most (its threads wait for each other); "
                   "bytes all-reduced per step equal the fp32 parameter bytes (plus bucket padding) for every (m, b)."}
Path(out).write_text(json.dumps(summary, indent=2) + "\n")
print(f"wrote {out}")
EOF
