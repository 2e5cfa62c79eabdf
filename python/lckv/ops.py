"""Differentiable ops of the C++ library, usable in any PyTorch model."""

from typing import Optional

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
