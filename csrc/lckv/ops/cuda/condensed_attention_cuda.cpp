// Torch glue of the CUDA condensed attention: checks what the kernels need (dtype, head dim,
// device), makes inputs readable by them (last dim contiguous), allocates outputs and scratch,
// and launches on the current stream. Shapes, dtypes, devices and the mask were checked by the
// caller (condensed_attention.cpp), the backward's grad_out, out and lse too.
#include "lckv/ops/cuda/condensed_attention_cuda.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "lckv/ops/cuda/condensed_attention_kernels.cuh"

namespace lckv::ops::cuda {
namespace {

namespace kernels = ::lckv::cuda;

kernels::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kernels::DType::kFloat32;
    case at::kHalf: return kernels::DType::kFloat16;
    case at::kBFloat16: return kernels::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "condensed_attention (CUDA): dtype must be float32, float16 or bfloat16, got ", t,
                  " (float64 runs on the CPU only)");
  }
}

// The kernels read rows with a unit stride in the last dimension; anything else is copied.
at::Tensor rows_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

kernels::TensorRef ref(const at::Tensor& t) {
  return {const_cast<void*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

int to_int(int64_t x, const char* what) {
  TORCH_CHECK(x <= std::numeric_limits<int>::max(), "condensed_attention (CUDA): ", what, " = ", x, " is too large");
  return static_cast<int>(x);
}

// Checks what only the CUDA kernels require, and returns key_start ready for them (or undefined).
at::Tensor check_cuda_inputs(const at::Tensor& q, const at::Tensor& k, const AttentionParams& p, double scale) {
  TORCH_CHECK(q.is_cuda() && k.device() == q.device(), "condensed_attention (CUDA): q, k, v must be on one CUDA device");
  kernel_dtype(q.scalar_type());
  const char* why = kernels::unsupported_reason(1, to_int(q.size(1), "query heads"), to_int(k.size(1), "KV heads"), 1, 1,
                                                to_int(q.size(3), "head_dim"), static_cast<float>(scale));
  TORCH_CHECK(why == nullptr, "condensed_attention (CUDA): ", why, "; got head_dim ", q.size(3), ", ", q.size(1),
              " query heads, ", k.size(1), " KV heads, scale ", scale);
  TORCH_CHECK(q.size(0) <= 65535 && k.size(1) <= 65535, "condensed_attention (CUDA): batch (", q.size(0),
              ") and KV heads (", k.size(1), ") must be at most 65535");
  to_int(q.size(1) * q.size(2), "query heads x T");
  if (!p.mask.key_start.defined()) return {};
  TORCH_CHECK(p.mask.key_start.device() == q.device(), "condensed_attention (CUDA): key_start must be on ",
              q.device(), ", got ", p.mask.key_start.device());
  return p.mask.key_start.contiguous();
}

void check_launch(cudaError_t e, const char* kernel) {
  TORCH_CHECK(e == cudaSuccess, "condensed_attention (CUDA): launching the ", kernel, " kernel failed: ",
              cudaGetErrorString(e));
}

}  // namespace

void set_fwd_params(kernels::FwdParams& fp, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& out, const at::Tensor& lse, const AttentionMask& mask,
                    const at::Tensor& key_start, double scale) {
  fp.dtype = kernel_dtype(q.scalar_type());
  fp.B = to_int(q.size(0), "batch");
  fp.Hq = to_int(q.size(1), "query heads");
  fp.Hkv = to_int(k.size(1), "KV heads");
  fp.T = to_int(q.size(2), "T");
  fp.S = to_int(k.size(2), "S");
  fp.D = to_int(q.size(3), "head_dim");
  fp.mask.strict = mask.strict;
  fp.mask.window = mask.window;
  fp.mask.q_offset = mask.q_offset;
  fp.mask.key_start = key_start.defined() ? key_start.data_ptr<int64_t>() : nullptr;
  fp.scale = static_cast<float>(scale);
  fp.q = ref(q), fp.k = ref(k), fp.v = ref(v), fp.out = ref(out);
  fp.lse = lse.data_ptr<float>();
}

void set_bwd_params(kernels::BwdParams& bp, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& out, const at::Tensor& lse, const AttentionMask& mask,
                    const at::Tensor& key_start, double scale, const at::Tensor& grad_out, const at::Tensor& delta,
                    const at::Tensor& dq_accum, const at::Tensor& dk, const at::Tensor& dv) {
  set_fwd_params(bp, q, k, v, out, lse, mask, key_start, scale);
  bp.grad_out = ref(grad_out);
  bp.delta = delta.data_ptr<float>();
  bp.dq_accum = dq_accum.data_ptr<float>();
  bp.dk = ref(dk), bp.dv = ref(dv);
}

std::tuple<at::Tensor, at::Tensor> condensed_attention_forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                    const at::Tensor& v_in, const AttentionParams& p,
                                                                    double scale) {
  const at::Tensor key_start = check_cuda_inputs(q_in, k_in, p, scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  at::Tensor out = at::zeros({B, Hq, T, D}, q.options());
  at::Tensor lse = at::full({B, Hq, T}, -std::numeric_limits<float>::infinity(), q.options().dtype(at::kFloat));
  if (B == 0 || T == 0 || S == 0) return {out, lse};  // no query, or no key for any query

  kernels::FwdParams fp;
  set_fwd_params(fp, q, k, v, out, lse, p.mask, key_start, scale);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (kernels::decode_applies(fp)) {
    kernels::DecodeParams dp;
    dp.fwd = fp;
    dp.splits = kernels::decode_num_splits(fp, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
    at::Tensor workspace = at::empty({kernels::decode_workspace_floats(fp, dp.splits)}, lse.options());
    dp.workspace = workspace.data_ptr<float>();
    check_launch(kernels::launch_condensed_attention_decode(dp, stream), "decode");
  } else {
    check_launch(kernels::launch_condensed_attention_fwd(fp, stream), "forward");
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> condensed_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const AttentionParams& p, double scale) {
  const at::Tensor key_start = check_cuda_inputs(q_in, k_in, p, scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto dt = q_in.scalar_type();
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  const at::Tensor grad_out = rows_contiguous(grad_out_in.to(dt)), out = rows_contiguous(out_in.to(dt));
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  at::Tensor dq_accum = at::zeros({B, Hq, T, D}, q.options().dtype(at::kFloat));
  at::Tensor dk = at::zeros({B, Hkv, S, D}, q.options());
  at::Tensor dv = at::zeros({B, Hkv, S, D}, q.options());
  if (B == 0 || T == 0 || S == 0) return {dq_accum.to(dt), dk, dv};
  at::Tensor delta = at::empty({B, Hq, T}, lse.options());

  kernels::BwdParams bp;
  set_bwd_params(bp, q, k, v, out, lse, p.mask, key_start, scale, grad_out, delta, dq_accum, dk, dv);
  check_launch(kernels::launch_condensed_attention_bwd(bp, at::cuda::getCurrentCUDAStream()), "backward");
  return {dq_accum.to(dt), dk, dv};
}

}  // namespace lckv::ops::cuda
