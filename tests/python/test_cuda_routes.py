"""scripts/make_cuda_routes.py: a GPU run's lckv-bench-attention JSON -> the routes `auto` takes on CUDA
(csrc/lckv/ops/cuda_routes.h). The C++ side reads the same fixture's output (tests/cpp/test_sdpa_backend.cpp)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "make_cuda_routes.py"
FIXTURE = ROOT / "tests" / "data" / "cuda_routes"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_fixture_gives_the_routes_the_cpp_test_reads(tmp_path):
    out = tmp_path / "routes.inc"
    r = run(FIXTURE / "bench_attention_kernels.json", "--cuda-tests", "passed", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "10 points (5 to our kernels)" in r.stdout
    assert out.read_text() == (FIXTURE / "routes.inc").read_text()


def test_refuses_a_run_whose_cuda_tests_failed(tmp_path):
    r = run(FIXTURE / "bench_attention_kernels.json", "--cuda-tests", "failed", "--out", tmp_path / "x.inc")
    assert r.returncode == 2 and "[cuda] tests of that run did not pass" in r.stderr
    assert not (tmp_path / "x.inc").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda b: b.pop("sm"), r"the JSON: field 'sm' is missing"),
    (lambda b: b["attention"][1].pop("fwd_ratio"), r"attention\[1\]: field 'fwd_ratio' is missing"),
    (lambda b: b["decode"][0].update(ratio="fast"), r"decode\[0\]: field 'ratio' must be a number, got 'fast'"),
    (lambda b: b.update(benchmark="train_step"), r"not an lckv-bench-attention result"),
    (lambda b: b.update(dtype="int8"), r"dtype 'int8' is not one of"),
    (lambda b: (b.pop("attention"), b.pop("decode")), r"no attention or decode rows"),
])
def test_bad_input_is_named(tmp_path, edit, message):
    bench = json.loads((FIXTURE / "bench_attention_kernels.json").read_text())
    edit(bench)
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(bench))
    r = run(src, "--cuda-tests", "passed", "--out", tmp_path / "x.inc")
    assert r.returncode == 2
    assert re.search(message, r.stderr), r.stderr


def test_unreadable_json_is_named(tmp_path):
    src = tmp_path / "bench.json"
    src.write_text("{not json")
    r = run(src, "--cuda-tests", "passed", "--out", tmp_path / "x.inc")
    assert r.returncode == 2 and str(src) in r.stderr
