// Host side of the condensed attention kernels: size checks, dtype / head-dim dispatch and
// launches (the kernels are in condensed_attention_device.cuh).
#include "lckv/ops/cuda/condensed_attention_kernels.cuh"

#include <cuda_runtime.h>

#include <algorithm>

#include "lckv/ops/cuda/condensed_attention_device.cuh"

namespace lckv::cuda {
namespace {

template <typename T>
struct Tag {
  using type = T;
};
template <int N>
using Int = std::integral_constant<int, N>;

// Calls f(Tag<T>{}, Int<D>{}) for the element type and head dim (validated by the caller).
template <typename F>
cudaError_t dispatch(DType dtype, int head_dim, F&& f) {
  const bool d64 = head_dim == 64;
  switch (dtype) {
    case DType::kFloat32: return d64 ? f(Tag<float>{}, Int<64>{}) : f(Tag<float>{}, Int<128>{});
    case DType::kFloat16: return d64 ? f(Tag<__half>{}, Int<64>{}) : f(Tag<__half>{}, Int<128>{});
    case DType::kBFloat16: return d64 ? f(Tag<__nv_bfloat16>{}, Int<64>{}) : f(Tag<__nv_bfloat16>{}, Int<128>{});
  }
  return cudaErrorInvalidValue;
}

bool sizes_ok(int B, int Hq, int Hkv, int T, int S, int D, float scale) {
  return unsupported_reason(B, Hq, Hkv, T, S, D, scale) == nullptr && B <= 65535 && Hkv <= 65535;
}

// Kernels that need more than 48 KiB of shared memory must say so before launch.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace

int decode_num_splits(const FwdParams& p, int num_sms) {
  const int64_t blocks = static_cast<int64_t>(p.B) * p.Hkv;
  // Decode is memory-bound: ~8 small blocks per SM keep enough loads in flight.
  const int64_t wanted = (8 * static_cast<int64_t>(num_sms) + blocks - 1) / blocks;
  const int64_t most = (static_cast<int64_t>(p.S) + 127) / 128;  // >= 128 keys per split
  return static_cast<int>(std::max<int64_t>(1, std::min(wanted, most)));
}

cudaError_t launch_condensed_attention_fwd(const FwdParams& p, cudaStream_t stream) {
  if (!sizes_ok(p.B, p.Hq, p.Hkv, p.T, p.S, p.D, p.scale) || p.lse == nullptr) return cudaErrorInvalidValue;
  return dispatch(p.dtype, p.D, [&](auto tag, auto dim) {
    using T = typename decltype(tag)::type;
    constexpr int D = decltype(dim)::value;
    using L = FwdTile<T, D>;
    if (cudaError_t e = allow_smem(fwd_kernel<T, D>, L::kBytes); e != cudaSuccess) return e;
    fwd_kernel<T, D><<<fwd_grid<T, D>(p), kThreads, L::kBytes, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t launch_condensed_attention_decode(const DecodeParams& dp, cudaStream_t stream) {
  const FwdParams& p = dp.fwd;
  if (!sizes_ok(p.B, p.Hq, p.Hkv, p.T, p.S, p.D, p.scale) || !decode_applies(p) || dp.splits < 1 ||
      dp.workspace == nullptr || p.lse == nullptr) {
    return cudaErrorInvalidValue;
  }
  return dispatch(p.dtype, p.D, [&](auto tag, auto dim) {
    using T = typename decltype(tag)::type;
    constexpr int D = decltype(dim)::value;
    using L = DecodeTile<T, D>;
    if (cudaError_t e = allow_smem(decode_kernel<T, D>, L::kBytes); e != cudaSuccess) return e;
    decode_kernel<T, D><<<decode_grid(dp), kThreads, L::kBytes, stream>>>(dp);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    decode_merge_kernel<T, D><<<decode_merge_grid(dp), D, 0, stream>>>(dp);
    return cudaGetLastError();
  });
}

cudaError_t launch_condensed_attention_bwd(const BwdParams& p, cudaStream_t stream) {
  if (!sizes_ok(p.B, p.Hq, p.Hkv, p.T, p.S, p.D, p.scale) || p.lse == nullptr || p.delta == nullptr ||
      p.dq_accum == nullptr) {
    return cudaErrorInvalidValue;
  }
  return dispatch(p.dtype, p.D, [&](auto tag, auto dim) {
    using T = typename decltype(tag)::type;
    constexpr int D = decltype(dim)::value;
    using L = BwdTile<T, D>;
    bwd_delta_kernel<T><<<bwd_delta_grid(p), kThreads, 0, stream>>>(p);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    if (cudaError_t e = allow_smem(bwd_kernel<T, D>, L::kBytes); e != cudaSuccess) return e;
    bwd_kernel<T, D><<<bwd_grid<T, D>(p), kThreads, L::kBytes, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace lckv::cuda
