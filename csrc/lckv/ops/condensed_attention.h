// Condensed attention (docs/design.md §3): softmax attention of queries at absolute positions
// q_offset + t over keys at positions s, under the causal/strict, window and key_start mask of
// attention_params.h. GQA by head grouping: query head h reads KV head h / (Hq / Hkv); repeated
// K/V are never built.
//
// The front of the op (condensed_attention.cpp): argument checks, dispatch and autograd. The
// implementations: ops/cpu/condensed_attention_cpu.h (blocked ATen path, and PyTorch's fused CPU
// attention with a boolean mask) and ops/cuda/condensed_attention_cuda.h (CUDA kernels).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "lckv/ops/attention_params.h"

namespace lckv::ops {

// Forward on raw tensors (no autograd), by the CPU path of p.cpu_path (attention_params.h) or the
// CUDA kernels: returns out
// [B,Hq,T,D] (dtype of q) and the row log-sum-exp [B,Hq,T] (fp32, or fp64 for fp64 inputs; -inf for
// rows that see no key).
std::tuple<at::Tensor, at::Tensor> condensed_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, const AttentionParams& p);

// Backward from the saved forward results (on CPU, whichever path ran the forward: PyTorch's fused
// backward where p.cpu_path is auto, T > p.query_block and its causal mask expresses p.mask, else the
// blocked one): returns dq, dk, dv.
std::tuple<at::Tensor, at::Tensor, at::Tensor> condensed_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const AttentionParams& p);

// The differentiable op. Under autocast the inputs are cast to the autocast dtype first, so forward
// and backward run in that precision. The backend (sdpa_attention.h: auto | lckv | sdpa, option or
// LCKV_ATTENTION_BACKEND) picks the implementation. auto: on CPU the path of p.cpu_path (auto: the
// decode kernel for chunks of at most 4 queries, the blocked path for fp64 and key_start, PyTorch's
// fused CPU kernel's forward otherwise), with condensed_attention_backward's backward; CUDA tensors to our
// kernels where a GPU run measured them faster (cuda_routes.h), to the SDPA backend elsewhere. lckv: our own
// CPU paths (decode kernel, blocked) / the CUDA kernels. sdpa: PyTorch's SDPA with its autograd on every
// device. A device query position (mask.q_position: static decode steps) goes to SDPA on every backend.
// Without grad (GradMode off or no input requiring it) no autograd node is built.
at::Tensor condensed_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const AttentionParams& p);

}  // namespace lckv::ops
