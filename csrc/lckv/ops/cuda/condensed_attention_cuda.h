// The CUDA path of condensed attention (docs/design.md §3): torch glue over the raw-pointer kernels of
// condensed_attention_kernels.cuh. condensed_attention_forward/backward call these for CUDA
// tensors after their common checks; only built with LCKV_WITH_CUDA.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "lckv/ops/attention_params.h"
#include "lckv/ops/cuda/condensed_attention_kernels.cuh"

namespace lckv::ops::cuda {

// out [B, Hq, T, D] in q's dtype and lse [B, Hq, T] fp32. `scale` is the resolved softmax scale.
std::tuple<at::Tensor, at::Tensor> condensed_attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                    const at::Tensor& v, const AttentionParams& p,
                                                                    double scale);

// dq, dk, dv in q's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> condensed_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const AttentionParams& p, double scale);

// The kernels' parameters from tensors whose last dimension is contiguous (lse contiguous fp32
// [B, Hq, T]): sizes, dtype, mask, scale and pointers. key_start is the mask's, contiguous and on
// the kernels' device, or undefined. The backward's adds grad_out, the fp32 scratch delta
// [B, Hq, T] and dq_accum [B, Hq, T, D] (zero-filled, contiguous), and the outputs dk, dv.
// Also used by the CPU emulation of the kernels (tests/cpp/test_cuda_emulation.cpp).
void set_fwd_params(::lckv::cuda::FwdParams& fp, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& out, const at::Tensor& lse, const AttentionMask& mask,
                    const at::Tensor& key_start, double scale);
void set_bwd_params(::lckv::cuda::BwdParams& bp, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& out, const at::Tensor& lse, const AttentionMask& mask,
                    const at::Tensor& key_start, double scale, const at::Tensor& grad_out, const at::Tensor& delta,
                    const at::Tensor& dq_accum, const at::Tensor& dk, const at::Tensor& dv);

}  // namespace lckv::ops::cuda
