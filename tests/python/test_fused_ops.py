"""lckv.ops' fused elementwise ops (rms_norm, apply_rotary, swiglu, cross_entropy) against plain
PyTorch formulas in float64, with torch.autograd.gradcheck, and their use in low precision."""

import pytest
import torch
import torch.nn.functional as F

from lckv import ops


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def test_rms_norm_matches_formula_and_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(24, dtype=torch.float64) + 0.5).requires_grad_(True)
    expected = w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: ops.rms_norm(a, b, 1e-5), (x, w))


def test_rms_norm_writes_the_requested_dtype():
    x = torch.randn(4, 32)
    y = ops.rms_norm(x, torch.ones(32), 1e-6, out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), rtol=1e-2, atol=1e-2)


def test_apply_rotary_on_a_transposed_view_and_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(2, 6, 3, 10, dtype=torch.float64, requires_grad=True)  # [B, T, H, D]
    cos, sin = torch.randn(1, 1, 6, 10, dtype=torch.float64), torch.randn(1, 1, 6, 10, dtype=torch.float64)
    q = x.transpose(1, 2)
    torch.testing.assert_close(ops.apply_rotary(q, cos, sin), q * cos + rotate_half(q) * sin, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a: ops.apply_rotary(a.transpose(1, 2), cos, sin), (x,))


def test_swiglu_matches_silu_times_up_and_gradcheck():
    torch.manual_seed(2)
    g = (torch.randn(5, 37, dtype=torch.float64) * 3).requires_grad_(True)
    u = torch.randn(5, 37, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(ops.swiglu(g, u), F.silu(g) * u, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(ops.swiglu, (g, u))


def test_residual_add_of_fp32_and_bf16_equals_the_promoted_add():
    torch.manual_seed(5)
    h = torch.randn(4, 33, requires_grad=True)
    b = torch.randn(4, 33).bfloat16().requires_grad_(True)
    y = ops.residual_add(h, b)
    assert y.dtype == torch.float32
    assert torch.equal(y, h.detach() + b.detach().float())
    g = torch.randn(4, 33)
    y.backward(g)
    assert torch.equal(h.grad, g) and b.grad.dtype == torch.bfloat16 and torch.equal(b.grad, g.bfloat16())


def test_residual_add_rms_norm_equals_the_two_ops_bit_for_bit():
    torch.manual_seed(6)
    hv, bv, w = torch.randn(3, 5, 40), torch.randn(3, 5, 40).bfloat16(), torch.rand(40) + 0.5
    gs, gy = torch.randn(3, 5, 40), torch.randn(3, 5, 40)
    results = []
    for fused in (True, False):
        h, b, wl = hv.clone().requires_grad_(True), bv.clone().requires_grad_(True), w.clone().requires_grad_(True)
        if fused:
            s, y = ops.residual_add_rms_norm(h, b, wl, 1e-5, torch.bfloat16)
        else:
            s = ops.residual_add(h, b)
            y = ops.rms_norm(s, wl, 1e-5, torch.bfloat16)
        ((s * gs).sum() + (y.float() * gy).sum()).backward()
        results.append((s, y, h.grad, b.grad, wl.grad))
    assert results[0][1].dtype == torch.bfloat16 and results[0][3].dtype == torch.bfloat16
    for a, b in zip(*results):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.residual_add_rms_norm(hv, bv, torch.ones(3))


def test_cross_entropy_matches_f_cross_entropy_and_gradcheck():
    torch.manual_seed(3)
    logits = torch.randn(2, 7, 50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (2, 7))
    targets[0, :2] = -100
    expected = F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(ops.cross_entropy(logits, targets), expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a: ops.cross_entropy(a, targets), (logits,))


def test_cross_entropy_on_bf16_logits_equals_the_fp32_upcast():
    torch.manual_seed(4)
    logits = (torch.randn(4, 9, 300) * 4).bfloat16().requires_grad_(True)
    targets = torch.randint(0, 300, (4, 9))
    loss = ops.cross_entropy(logits, targets)
    ref_logits = logits.detach().float().requires_grad_(True)
    ref = F.cross_entropy(ref_logits.reshape(-1, 300), targets.reshape(-1))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    loss.backward()
    ref.backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad, rtol=1e-2, atol=1e-4)


def test_bad_input_names_the_problem():
    with pytest.raises(RuntimeError, match="target 10 is outside"):
        ops.cross_entropy(torch.randn(3, 10), torch.tensor([1, 2, 10]))
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.rms_norm(torch.randn(2, 8), torch.ones(4))
    with pytest.raises(RuntimeError, match="share shape"):
        ops.swiglu(torch.randn(3), torch.randn(4))


def test_a_fused_variant_is_reported():
    assert ops.fused_cpu_capability() in ("DEFAULT", "AVX2", "AVX512")


@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_linear_matches_the_fp64_product_with_and_without_bias(rows):
    # rows <= 4 without grad: the decode kernel; more rows or grad: at::linear (the same result).
    torch.manual_seed(rows)
    x = torch.randn(rows, 37, dtype=torch.float64)
    w = torch.randn(11, 37, dtype=torch.float64)
    b = torch.randn(11, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ops.linear(x, w), x @ w.T, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(ops.linear(x, w, b), x @ w.T + b, rtol=1e-13, atol=1e-13)
        got = ops.linear(x.bfloat16(), w.bfloat16(), b.bfloat16())
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), x.bfloat16().double() @ w.bfloat16().double().T + b.bfloat16().double(),
                                   rtol=1e-2, atol=3e-2)
    xg = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: ops.linear(a, w, b), (xg,))
