// Condensed attention (DESIGN.md §3): softmax attention of queries at absolute positions
// q_offset + t over keys at positions s, with
//   causal: key s visible to query position P iff s <= P
//   strict: key s visible iff s < P (the diagonal is masked; a row with no key gives exact zeros)
//   window W > 0: additionally s > P - W
//   key_start (optional, [B] int64): keys s < key_start[b] are invisible to every query of batch
//   entry b (left padding of batched prompts with different lengths).
// GQA by head grouping: query head h reads KV head h / (Hq / Hkv); repeated K/V are never built.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace lckv::ops {

struct AttentionMask {
  bool strict = false;    // mask the diagonal
  int64_t window = 0;     // sliding window in keys; <= 0 means unlimited
  int64_t q_offset = 0;   // absolute position of query row 0
  at::Tensor key_start;   // optional [B] int64: per-sequence first visible key; undefined = 0

  // First visible key for query position p, and one past the last.
  int64_t key_begin(int64_t p) const { return window > 0 ? std::max<int64_t>(0, p - window + 1) : 0; }
  int64_t key_end(int64_t p) const { return strict ? p : p + 1; }
};

struct AttentionParams {
  AttentionMask mask;
  double scale = 0;          // softmax scale; <= 0 means 1/sqrt(head_dim)
  int64_t query_block = 256; // CPU: query rows per block, bounds the score matrix held at once
};

// Forward on raw tensors (no autograd): returns out [B,Hq,T,D] (dtype of q) and the row
// log-sum-exp [B,Hq,T] (fp32, or fp64 for fp64 inputs; -inf for rows that see no key).
std::tuple<at::Tensor, at::Tensor> condensed_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, const AttentionParams& p);

// Backward from the saved forward results: returns dq, dk, dv.
std::tuple<at::Tensor, at::Tensor, at::Tensor> condensed_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const AttentionParams& p);

// The differentiable op. Under CPU autocast the inputs are cast to the autocast dtype first, so
// forward and backward run in that precision (matmuls in bf16 on AMX, softmax in fp32).
at::Tensor condensed_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const AttentionParams& p);

}  // namespace lckv::ops
