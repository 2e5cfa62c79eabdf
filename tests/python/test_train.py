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
from lckv import LCKVForCausalLM
from lckv.train import PythonTrainer, main, parse_options

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


def test_options_are_lckv_trains(prepared, tmp_path):
    o = parse_options(["--config", str(run_file(prepared, tmp_path / "o")), "--lr", "0.01", "--no-resume"])
    assert o["lr"] == 0.01 and o["seq_len"] == 32 and o["beta2"] == 0.95  # flag > run file > default
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_config": "m", "data": "d", "out": "o", "learning_rate": 1}))
    with pytest.raises(lckv.TrainError, match="unknown field 'learning_rate'"):
        parse_options(["--config", str(bad)])
    with pytest.raises(lckv.TrainError, match="data"):
        parse_options(["--model-config", "m", "--out", "o"])
    with pytest.raises(lckv.TrainError, match="resume"):
        parse_options(["--config", str(run_file(prepared, tmp_path / "r")), "--resume"])


def test_lckv_train_checkpoint_gives_the_cpp_losses_in_python(prepared, tmp_path):
    """A run of the C++ trainer and the Python trainer with the same run file: the same initial
    weights and batch give the same first loss, and lckv-train's final checkpoint loaded in Python
    gives bit-identical logits, hence exactly the validation loss lckv-train computed."""
    exe = BUILD / "lckv-train"
    if not exe.exists():
        pytest.skip(f"{exe} is not built (set LCKV_BUILD_DIR)")
    out = tmp_path / "cpp"
    rf = run_file(prepared, out, max_steps=3)
    subprocess.run([str(exe), "--config", str(rf)], check=True, capture_output=True, cwd=ROOT)
    cpp_train = records(out / "metrics.jsonl", "train")
    cpp_eval = records(out / "metrics.jsonl", "eval")[-1]

    trainer = PythonTrainer(parse_options(["--config", str(rf), "--out", str(tmp_path / "py")]))
    assert trainer.train_step()["loss"] == cpp_train[0]["loss"]

    trainer.model = LCKVForCausalLM.from_pretrained(out / "step_000003")
    assert trainer.evaluate()["val_loss"] == cpp_eval["val_loss"]


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
