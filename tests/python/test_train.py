"""python -m lckv.train, and parity with lckv-train's checkpoints and losses."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

import lckv
import lckv.eval
from lckv import LCKVForCausalLM
import torch
from lckv.train import Trainer, main, parse_options

BUILD = Path(os.environ.get("LCKV_BUILD_DIR", ROOT / "build"))

WORDS = ("the lord said unto moses and aaron speak to the children of israel saying this is the thing "
         "which commanded when ye come into land give you then shall bring sheaf first fruits harvest").split()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny corpus prepared by the library behind lckv-prepare, and a tiny model config."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) + "." for _ in range(600)]
    (d / "text.txt").write_text("\n\n".join(paragraphs) + "\n")
    lckv.data.prepare_corpus([str(d / "text.txt")], str(d / "data"), vocab_size=320, val_fraction=0.05)
    config = {"vocab_size": 320, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "layer_types": "0_3_3_3",
              "forward_passes": 2, "backward_passes": 2, "max_position_embeddings": 64}
    (d / "model.json").write_text(json.dumps(config))
    return d


def run_file(prepared, out, **overrides):
    fields = {"model_config": str(prepared / "model.json"), "data": str(prepared / "data"), "out": str(out),
              "seq_len": 32, "batch_size": 4, "max_steps": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 0,
              "save_every": 0, "log_every": 1, "dtype": "fp32", "threads": 1, "seed": 7}
    fields.update(overrides)
    path = out.parent / f"{out.name}.run.json"
    path.write_text(json.dumps(fields))
    return path


def records(path, kind):
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if r["type"] == kind]


def test_python_training_reduces_the_loss_and_writes_a_checkpoint(prepared, tmp_path):
    out = tmp_path / "py"
    assert main(["--config", str(run_file(prepared, out)), "--max-steps", "10"]) == 0
    train = records(out / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == list(range(1, 11))
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, [r["loss"] for r in train]
    assert records(out / "metrics.jsonl", "eval")[-1]["step"] == 10
    model = LCKVForCausalLM.from_pretrained(out / "step_000010")
    assert model.config.layer_types == "0_3_3_3"
    assert (out / "step_000010" / "optimizer.pt").is_file() and (out / "latest").read_text() == "step_000010\n"


def test_options_are_lckv_trains(prepared, tmp_path):
    o = parse_options(["--config", str(run_file(prepared, tmp_path / "o")), "--lr", "0.01", "--no-resume"])
    assert o.lr == 0.01 and o.seq_len == 32 and o.beta2 == 0.95 and not o.resume  # flag > run file > default
    # Every field of the C++ option table is a flag here, with its help text.
    names = {f["name"] for f in lckv._C.train_option_fields()}
    assert names == set(json.loads(o.to_json())) and {"seq_len", "allow_changes", "prompt"} <= names
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_config": "m", "data": "d", "out": "o", "learning_rate": 1}))
    with pytest.raises(lckv.TrainError, match="unknown field 'learning_rate'"):
        parse_options(["--config", str(bad)])
    bad.write_text(json.dumps({"model_config": "m", "data": "d", "out": "o", "grad_accum": 8.9}))
    with pytest.raises(lckv.TrainError, match=r"bad.json.*'grad_accum': expected an integer.*8.9"):
        parse_options(["--config", str(bad)])
    with pytest.raises(lckv.TrainError, match=r"flags: field 'grad_accum': expected an integer in \[.*4294967304"):
        parse_options(["--config", str(run_file(prepared, tmp_path / "g")), "--grad-accum", str(2**32 + 8)])
    with pytest.raises(lckv.TrainError, match="data"):
        parse_options(["--model-config", "m", "--out", "o"])


def strip_timing(recs):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in recs]


def test_lckv_train_and_python_m_lckv_train_write_the_same_run(prepared, tmp_path):
    """The same run file through lckv-train and python -m lckv.train: the same metrics records
    (losses bitwise; only the timings differ), bit-identical weights and the same trainer states."""
    exe = BUILD / "lckv-train"
    if not exe.exists():
        pytest.skip(f"{exe} is not built (set LCKV_BUILD_DIR)")
    rf = run_file(prepared, tmp_path / "run", max_steps=6, eval_every=3, log_every=2, save_every=3)
    cpp, py = tmp_path / "cpp", tmp_path / "py"
    subprocess.run([str(exe), "--config", str(rf), "--out", str(cpp)], check=True, capture_output=True, cwd=ROOT)
    r = subprocess.run([sys.executable, "-m", "lckv.train", "--config", str(rf), "--out", str(py)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    cpp_recs = list(map(json.loads, (cpp / "metrics.jsonl").read_text().splitlines()))
    py_recs = list(map(json.loads, (py / "metrics.jsonl").read_text().splitlines()))
    assert [x["type"] for x in cpp_recs] == ["run", "train", "eval", "train", "train", "eval"]
    assert strip_timing(py_recs) == strip_timing(cpp_recs)
    for step in ("step_000003", "step_000006"):
        assert (py / step / "model.safetensors").read_bytes() == (cpp / step / "model.safetensors").read_bytes()
        # optimizer.pt is a zip archive with a per-write record id: compare the trainer states instead.
        states = [json.loads((d / step / "trainer_state.json").read_text()) for d in (py, cpp)]
        for s in states:
            del s["elapsed_s"], s["options"]["out"]
        assert states[0] == states[1]
    assert json.loads((py / "train.json").read_text())["out"] == str(py)


def test_python_optimizer_and_callback_through_the_cpp_trainer(prepared, tmp_path):
    """The seams: a torch.optim optimizer and a per-step callback; the run checkpoints the
    optimizer's state_dict, resumes exactly with it, and refuses to resume with another kind."""
    out = tmp_path / "sgd"
    options = json.loads(run_file(prepared, out, max_steps=4).read_text())
    make = lambda model: torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)  # noqa: E731
    whole = []
    Trainer({**options, "out": str(tmp_path / "whole")}, optimizer=make, log=False).run(lambda s: whole.append(s.loss))
    assert len(whole) == 4

    first = Trainer({**options, "max_steps": 4}, optimizer=make, log=False)
    seen = []
    for _ in range(2):
        seen.append(first.train_step().loss)
    first.save_checkpoint()
    assert torch.load(out / "step_000002" / "optimizer.pt", weights_only=True)["state"], "momentum buffers saved"
    del first
    resumed = Trainer({**options, "resume": True}, optimizer=make, log=False)
    assert resumed.step == 2
    resumed.run(lambda s: seen.append(s.loss))
    assert seen == whole  # bitwise: weights, momentum and data position restored
    with pytest.raises(lckv.TrainError, match="in use by another process"):  # the run still holds out's lock
        Trainer({**options, "resume": True}, optimizer=make, log=False)
    del resumed
    with pytest.raises(lckv.TrainError, match=r"optimizer 'python:torch.optim.sgd.SGD'.*'adamw'"):
        Trainer({**options, "resume": True, "max_steps": 6, "allow_changes": ["max_steps"]}, log=False)


