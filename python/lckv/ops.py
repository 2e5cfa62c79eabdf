"""Differentiable ops of the C++ library, usable in any PyTorch model."""

from typing import Optional, Tuple

import torch

from . import _C


def condensed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    strict: bool = False,
    window: int = 0,
    q_offset: int = 0,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Softmax attention of q [B, Hq, T, D] over k, v [B, Hkv, S, D] -> [B, Hq, T, D], with autograd.

    Query row t sits at absolute position q_offset + t, key s at position s. Key s is visible to
    query position P iff s <= P (s < P with strict=True: the diagonal is masked, and a row that
    sees no key gives exact zeros) and, with window > 0, s > P - window. Hq must be a multiple of
    Hkv (grouped-query attention). scale defaults to 1/sqrt(D). Under CPU autocast the inputs are
    cast to the autocast dtype.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"condensed_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if window < 0:
        raise ValueError(f"condensed_attention: window must be >= 0 (0: unlimited), got {window}")
    if scale is not None and not scale > 0:
        raise ValueError(f"condensed_attention: scale must be > 0, got {scale}")
    return _C.condensed_attention(q, k, v, bool(strict), int(window), int(q_offset), 0.0 if scale is None else float(scale))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Llama RMSNorm over the last dim, weight * x / sqrt(mean(x^2) + eps), with autograd.

    Statistics in fp32 (fp64 for fp64 x); the result is written in out_dtype (default: the
    promotion of x's and weight's dtypes), e.g. torch.bfloat16 to feed a bf16 matmul without a cast.
    On CPU one fused kernel forward and one backward.
    """
    return _C.rms_norm(x, weight, float(eps), out_dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, x * cos + rotate_half(x) * sin (Hugging Face convention), with autograd.

    x is [B, H, T, D] (any strides with unit stride in D, e.g. a transposed [B, T, H, D] view);
    cos/sin are constant tables broadcastable to x ([B or 1, 1, T, D]). The result has x's dtype,
    computed in fp32 (fp64 for fp64 x).
    """
    return _C.apply_rotary(x, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with autograd (one fused kernel each way on CPU)."""
    return _C.swiglu(gate, up)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight.T + bias, as torch.nn.functional.linear (with autograd). On CPU, without autograd or
    autocast and for at most a few rows (decode), one streaming kernel instead of oneDNN's matmul,
    whose fixed cost per call dominates a decode step."""
    return _C.linear(x, weight, bias)


def residual_add(h: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """h + branch in the promoted dtype, with autograd. For an fp32 residual stream and a bf16/fp16
    branch (the autocast case) one fused pass on CPU, without the fp32 copy of the branch a
    mixed-dtype add makes."""
    return _C.residual_add(h, branch)


def residual_add_rms_norm(h: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                          out_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(h + branch, rms_norm(h + branch, weight, eps, out_dtype)) with autograd: a decoder layer's residual
    add and the norm that reads its sum, bit for bit as residual_add then rms_norm. For an fp32 stream and
    a bf16/fp16 branch on CPU (autocast training) one fused pass each way."""
    return _C.residual_add_rms_norm(h, branch, weight, float(eps), out_dtype)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits [B, T, V] (or [N, V]) against targets [B, T] (or [N]), skipping
    ignore_index; log-softmax statistics in fp32 (fp64 for fp64 logits) without an fp32 copy of the
    logits. Equals F.cross_entropy(logits.float().flatten(0, -2), targets.flatten()).
    """
    return _C.cross_entropy(logits, targets, int(ignore_index))


def fused_cpu_capability() -> str:
    """The compiled variant of the fused CPU kernels in use: "DEFAULT", "AVX2" or "AVX512"."""
    return _C.fused_cpu_capability()


def set_attention_backend(name: str) -> None:
    """The implementation condensed attention uses: "auto" (the default: on CPU our tiled kernel where it
    applies, else the blocked path or PyTorch's fused CPU attention; on CUDA PyTorch's SDPA), "lckv" (our
    CPU paths and CUDA kernels) or "sdpa" (PyTorch's scaled_dot_product_attention everywhere). Overrides
    LCKV_ATTENTION_BACKEND."""
    _C.set_attention_backend(name)


def attention_backend() -> str:
    return _C.attention_backend()
