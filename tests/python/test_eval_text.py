"""lckv-eval / python -m lckv.eval on text and JSONL files: the sliding-window policy, exactness
against an independent per-window computation, StreamingLLM, and the bad-input errors."""

import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_config

import lckv
import lckv.eval
from lckv import LCKVForCausalLM, _C

BUILD = Path(os.environ.get("LCKV_BUILD_DIR", ROOT / "build"))
WORDS = "in the beginning god created the heaven and earth and the earth was without form and void".split()


def reference_windows(n, context, stride):
    """The documented policy, written independently: predictions 1..n-1; the first window scores the
    first `context` of them, each next one the next `stride`, from a window of at most `context` ids."""
    out, first = [], 1
    while first < n:
        last = min(n - 1, first + (context if first == 1 else stride) - 1)  # predictions [first, last]
        out.append((max(0, last - context), last, last - first + 1))  # ids [begin, last) predict ..last
        first = last + 1
    return out


def test_sliding_windows_score_every_prediction_once_with_the_stated_context():
    for n in range(0, 30):
        for context in range(1, 9):
            for stride in range(1, context + 1):
                windows = _C.sliding_windows(n, context, stride)
                assert windows == reference_windows(n, context, stride)
                scored = []
                for i, (begin, end, k) in enumerate(windows):
                    assert 0 < end - begin <= context and 1 <= k <= end - begin
                    scored += range(end - k + 1, end + 1)  # the predicted positions
                    if i > 0:  # the first scored prediction sees >= context - stride ids (or all before it)
                        assert end - k + 1 - begin >= min(context - stride, end - k + 1)
                assert scored == list(range(1, n))
    with pytest.raises(ValueError, match="stride"):
        _C.sliding_windows(10, 4, 5)


def independent_loss_sum(model, documents, context, stride):
    """Per window, the sequential definition's log-probabilities of the scored targets."""
    total, count = 0.0, 0
    for doc in documents:
        for begin, end, k in reference_windows(len(doc), context, stride):
            ids = torch.tensor([doc[begin:end]])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids, sequential=True).logits[0], -1)
            targets = torch.tensor(doc[begin + 1:end + 1])
            total -= logp.gather(1, targets.view(-1, 1))[-k:].sum().item()
            count += k
    return total, count


@pytest.mark.parametrize("context,stride,batch", [(8, 3, 3), (8, 8, 2), (5, 1, 4), (40, 40, 1)])
def test_text_loss_is_exact_against_an_independent_computation_fp64(context, stride, batch):
    torch.manual_seed(0)
    model = LCKVForCausalLM(tiny_config(max_position_embeddings=40)).double().eval()
    g = torch.Generator().manual_seed(1)
    documents = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (1, 2, 7, 19, 30)]
    want_sum, want_count = independent_loss_sum(model, documents, context, stride)
    got_sum, got_count, windows = _C.text_loss_sum(model.cpp_module, documents, context, stride, batch, False, True)
    assert got_count == want_count == sum(len(d) - 1 for d in documents if d)
    assert abs(got_sum - want_sum) <= 1e-9 * max(1.0, abs(want_sum))
    assert windows == sum(len(reference_windows(len(d), context, stride)) for d in documents)


def test_streaming_equals_the_exact_windows_while_the_cache_holds_the_document():
    torch.manual_seed(0)
    model = LCKVForCausalLM(tiny_config(max_position_embeddings=40)).double().eval()
    g = torch.Generator().manual_seed(2)
    documents = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (9, 16)]
    windows = _C.text_loss_sum(model.cpp_module, documents, 16, 16, 2, False, True)
    streaming = _C.text_loss_sum(model.cpp_module, documents, 16, 16, 2, False, True, 4)
    assert streaming[1] == windows[1] and abs(streaming[0] - windows[0]) <= 1e-9
    # Beyond the cache it evicts (and still scores every prediction once).
    small = _C.text_loss_sum(model.cpp_module, documents, 6, 6, 2, False, True, 2)
    assert small[1] == windows[1] and small[0] != pytest.approx(windows[0], abs=1e-6)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("text_eval")
    rng = random.Random(0)
    (d / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(20)) for _ in range(300)))
    lckv.data.prepare_corpus([str(d / "corpus.txt")], str(d / "data"), vocab_size=300, val_fraction=0.05)
    torch.manual_seed(0)
    LCKVForCausalLM(tiny_config(vocab_size=300, max_position_embeddings=32)).save_pretrained(d / "model")
    shutil.copy(d / "data" / "tokenizer.model", d / "model" / "tokenizer.model")
    docs = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in (4, 30, 70)]
    for i, text in enumerate(docs):
        (d / f"doc{i}.txt").write_text(text)
    (d / "docs.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n\n" for i, t in enumerate(docs)))
    return d