def test_the_trainer_model_is_the_trained_module(prepared, tmp_path):
    t = Trainer(json.loads(run_file(prepared, tmp_path / "m", max_steps=2).read_text()), log=False)
    before = t.model.state_dict()["model.norm.weight"].clone()
    t.train_step()
    assert not torch.equal(before, t.model.state_dict()["model.norm.weight"])
    assert isinstance(t.model, torch.nn.Module) and t.total_steps == 2


def test_example_perplexity_and_kv_convergence_plot(prepared, tmp_path):
    out = tmp_path / "run"
    assert main(["--config", str(run_file(prepared, out)), "--max-steps", "2"]) == 0
    png = tmp_path / "kv.png"
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "perplexity_and_convergence.py"), "--checkpoint", str(out / "step_000002"),
         "--data", str(prepared / "data"), "--text", str(prepared / "text.txt"), "--seq-len", "16", "--iterations", "6",
         "--threads", "1", "--out", str(png)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "layer 3: 1->2:" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- data parallelism: two Gloo processes over 127.0.0.1, launched by torchrun


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, timeout=240):
    """torchrun (from this Python) with 2 processes on 127.0.0.1; returns the CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT / "python") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port())] + args
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def max_relative_difference(a_dir, b_dir):
    from safetensors.torch import load_file
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).norm() / b[k].double().norm()).item() for k in a)


def test_torchrun_runs_both_trainers_as_one_data_parallel_run(prepared, tmp_path):
    """Under torchrun, python -m lckv.train and lckv-train train one model together (rank 0 writes
    each metrics record once) and end where one process with the whole batch ends."""
    one = tmp_path / "one"
    run = run_file(prepared, one, max_steps=5, grad_accum=2, bucket_mb=0.01, dist_timeout_s=60)
    subprocess.run([str(BUILD / "lckv-train"), "--config", str(run)], check=True, capture_output=True, timeout=240)
    for name, launch in (("py", ["-m", "lckv.train"]), ("cpp", ["--no-python", str(BUILD / "lckv-train")])):
        out = tmp_path / name
        r = torchrun(launch + ["--config", str(run), "--out", str(out), "--shard-optimizer"])
        assert r.returncode == 0, r.stderr[-3000:]
        train = records(out / "metrics.jsonl", "train")
        assert [t["step"] for t in train] == [1, 2, 3, 4, 5]
        assert all(t["world_size"] == 2 for t in train)
        for a, b in zip(records(one / "metrics.jsonl", "train"), train):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        # fp32 rounding of the two reduction orders (two ranks' partial sums vs one batch): 1.1e-6 seen on an
        # AVX2-only CPU, whose MKL kernels sum in another order; a wrong average or a lost shard moves the
        # weights by >= 1e-3 (an Adam step is lr = 3e-3 per element).
        assert max_relative_difference(one / "step_000005", out / "step_000005") <= 1e-5


def test_ddp_around_the_model_in_two_gloo_processes(tmp_path):
    """examples/ddp_training_loop.py: DistributedDataParallel(lckv.LCKVForCausalLM) on 2 ranks equals one
    process with the whole batch, and every run exits cleanly (it destroys its process group; without
    that, an exit can abort with "terminate called without an active exception"). LCKV_SLOW_TESTS=1
    repeats it."""
    for _ in range(5 if os.environ.get("LCKV_SLOW_TESTS") == "1" else 1):
        r = torchrun([str(ROOT / "examples" / "ddp_training_loop.py"), "--steps", "3"])
        assert r.returncode == 0, r.stderr[-3000:]
        assert "ranks agree: max |difference| 0;" in r.stdout, r.stdout
        assert "terminate called" not in r.stderr


def test_resume_from_python_refuses_result_changing_options_by_name(prepared, tmp_path):
    out = tmp_path / "r"
    rf = run_file(prepared, out, max_steps=2)
    assert main(["--config", str(rf)]) == 0
    with pytest.raises(lckv.TrainError, match=r"lr: 0.003 -> 0.01.*seed: 7 -> 8.*--allow-changes"):
        Trainer({**json.loads(rf.read_text()), "resume": True, "lr": 0.01, "seed": 8, "max_steps": 3,
                 "allow_changes": ["max_steps"]}, log=False)
    with pytest.raises(lckv.TrainError, match="nothing to train.*step 2"):
        Trainer({**json.loads(rf.read_text()), "resume": True}, log=False)
    assert main(["--config", str(rf), "--resume"]) == 1  # the same, from the command line: exit 1, no traceback
    t = Trainer({**json.loads(rf.read_text()), "resume": True, "max_steps": 3, "allow_changes": ["max_steps"]},
                log=False)
    assert t.step == 2 and t.run().step == 3


def test_lckv_eval_and_python_m_lckv_eval_reproduce_the_trainers_validation_exactly(prepared, tmp_path):
    out = tmp_path / "e"
    assert main(["--config", str(run_file(prepared, out, max_steps=3))]) == 0
    final = records(out / "metrics.jsonl", "eval")[-1]
    args = ["--model", str(out / "step_000003"), "--data", str(prepared / "data"), "--seq-len", "32",
            "--batch-size", "4", "--dtype", "fp32", "--threads", "1"]
    r = subprocess.run([sys.executable, "-m", "lckv.eval", *args], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["loss"] == final["val_loss"]  # bitwise: the same C++ computation
    exe = BUILD / "lckv-eval"
    if exe.exists():
        r = subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["loss"] == final["val_loss"]
        bad = subprocess.run([str(exe), "--model", str(tmp_path / "none"), "--data", str(prepared / "data")],
                             capture_output=True, text=True)
        assert bad.returncode == 1 and "none" in bad.stderr and "config.json" in bad.stderr
    exact = lckv.eval.evaluate(LCKVForCausalLM.from_pretrained(out / "step_000003"), str(prepared / "data"),
                               seq_len=32, batch_size=4, dtype="fp32", prefill="exact")
    assert abs(exact["loss"] - final["val_loss"]) < 0.5 and exact["tokens"] == json.loads(r.stdout)["tokens"]
    with pytest.raises(ValueError, match="split must be"):
        lckv.eval.evaluate(LCKVForCausalLM.from_pretrained(out / "step_000003"), str(prepared / "data"), split="test")
