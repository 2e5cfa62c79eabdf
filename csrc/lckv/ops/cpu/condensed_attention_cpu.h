// The CPU implementations of condensed attention (semantics in lckv/ops/attention_params.h). No
// argument checks and no autograd of their own: lckv/ops/condensed_attention.h is the API, which
// checks the arguments and picks one of these.
//  * The blocked path: blocked over query rows, ATen matmuls per block, softmax statistics in fp32
//    (fp64 for fp64 inputs). Each block only touches the key range its rows can see, so causal and
//    windowed attention skip masked-out tiles. The backward recomputes probabilities from the saved
//    log-sum-exp, as flash attention does, so the [T, S] probability matrix is never kept.
//  * PyTorch's fused CPU attention (flash-style online softmax, GQA without repeated K/V) given the
//    condensed mask, for the forward; its log-sum-exp feeds the blocked backward, or, for sequences
//    longer than a query block under the masks its causal mask expresses, its own fused backward.
//  * Tiled (flash-style) attention on brgemm micro-GEMMs (tiled_attention.cpp, fp32 and bf16): score tiles stay
//    in cache, forward and backward, for every mask.
//  * Few query rows (decode): the direct-loop kernel of fused_kernels.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "lckv/ops/attention_params.h"

namespace lckv::ops::cpu {

// Blocked forward: out [B, Hq, T, D] in q's dtype and lse [B, Hq, T] (fp32, fp64 for fp64 inputs;
// -inf for rows that see no key). `scale` is the resolved softmax scale.
std::tuple<at::Tensor, at::Tensor> condensed_attention_forward_blocked(const at::Tensor& q, const at::Tensor& k,
                                                                       const at::Tensor& v, const AttentionParams& p,
                                                                       double scale);

// Blocked backward from the saved forward results: dq, dk, dv in q's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> condensed_attention_backward_blocked(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const AttentionParams& p, double scale);

// Forward by PyTorch's fused CPU attention (flash-style online softmax, GQA without repeated K/V)
// under the condensed mask (no key_start): out as the blocked forward's (rows that see no key are
// zeros) and its row log-sum-exp (fp32), which the blocked backward takes. nullopt when no row sees
// any key (the blocked path gives those zeros).
std::optional<std::tuple<at::Tensor, at::Tensor>> condensed_attention_forward_flash(const at::Tensor& q,
                                                                                     const at::Tensor& k,
                                                                                     const at::Tensor& v,
                                                                                     const AttentionParams& p,
                                                                                     double scale);

// Whether the backward by PyTorch's fused CPU kernel computes this attention: the masks the flash forward
// expresses with its own causal mask (no window, no key_start, q_offset 0, T = S; strict by the shift trick),
// fp32/bf16/fp16.
bool flash_backward_applies(const at::Tensor& q, const at::Tensor& k, const AttentionParams& p);

// Backward by PyTorch's fused CPU kernel (flash_backward_applies must hold) from the saved out and lse (any
// correct ones: the flash or the blocked forward's): dq, dk, dv in q's dtype. It tiles keys and queries in cache,
// where the blocked backward streams [rows, keys] intermediates through memory: at T = 512 it was 1.1-1.6x faster
// (fp32 on an AVX2 CPU; bf16 on AMX: 1.26x causal, a tie strict), at T = 128 far slower in bf16 on AMX (17 vs 5.6 ms).
std::tuple<at::Tensor, at::Tensor, at::Tensor> condensed_attention_backward_flash(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const AttentionParams& p, double scale);

// Whether the tiled path computes attention over q's dtype and head dim on this machine: fp32 (AVX2 or wider)
// or bf16 where the CPU computes it natively (AMX or avx512_bf16), with oneDNN enabled and its brgemm
// working; head dim even and at most kMaxTiledHeadDim.
bool tiled_attention_applies(const at::Tensor& q);
constexpr int64_t kMaxTiledHeadDim = 256;

// Tests: every thread refills the tiled kernel's reused scratch buffers with NaN before it next uses them, so that
// a read of an element the kernel did not write shows as NaN in the results.
void poison_tiled_attention_scratch();

// Forward by the tiled kernel (tiled_attention_applies must hold): out [B, Hq, T, D] in q's dtype (a
// [B, T, Hq, D] tensor's transpose, so the caller's reshape to [B, T, Hq * D] is a view) and lse [B, Hq, T]
// fp32 (-inf and zeros for a row that sees no key). Every mask, key_start included.
std::tuple<at::Tensor, at::Tensor> condensed_attention_forward_tiled(const at::Tensor& q, const at::Tensor& k,
                                                                     const at::Tensor& v, const AttentionParams& p,
                                                                     double scale);

// Backward by the tiled kernel from the saved out and lse (any correct ones): dq, dk, dv in q's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> condensed_attention_backward_tiled(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const AttentionParams& p, double scale);

}  // namespace lckv::ops::cpu