def run(args, python=False):
    """lckv-eval, or python -m lckv.eval's main() in this process (what the module runs; no start-up)."""
    if not python:
        return subprocess.run([str(BUILD / "lckv-eval"), *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = lckv.eval.main(args)
        except SystemExit as e:  # argparse's usage errors
            code = e.code
        finally:
            torch.set_num_threads(threads)  # main() sets --threads
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_lckv_eval_text_and_jsonl_agree_with_python_and_each_other(checkpoint):
    d = checkpoint
    common = ["--model", str(d / "model"), "--context", "16", "--stride", "8", "--batch-size", "3", "--dtype", "fp32",
              "--threads", "1"]
    texts = ["--text"] + [str(d / f"doc{i}.txt") for i in range(3)]
    jsonl = ["--jsonl", str(d / "docs.jsonl"), "--text-field", "body"]
    results = []
    for python in ([False, True] if (BUILD / "lckv-eval").exists() else [True]):
        for inputs in (texts, jsonl):
            r = run(common + inputs, python)
            assert r.returncode == 0, r.stderr
            assert "windows" in r.stderr  # progress
            results.append(json.loads(r.stdout))
    assert len({r["loss"] for r in results}) == 1  # bitwise: the same C++ computation, the same documents
    r = results[-1]
    assert r["documents"] == 3 and r["context"] == 16 and r["stride"] == 8 and r["text_field"] == "body"
    tok = lckv.data.Tokenizer.load(str(d / "model" / "tokenizer.model"))
    want_tokens = sum(len(tok.encode((d / f"doc{i}.txt").read_text())) for i in range(3))
    assert r["tokens"] == want_tokens  # each document preceded by eos: every token scored once
    # In process, the same numbers.
    model = LCKVForCausalLM.from_pretrained(d / "model")
    again = lckv.eval.evaluate_text(model, [str(d / "docs.jsonl")], str(d / "model" / "tokenizer.model"), jsonl=True,
                                    text_field="body", context=16, stride=8, batch_size=3, dtype="fp32")
    assert again["loss"] == r["loss"]
    streaming = run(common[:2] + ["--context", "16", "--streaming", "--sink-tokens", "2", "--dtype", "fp32"] + texts,
                    True)
    assert streaming.returncode == 0, streaming.stderr
    s = json.loads(streaming.stdout)
    assert s["streaming"] == {"sink_tokens": 2} and s["tokens"] == want_tokens and "stride" not in s


def proc_cpu_flags():
    """The kernel's CPU flags (/proc/cpuinfo), read independently of torch's cpuinfo; None if unreadable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_dtype_auto_is_bf16_exactly_where_the_cpu_has_native_bf16(checkpoint):
    flags = proc_cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    want = "bf16" if {"avx512_bf16", "amx_bf16"} & flags else "fp32"
    assert _C.native_bf16() == (want == "bf16") and _C.resolve_compute_dtype("auto") == want
    assert _C.resolve_compute_dtype("fp32") == "fp32" and _C.resolve_compute_dtype("bf16") == "bf16"
    with pytest.raises(ValueError, match=r'dtype must be "auto", "bf16" or "fp32", got "fp8"'):
        _C.resolve_compute_dtype("fp8")
    d = checkpoint
    args = ["--model", str(d / "model"), "--context", "16", "--threads", "1", "--text", str(d / "doc0.txt")]
    for python in ([False, True] if (BUILD / "lckv-eval").exists() else [True]):
        r = run(args, python)  # no --dtype: auto
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["dtype"] == want
    model = LCKVForCausalLM.from_pretrained(d / "model")
    r = lckv.eval.evaluate_text(model, [str(d / "doc0.txt")], str(d / "model" / "tokenizer.model"), context=16)
    assert r["dtype"] == want
    with pytest.raises(ValueError, match="fp8"):
        lckv.eval.evaluate_text(model, [str(d / "doc0.txt")], str(d / "model" / "tokenizer.model"), dtype="fp8")


@pytest.mark.parametrize("python", [False, True])
def test_bad_inputs_are_clear_errors(checkpoint, tmp_path, python):
    if not python and not (BUILD / "lckv-eval").exists():
        pytest.skip("lckv-eval not built")
    d = checkpoint
    model = ["--model", str(d / "model")]
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"body": "c"}) + "\n")
    (tmp_path / "notjson.jsonl").write_text('{"text": "a"}\n{oops\n')
    LCKVForCausalLM.from_pretrained(d / "model").save_pretrained(tmp_path / "no_tok")
    cases = [
        (model + ["--text", str(tmp_path / "empty.txt")], r"empty\.txt' is empty"),
        (model + ["--jsonl", str(tmp_path / "nofield.jsonl")], r"nofield\.jsonl:2: the record has no field 'text'"),
        (model + ["--jsonl", str(tmp_path / "notjson.jsonl")], r"notjson\.jsonl:2: not JSON"),
        (["--model", str(tmp_path / "no_tok"), "--text", str(d / "doc0.txt")],
         r"no_tok' holds no tokenizer: looked for tokenizer\.model .* and tokenizer\.json"),
        (model + ["--text", str(d / "doc0.txt"), "--context", "33"],
         r"context 33 must be in \[1, max_position_embeddings = 32\]"),
        (model + ["--text", str(d / "doc0.txt"), "--seq-len", "8"], r"--seq-len"),
        (model + ["--text", str(d / "doc0.txt"), "--frobnicate"], r"frobnicate"),
        (model + ["--text", str(tmp_path / "missing.txt")], r"missing\.txt"),
    ]
    for args, message in cases:
        r = run(args, python)
        assert r.returncode != 0, args
        assert "Traceback" not in r.stderr
        assert __import__("re").search(message, r.stderr), (args, r.stderr)
