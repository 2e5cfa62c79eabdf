"""Importing lckv leaves PyTorch's globals alone (issue 12 §1): SentencePiece's flags once bound to
libc10's same-named FLAGS_minloglevel and overwrote FLAGS_caffe2_use_fatal_for_enforce, so every
failed torch check (an out-of-memory, a full disk) aborted the process instead of raising."""

import os
import subprocess
import sys
import textwrap

from conftest import ROOT

# Reads libc10's flags through ctypes before and after `import lckv`, uses the tokenizer, then
# asks torch for 4 TB: that must be a RuntimeError, and the process must exit normally.
SCRIPT = textwrap.dedent(
    """
    import ctypes, glob, os, sys, tempfile
    import torch
    c10 = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))[0])
    def flags():
        return (ctypes.c_int.in_dll(c10, "FLAGS_minloglevel").value,
                ctypes.c_bool.in_dll(c10, "FLAGS_caffe2_use_fatal_for_enforce").value)
    before = flags()
    import lckv
    d = tempfile.mkdtemp()
    words = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "ba", "gu", "fe"]
    with open(os.path.join(d, "t.txt"), "w") as f:
        f.write("".join(words[i % 12] + words[i * 7 % 11] + (" " if i % 9 else ".\\n") for i in range(2000)))
    lckv.data.prepare_corpus([os.path.join(d, "t.txt")], os.path.join(d, "out"), vocab_size=300, val_fraction=0)
    tok = lckv.data.Tokenizer.load(os.path.join(d, "out", lckv.data.read_prepared(os.path.join(d, "out"))["tokenizer"]))
    assert tok.decode(tok.encode("kalo mine")) == "kalo mine"
    after = flags()
    assert before == after == (0, False), (before, after)
    try:
        torch.empty(10**12)
    except RuntimeError as e:
        assert "can't allocate memory" in str(e), e
        print("raised")
    """
)


def test_import_lckv_keeps_torch_errors_catchable():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    assert r.stdout.strip().endswith("raised")
