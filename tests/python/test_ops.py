"""lckv.ops.condensed_attention against a naive masked-softmax reference in float64."""

import pytest
import torch

import lckv

from lckv.ops import condensed_attention


def naive_attention(q, k, v, strict, window, q_offset, scale=None):
    B, Hq, T, D = q.shape
    S = k.shape[2]
    group = Hq // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else D**-0.5)
    pos = q_offset + torch.arange(T)[:, None]
    key = torch.arange(S)[None, :]
    visible = key < pos if strict else key <= pos
    if window > 0:
        visible &= key > pos - window
    # A finite fill keeps rows without any visible key differentiable; they are zeroed below.
    probs = torch.softmax(scores.masked_fill(~visible, -1e300), dim=-1)
    probs = probs * visible.any(dim=-1, keepdim=True)
    return probs @ v


CASES = [
    # strict, window, q_offset, Hq, Hkv, T, S
    pytest.param(False, 0, 0, 2, 2, 7, 7, id="causal"),
    pytest.param(True, 0, 0, 2, 2, 7, 7, id="strict"),
    pytest.param(False, 3, 0, 2, 2, 9, 9, id="window"),
    pytest.param(True, 3, 0, 2, 2, 9, 9, id="strict-window"),
    pytest.param(False, 0, 6, 2, 2, 3, 9, id="q_offset"),
    pytest.param(True, 4, 5, 2, 2, 4, 9, id="strict-window-q_offset"),
    pytest.param(False, 0, 0, 4, 2, 6, 6, id="gqa"),
    pytest.param(True, 0, 0, 6, 1, 6, 6, id="strict-mqa"),
]


def inputs(Hq, Hkv, T, S, D=8, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, dtype=torch.float64, generator=g, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("strict,window,q_offset,Hq,Hkv,T,S", CASES)
def test_matches_naive_reference_fp64(strict, window, q_offset, Hq, Hkv, T, S):
    q, k, v = inputs(Hq, Hkv, T, S)
    out = condensed_attention(q, k, v, strict=strict, window=window, q_offset=q_offset)
    ref = naive_attention(q, k, v, strict, window, q_offset)
    assert (out - ref).abs().max().item() <= 1e-12
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, b in zip("qkv", got, want):
        assert (a - b).abs().max().item() <= 1e-12, name


def test_strict_position_zero_is_exact_zero():
    q, k, v = inputs(2, 2, 5, 5)
    out = condensed_attention(q, k, v, strict=True)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))


def test_custom_scale():
    q, k, v = inputs(2, 1, 5, 5)
    out = condensed_attention(q, k, v, scale=0.3)
    assert (out - naive_attention(q, k, v, False, 0, 0, scale=0.3)).abs().max().item() <= 1e-12


@pytest.mark.parametrize("strict,window,q_offset,Hq,Hkv,T,S", CASES)
def test_gradcheck(strict, window, q_offset, Hq, Hkv, T, S):
    q, k, v = inputs(Hq, Hkv, T, S, D=4, B=1, seed=1)
    fn = lambda q, k, v: condensed_attention(q, k, v, strict=strict, window=window, q_offset=q_offset)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_usable_inside_a_python_module():
    class SelfAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24, dtype=torch.float64)

        def forward(self, x):
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
            return condensed_attention(q, k, v)

    m = SelfAttention()
    m(torch.randn(2, 5, 8, dtype=torch.float64)).sum().backward()
    assert m.qkv.weight.grad is not None and m.qkv.weight.grad.abs().sum() > 0


def test_bf16_autocast_runs_in_bf16():
    q, k, v = (t.detach().float() for t in inputs(2, 2, 6, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = condensed_attention(q, k, v, strict=True)
    assert out.dtype == torch.bfloat16
    ref = naive_attention(q.double(), k.double(), v.double(), True, 0, 0)
    assert (out.double() - ref).abs().max().item() < 5e-2


def test_bad_inputs_name_the_argument():
    q, k, v = (t.detach() for t in inputs(2, 2, 4, 4))
    with pytest.raises(RuntimeError, match="q must be"):
        condensed_attention(q[0], k, v)
    with pytest.raises(RuntimeError, match="v must have k's shape"):
        condensed_attention(q, k, v[:, :, :3])
    with pytest.raises(RuntimeError, match="dtype|same"):
        condensed_attention(q, k.float(), v)
    with pytest.raises(RuntimeError, match="condensed_attention"):
        condensed_attention(q.long(), k.long(), v.long())
    with pytest.raises(RuntimeError, match="query heads"):
        condensed_attention(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    with pytest.raises(RuntimeError, match="device"):
        condensed_attention(q.to("meta"), k.to("meta"), v.to("meta"))
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        condensed_attention(q, k.tolist(), v)
    with pytest.raises(ValueError, match="window"):
        condensed_attention(q, k, v, window=-1)
    with pytest.raises(RuntimeError, match="q_offset"):
        condensed_attention(q, k, v, q_offset=-2)


def test_attention_backend_selection_and_sdpa_equals_lckv():
    torch.manual_seed(5)
    q, k, v = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    assert lckv.ops.attention_backend() == "auto"
    outs = {}
    try:
        for name in ("lckv", "sdpa"):
            lckv.ops.set_attention_backend(name)
            assert lckv.ops.attention_backend() == name
            outs[name] = lckv.ops.condensed_attention(q, k, v, strict=True)
        with pytest.raises(ValueError, match='"flash".*auto, lckv or sdpa'):
            lckv.ops.set_attention_backend("flash")
    finally:
        lckv.ops.set_attention_backend("auto")
    assert (outs["lckv"] - outs["sdpa"]).abs().max().item() < 1e-5


def test_first_attention_call_leaves_the_random_generator_alone(tmp_path):
    # The CPU kernels check once, on first use, that their micro-GEMMs work here; that check must not draw from
    # torch's default generator (a seeded run would then differ with and without an earlier attention call). A
    # fresh process, so that the first call is really the first.
    import subprocess
    import sys

    code = """
import torch, lckv
from lckv.ops import condensed_attention
x = torch.ones(1, 2, 8, 16)
torch.manual_seed(0)
condensed_attention(x, x, x)
condensed_attention(x.bfloat16(), x.bfloat16(), x.bfloat16())
after = torch.randn(4)
torch.manual_seed(0)
assert torch.equal(after, torch.randn(4)), "the first attention call advanced the generator"
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
