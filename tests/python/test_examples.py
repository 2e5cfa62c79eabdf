"""examples/own_training_loop.py: the "your own training loop" path runs, learns, and round-trips."""

import ast
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import lckv

EXAMPLE = ROOT / "examples" / "own_training_loop.py"


def run_example(tmp_path, *extra):
    out = tmp_path / "ckpt"
    # The child imports the lckv this process imported (an installed package or a PYTHONPATH tree).
    package_root = str(Path(lckv.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    r = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "12", "--seq-len", "32", "--batch-size", "2", "--threads", "1",
         "--out", str(out), *extra],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    losses = [float(x) for x in re.findall(r"^step \d+ loss (\S+)$", r.stdout, re.M)]
    assert len(losses) == 12, r.stdout
    generated = re.search(r"^prompt (\[.*\]) -> generated (\[.*\])$", r.stdout, re.M)
    assert generated, r.stdout
    return out, losses, ast.literal_eval(generated.group(1)), ast.literal_eval(generated.group(2)), r.stdout


def check_reload(out, prompt, generated):
    """The saved checkpoint, loaded here, reproduces the example's greedy continuation, and two
    loads give bit-identical logits."""
    a = lckv.LCKVForCausalLM.from_pretrained(out).eval()
    b = lckv.LCKVForCausalLM.from_pretrained(out).eval()
    assert a.config.layer_types == "0_6_6_6_6_6_6_7"
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert a.generate([prompt], max_new_tokens=len(generated)).tokens[0] == generated


def test_own_training_loop_on_random_ids(tmp_path):
    out, losses, prompt, generated, stdout = run_example(tmp_path)
    assert losses[-1] < losses[0] - 0.5, losses
    assert "max |logit difference| 0.0" in stdout
    check_reload(out, prompt, generated)


WORDS = "in the beginning god created the heaven and the earth and the earth was without form and void".split()


def test_own_training_loop_on_prepared_data(tmp_path):
    rng = random.Random(0)
    text = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) for _ in range(300))
    (tmp_path / "text.txt").write_text(text + "\n")
    lckv.data.prepare_corpus([str(tmp_path / "text.txt")], str(tmp_path / "data"), vocab_size=320, val_fraction=0.05)
    out, losses, prompt, generated, stdout = run_example(tmp_path, "--data", str(tmp_path / "data"))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    assert "max |logit difference| 0.0" in stdout
    assert lckv.LCKVConfig.from_pretrained(out).vocab_size == lckv.data.read_prepared(str(tmp_path / "data"))["vocab_size"]
    check_reload(out, prompt, generated)
