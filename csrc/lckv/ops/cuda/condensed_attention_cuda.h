// The CUDA path of condensed attention (DESIGN.md §3): torch glue over the raw-pointer kernels of
// condensed_attention_kernels.cuh. condensed_attention_forward/backward call these for CUDA
// tensors after their common checks; only built with LCKV_WITH_CUDA.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "lckv/ops/condensed_attention.h"

namespace lckv::ops::cuda {

// out [B, Hq, T, D] in q's dtype and lse [B, Hq, T] fp32. `scale` is the resolved softmax scale.
std::tuple<at::Tensor, at::Tensor> condensed_attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                    const at::Tensor& v, const AttentionParams& p,
                                                                    double scale);

// dq, dk, dv in q's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> condensed_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const AttentionParams& p, double scale);

}  // namespace lckv::ops::cuda
