// The elementwise ops of a Llama block, differentiable. On CPU each is one fused kernel forward and
// one backward (lckv/ops/cpu/fused_kernels.h), computing in fp32 (fp64 for fp64 tensors) and
// rounding once; on other devices they are the same math composed from ATen ops.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

namespace lckv::ops {

// RMSNorm over the last dim: weight * x / sqrt(mean(x^2) + eps), written in out_dtype (e.g. the
// autocast dtype, so the linear that follows needs no cast). Statistics in fp32 (fp64 for fp64 x).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::ScalarType out_dtype);

// Rotary embedding, Hugging Face rotate_half convention: x * cos + rotate_half(x) * sin.
// x [B, H, T, D] (D even, unit stride in D); cos/sin broadcastable to x ([B or 1, 1, T, D]),
// constants (no gradient). The result has x's dtype; the rotation is computed in fp32 (fp64 for
// fp64 x) whatever the tables' dtype.
at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// SwiGLU gate: silu(gate) * up, same shapes and dtype.
at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up);

// h + branch in promote_types(h, branch): the residual stream (fp32) plus a block's output (bf16
// under autocast) in one pass, without the fp32 copy of the branch that a mixed-dtype add makes.
at::Tensor residual_add(const at::Tensor& h, const at::Tensor& branch);

// {h + branch, rms_norm(h + branch, weight, eps, out_dtype)}: a layer's residual add and the norm that reads its
// sum, as residual_add then rms_norm (the same bits). On CPU with an fp32 h and a bf16/fp16 branch (autocast
// training) one kernel writes both in one pass, and its backward adds the sum's two gradients and rounds the
// branch's in the norm's backward pass (vLLM's fused_add_rms_norm, with autograd).
std::pair<at::Tensor, at::Tensor> residual_add_rms_norm(const at::Tensor& h, const at::Tensor& branch,
                                                         const at::Tensor& weight, double eps,
                                                         at::ScalarType out_dtype);

// y = x W^T + b, as at::linear. On CPU, without autograd or autocast and with at most kSmallLinearRows rows
// (decode), one streaming kernel instead of oneDNN's bf16 matmul (whose per-call cost dominates a decode step:
// fused_kernels.h); the result equals at::linear's up to the order of the fp32 (fp64) summation.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias = {});

// The target id the losses skip (PyTorch's and Hugging Face's ignore_index).
inline constexpr int64_t kIgnoreIndex = -100;

// Mean cross-entropy of logits [B, T, V] (or [N, V]) against targets [B, T] (or [N]) over the
// targets != ignore_index, with log-softmax statistics in fp32 (fp64 for fp64 logits), as
// F.cross_entropy(logits.float(), targets) but without the fp32 copy of the logits.
// Returns a 0-dim tensor of the accumulation dtype.
at::Tensor cross_entropy(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index = kIgnoreIndex);

// Which compiled variant of the fused CPU kernels runs: "DEFAULT", "AVX2" or "AVX512" (the widest
// this CPU and build support, or what ATEN_CPU_CAPABILITY asks for).
std::string fused_cpu_capability();
// Variants this build has and this CPU can run, narrowest first.
std::vector<std::string> runnable_fused_cpu_capabilities();

// Runs the fused CPU kernels of one variant while alive (tests compare every variant).
class ScopedFusedCpuCapability {
 public:
  explicit ScopedFusedCpuCapability(const std::string& capability);
  ~ScopedFusedCpuCapability();
  ScopedFusedCpuCapability(const ScopedFusedCpuCapability&) = delete;
  ScopedFusedCpuCapability& operator=(const ScopedFusedCpuCapability&) = delete;

 private:
  int previous_;  // the override before this scope (-1: none)
};

}  // namespace lckv::ops
