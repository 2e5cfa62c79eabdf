// Fused CPU kernels for the elementwise parts of a Llama block: RMSNorm, rotary embedding,
// SwiGLU, the residual add and the cross-entropy of the LM head. Unfused, each is 3-10 ATen kernels (and as many
// passes over memory, plus dtype conversions under autocast); together they were ~30% of a
// bf16 training step on a 2-core CPU. Fused, each reads and writes its tensors once, computing in
// fp32 (fp64 for fp64 tensors).
//
// fused_kernels.cpp is compiled once per CPU capability (DEFAULT, AVX2, AVX512), as ATen compiles
// its own kernels, so at::vec::Vectorized and its Sleef exp use the widest vectors the machine has
// without the build requiring them. No autograd, no checks: lckv/ops/fused_ops.h is the API.
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>

#include "lckv/ops/attention_params.h"

namespace lckv::ops::cpu {

struct FusedKernels {
  // x [R, D] contiguous (fp32/bf16/fp16/fp64), weight [D] in the accumulation dtype (fp32, or fp64
  // for fp64 x). Writes out [R, D] (any floating dtype) = weight * x * rstd and rstd [R] (acc dtype).
  void (*rms_norm_forward)(const at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor& out,
                           const at::Tensor& rstd);
  // grad [R, D] contiguous (out's dtype). Writes dx [R, D] (x's dtype) and, per block of
  // kRMSNormRowsPerPartial rows, the partial weight gradients dweight_partial [blocks, D] (acc dtype)
  // whose sum over blocks is the weight gradient (fixed blocks: the same bits for any thread count).
  void (*rms_norm_backward)(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& rstd, const at::Tensor& dx, const at::Tensor& dweight_partial);
  // x, out [B, H, T, D] with unit stride in D (any other strides); cos, sin of x's sizes (broadcast
  // by stride 0 is fine) in the acc dtype. out = x * cos + rotate_half(x) * sin (HF convention);
  // transpose = true applies the transposed map (the backward): g * cos - rotate_half(g * sin).
  void (*rotary)(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out,
                 bool transpose);
  // gate, up, out: contiguous, one dtype. out = silu(gate) * up.
  void (*swiglu_forward)(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out);
  void (*swiglu_backward)(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                          const at::Tensor& dgate, const at::Tensor& dup);
  // h (fp32), branch (bf16/fp16), out (fp32): contiguous, one shape. out = h + branch.
  void (*residual_add)(const at::Tensor& h, const at::Tensor& branch, const at::Tensor& out);
  // logits [B, T, V] with unit stride in V, targets [B, T] int64 (ignore_index rows are skipped).
  // Writes lse [B, T] and loss [B, T] = lse - logits[target] (0 for ignored rows), acc dtype.
  void (*cross_entropy_forward)(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                const at::Tensor& lse, const at::Tensor& loss);
  // dlogits [B, T, V] contiguous (logits' dtype) = scale * (softmax(logits) - onehot(target)); 0 for
  // ignored rows.
  void (*cross_entropy_backward)(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                 const at::Tensor& lse, double scale, const at::Tensor& dlogits);
  // Condensed attention of a few query rows by direct loops, for decode: one call for all heads,
  // no per-op overhead, and each row reads only the keys it sees (so hidden ones, NaN or not, never
  // enter). q [B, Hq, T, D], k, v [B, Hkv, S, D], unit stride in D (any other strides); the mask's
  // key_start is an int64 [B] CPU tensor or undefined. Writes out [B, Hq, T, D] contiguous (q's
  // dtype) and lse [B, Hq, T] contiguous (acc dtype; -inf and zeros for a row that sees no key).
  void (*attention_rows)(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionMask& mask,
                         double scale, const at::Tensor& out, const at::Tensor& lse);
  // The elementwise middle of one block of the blocked attention (condensed_attention_cpu.cpp), in one
  // pass instead of a chain of ATen ops over broadcast masks. scores [B, Hkv, G * tb, ns] contiguous
  // (the unscaled q k^T of query rows t0.. t0 + tb of each head group, keys kb.. kb + ns); each row's
  // visible keys come from the mask (key_start: int64 [B] CPU tensor or undefined). Forward: probs
  // (scores' shape and dtype, contiguous; exact zeros where hidden) = softmax(scale * scores) and
  // lse [B * Hkv * G * tb] contiguous (acc dtype, -inf for a row that sees no key).
  void (*block_softmax)(const at::Tensor& scores, const AttentionMask& mask, int64_t t0, int64_t tb, int64_t kb,
                        double scale, const at::Tensor& probs, const at::Tensor& lse);
  // Backward: with p = exp(scale * scores - lse) on visible keys (0 elsewhere), writes probs = p and
  // ds = scale * p * (dp - delta), both scores' shape and dtype; dp like scores, delta and lse
  // [B * Hkv * G * tb] contiguous in the acc dtype.
  void (*block_softmax_backward)(const at::Tensor& scores, const at::Tensor& dp, const at::Tensor& delta,
                                 const at::Tensor& lse, const AttentionMask& mask, int64_t t0, int64_t tb, int64_t kb,
                                 double scale, const at::Tensor& probs, const at::Tensor& ds);
  // y = x W^T + b for few rows (decode): x [M, K], w [N, K], out [M, N] contiguous, one dtype (fp32/bf16/fp16/
  // fp64); bias [N] of that dtype or undefined. Each output is one fp32 (fp64) dot product in a fixed order, the
  // same for any M, thread count or row split, rounded once. Streams W once; parallel over N only for large W.
  void (*small_linear)(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& out);
  // out [B, H, T] contiguous (acc dtype) = sum_d a[b, h, t, d] * b[b, h, t, d] for a, b [B, H, T, D] of one dtype
  // with unit stride in D (any other strides): the attention backward's rowsum(dO * O).
  void (*row_dot)(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out);
  // Tiled (flash-style) attention on brgemm micro-GEMMs (tiled_attention.cpp), fp32 or bf16 (q's dtype, shared
  // by every tensor but lse/delta), D a multiple of 2 for bf16. q [B, Hq, T, D], k, v [B, Hkv, S, D], out
  // [B, Hq, T, D], all with unit stride in D (any other strides); key_start an int64 [B] CPU tensor or
  // undefined. Writes out and lse [B, Hq, T] contiguous fp32 (-inf and zeros for a row that sees no key).
  void (*tiled_attention_forward)(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const AttentionMask& mask, double scale, const at::Tensor& out, const at::Tensor& lse);
  // Backward from lse and delta = rowsum(dO * O) ([B, Hq, T] contiguous fp32); grad_out like q. Writes every
  // element of dq (q's shape) and dk, dv (k's shape), unit stride in D.
  void (*tiled_attention_backward)(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta,
                                   const AttentionMask& mask, double scale, const at::Tensor& dq, const at::Tensor& dk,
                                   const at::Tensor& dv);
  // The residual add and the RMSNorm that reads its sum, in one pass: h [R, D] fp32, branch [R, D] bf16/fp16,
  // weight [D] fp32, all contiguous. Writes sum = h + branch (fp32), out = rms_norm(sum) (fp32/bf16/fp16) and
  // rstd [R] fp32: the same bits as residual_add then rms_norm_forward.
  void (*residual_add_rms_norm_forward)(const at::Tensor& h, const at::Tensor& branch, const at::Tensor& weight,
                                        double eps, const at::Tensor& sum, const at::Tensor& out,
                                        const at::Tensor& rstd);
  // Its backward: rms_norm_backward of grad (out's dtype) at x = the saved sum, plus sum_grad (the sum's gradient
  // from its other uses: fp32 [R, D] contiguous, or undefined), written to dx (fp32) and, rounded, to dbranch
  // (branch's dtype); dweight_partial as rms_norm_backward's.
  void (*residual_add_rms_norm_backward)(const at::Tensor& grad, const at::Tensor& sum_grad, const at::Tensor& x,
                                         const at::Tensor& weight, const at::Tensor& rstd, const at::Tensor& dx,
                                         const at::Tensor& dbranch, const at::Tensor& dweight_partial);
};

// Bumped by poison_tiled_attention_scratch (condensed_attention_cpu.h): each thread then refills its tiled-attention
// scratch buffers with NaN before its next use of them.
std::atomic<int>& tiled_attention_scratch_generation();

// Tile of the tiled attention: query rows (of one head) by keys. 64 x 256 keeps a tile's fp32 scores (64 KiB)
// and its operands in L2; at D = 64 brgemm ran 64 x 256 x 64 and 64 x 64 x 256 products at 1.3-1.6 TFLOP/s
// on one AMX core, where 64-key tiles ran at half that and per-row softmax overhead was 4x larger.
constexpr int64_t kTiledAttentionRows = 64;
constexpr int64_t kTiledAttentionKeys = 256;

// ops::linear hands products of at most this many rows to small_linear: up to here it beats oneDNN's bf16
// matmul, whose fixed cost per call is ~50-100 us (measured at M = 1, 512 x 512: 65 us on one thread for 0.5 MB).
constexpr int64_t kSmallLinearRows = 4;

constexpr int64_t kRMSNormRowsPerPartial = 64;

// The kernels of the capability fused_ops.h selects (the widest runnable unless overridden).
const FusedKernels& active_fused_kernels();

// The kernels compiled for each capability (fused_kernels.cpp defines them).
namespace DEFAULT { const FusedKernels& fused_kernels(); }
#if defined(__x86_64__)  // CMake compiles these variants on x86-64
namespace AVX2 { const FusedKernels& fused_kernels(); }
namespace AVX512 { const FusedKernels& fused_kernels(); }
#endif

}  // namespace lckv::ops::cpu
