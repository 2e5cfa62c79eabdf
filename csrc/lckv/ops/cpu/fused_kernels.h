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
};

constexpr int64_t kRMSNormRowsPerPartial = 64;

// The kernels compiled for each capability (fused_kernels.cpp defines them).
namespace DEFAULT { const FusedKernels& fused_kernels(); }
#if defined(__x86_64__)  // CMake compiles these variants on x86-64
namespace AVX2 { const FusedKernels& fused_kernels(); }
namespace AVX512 { const FusedKernels& fused_kernels(); }
#endif

}  // namespace lckv::ops::cpu
