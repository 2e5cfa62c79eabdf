// CUDA condensed attention (docs/design.md §3) at the level of raw pointers: no torch here, so the
// kernels build with nvcc alone and the torch glue (condensed_attention_cuda.cpp) only fills these
// structs. This header holds no device code; a host compiler can include it.
//
// Layouts: q, out, grad_out [B, Hq, T, D]; k, v, dk, dv [B, Hkv, S, D]; the last dimension
// contiguous, the other three strided (element strides below). lse and delta [B, Hq, T] and
// dq_accum [B, Hq, T, D] contiguous fp32.
// Query t sits at absolute position q_offset + t, key s at position s. Key s is visible to query
// position P iff s <= P (causal) or s < P (strict), and s > P - window when window > 0, and
// s >= key_start[b] when key_start is given (left-padded batches). Rows that see no key give
// zeros and lse = -inf. Query head h reads KV head h / (Hq / Hkv). Keys that no query sees are
// never loaded (zeros stand in for them), so they may hold anything, NaN included; dk, dv are 0 there.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lckv::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

struct TensorRef {
  void* data = nullptr;
  int64_t stride_b = 0, stride_h = 0, stride_t = 0;  // in elements; the last dim has stride 1
};

struct MaskParams {
  bool strict = false;
  int64_t window = 0;                  // <= 0: unlimited
  int64_t q_offset = 0;                // >= 0
  const int64_t* key_start = nullptr;  // optional [B] device array: first visible key per sequence
};

// What forward and backward share (the glue fills it with set_fwd_params()).
struct FwdParams {
  DType dtype = DType::kFloat32;
  int B = 0, Hq = 0, Hkv = 0, T = 0, S = 0, D = 0;
  MaskParams mask;
  float scale = 0;  // softmax scale (> 0)
  TensorRef q, k, v, out;
  float* lse = nullptr;  // [B, Hq, T]: written by the forward, read by the backward
};

// The split-KV decode kernel (T == 1) writes fp32 partial results of each key split to a
// workspace of decode_workspace_floats() floats, then merges them into out and lse.
struct DecodeParams {
  FwdParams fwd;
  int splits = 1;             // from decode_num_splits()
  float* workspace = nullptr;
};

// The forward's parameters (its out and lse as inputs) and the backward's own, as flash-attention's
// Flash_bwd_params extends Flash_fwd_params.
struct BwdParams : FwdParams {
  TensorRef grad_out;
  float* delta = nullptr;      // [B, Hq, T] scratch: rowsum(dO * O)
  float* dq_accum = nullptr;   // [B, Hq, T, D], zero-filled by the caller; dq is summed here in fp32
  TensorRef dk, dv;            // [B, Hkv, S, D] outputs in dtype; every element is written
};

// The decode kernel holds the running sums of a whole query-head group in registers.
constexpr int kDecodeMaxGroup = 16;

// nullptr when the kernels support these sizes, else what is wrong (for an error message).
inline const char* unsupported_reason(int B, int Hq, int Hkv, int T, int S, int D, float scale) {
  if (B <= 0 || Hq <= 0 || Hkv <= 0 || T <= 0 || S <= 0) return "every size must be positive";
  if (Hq % Hkv != 0) return "query heads must be a multiple of KV heads";
  if (D != 64 && D != 128) return "head_dim must be 64 or 128";
  if (!(scale > 0)) return "the softmax scale must be > 0";
  return nullptr;
}

// Whether the decode kernel applies (else the tiled forward kernel computes T == 1 too).
inline bool decode_applies(const FwdParams& p) { return p.T == 1 && p.Hq / p.Hkv <= kDecodeMaxGroup; }

// Key splits for the decode kernel: about 8 blocks per multiprocessor of the device (`num_sms`),
// but at least 128 keys per split.
int decode_num_splits(const FwdParams& p, int num_sms);
inline int64_t decode_workspace_floats(const FwdParams& p, int splits) {
  return static_cast<int64_t>(splits) * p.B * p.Hq * (p.D + 2);
}

// Launchers: each checks its sizes (cudaErrorInvalidValue if unsupported) and returns the launch
// status. Dtype and head dim are dispatched inside.
cudaError_t launch_condensed_attention_fwd(const FwdParams& p, cudaStream_t stream);
cudaError_t launch_condensed_attention_decode(const DecodeParams& p, cudaStream_t stream);
cudaError_t launch_condensed_attention_bwd(const BwdParams& p, cudaStream_t stream);

}  // namespace lckv::cuda
