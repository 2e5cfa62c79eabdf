// Device code of the condensed attention kernels: flash-attention-2 style (semantics in
// condensed_attention_kernels.cuh; launchers in condensed_attention_kernels.cu). Everything is in an
// unnamed namespace: this header is included by exactly one file of a binary, either the .cu or
// tests/cpp/test_cuda_emulation.cpp, which runs the kernels on CPU threads
// (tests/cpp/cuda_emulation.h stands in for the CUDA built-ins and WMMA).
//
// Shared structure, chosen to be simple and checkable rather than maximally fast:
//  * A block of 128 threads (4 warps) owns a tile of "packed" query rows: packed row i of a KV head
//    is query position t = i / G of query head kv_head * G + i % G (G = Hq / Hkv), so one block
//    serves the whole head group and each K/V tile is loaded from global memory once per group.
//  * Tiles live in shared memory. Every matrix product is one call of tile_mma(): tensor cores
//    (WMMA 16x16x16, fp32 accumulate) for fp16/bf16, plain fp32 FMAs for fp32 inputs (so fp32
//    results stay fp32-exact, not TF32).
//  * The softmax runs in fp32 with a running max and sum per row (online softmax); a row that has
//    seen no visible key keeps max = -inf and contributes nothing, so empty rows give zeros and
//    lse = -inf, never NaN.
// Forward: one block per (query tile, KV head, batch), looping over key tiles.
// Backward: delta = rowsum(dO * O), then one block per (key tile, KV head, batch) looping over the
// query rows that can see it: dK, dV accumulate in shared memory (every head of the group is in
// the block, so no atomics), dQ is added to an fp32 buffer with atomicAdd.
// Decode (T = 1): one block per (key split, KV head, batch); the keys of a split are staged in
// shared memory once for all heads of the group, then a merge kernel combines the splits.
#pragma once

#include "lckv/ops/cuda/condensed_attention_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifdef __CUDACC__
#include <mma.h>
#endif

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace lckv::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Small helpers

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// int64 min/max usable on host and device.
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// Row padding of 16 bytes for shared-memory tiles: keeps rows 16-byte aligned (vector copies,
// WMMA's leading-dimension rule) and shifts consecutive rows across banks.
template <typename T>
constexpr int kPad = 16 / sizeof(T);

// First key that sequence b may see at all (left padding), >= 0.
__device__ __forceinline__ int64_t first_key_of(const MaskParams& m, int b) {
  return m.key_start == nullptr ? 0 : max64(0, m.key_start[b]);
}

// The mask of the header: is key `key` visible to the query at absolute position `pos`?
__device__ __forceinline__ bool key_visible(const MaskParams& m, int64_t first_key, int64_t pos, int64_t key) {
  if (key < first_key) return false;
  if (m.strict ? key >= pos : key > pos) return false;
  return m.window <= 0 || key > pos - m.window;
}

// Does some query position in [pos_lo, pos_hi] see `key`? The first position at or after the key
// (after it when strict) is the one whose window reaches back furthest, so it alone decides. Keys
// that no query sees may hold NaN or inf (unwritten or padded cache slots): they are loaded as
// zeros, since a product with the zero probability a masked key gets would still give 0 * NaN = NaN.
__device__ __forceinline__ bool key_seen(const MaskParams& m, int64_t first_key, int64_t pos_lo, int64_t pos_hi,
                                         int64_t key) {
  const int64_t pos = max64(pos_lo, m.strict ? key + 1 : key);
  return pos <= pos_hi && key_visible(m, first_key, pos, key);
}

// Element offset of row t of head h of batch b.
__device__ __forceinline__ int64_t row_offset(const TensorRef& r, int b, int h, int64_t t) {
  return b * r.stride_b + h * r.stride_h + t * r.stride_t;
}

// Copies `rows` rows of D elements into shared memory `dst` (row stride LD), 16 bytes at a time
// where the source row is 16-byte aligned (else element by element). row_src(r) returns the row's
// global address, or nullptr for a row to fill with zeros. No synchronisation.
template <typename T, int D, int LD, typename RowSrc>
__device__ void load_rows(T* dst, int rows, RowSrc row_src) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kChunks = D / kVec;
  for (int idx = threadIdx.x; idx < rows * kChunks; idx += blockDim.x) {
    const int r = idx / kChunks, c = (idx % kChunks) * kVec;
    const T* src = row_src(r);
    T* d = dst + r * LD + c;
    if (src == nullptr) {
      for (int e = 0; e < kVec; ++e) d[e] = from_float<T>(0.f);
    } else if ((reinterpret_cast<uintptr_t>(src + c) & 15) == 0) {
      *reinterpret_cast<uint4*>(d) = *reinterpret_cast<const uint4*>(src + c);
    } else {
      for (int e = 0; e < kVec; ++e) d[e] = src[c + e];
    }
  }
}

// C[M x N] (fp32, row-major, leading dim ldc) = (accumulate ? C : 0) + A[M x K] * B[K x N], with all
// operands in shared memory. A(m, k) = A_ROW ? A[m * lda + k] : A[k * lda + m];
// B(k, n) = B_ROW ? B[k * ldb + n] : B[n * ldb + k] (so a transposed operand is just the other
// layout). Ends with __syncthreads(), so the caller may overwrite A and B afterwards.
template <typename T, bool A_ROW, bool B_ROW, int M, int N, int K>
__device__ void tile_mma(const T* A, int lda, const T* B, int ldb, float* C, int ldc, bool accumulate) {
  if constexpr (std::is_same_v<T, float>) {
    // fp32: one output element per thread at a time, fp32 FMAs.
    for (int idx = threadIdx.x; idx < M * N; idx += blockDim.x) {
      const int m = idx / N, n = idx % N;
      float acc = accumulate ? C[m * ldc + n] : 0.f;
      for (int k = 0; k < K; ++k) {
        const float a = A_ROW ? A[m * lda + k] : A[k * lda + m];
        const float b = B_ROW ? B[k * ldb + n] : B[n * ldb + k];
        acc = fmaf(a, b, acc);
      }
      C[m * ldc + n] = acc;
    }
  } else {
    // fp16/bf16: each warp computes whole 16x16 output tiles on tensor cores (the host emulation
    // brings a stand-in nvcuda::wmma).
    using namespace nvcuda;
    static_assert(M % 16 == 0 && N % 16 == 0 && K % 16 == 0, "WMMA tiles are 16x16x16");
    using LayoutA = std::conditional_t<A_ROW, wmma::row_major, wmma::col_major>;
    using LayoutB = std::conditional_t<B_ROW, wmma::row_major, wmma::col_major>;
    const int warp = threadIdx.x / 32;
    for (int tile = warp; tile < (M / 16) * (N / 16); tile += kWarps) {
      const int tm = tile / (N / 16) * 16, tn = tile % (N / 16) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      if (accumulate) {
        wmma::load_matrix_sync(c, C + tm * ldc + tn, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(c, 0.f);
      }
      for (int k = 0; k < K; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> b;
        wmma::load_matrix_sync(a, A_ROW ? A + tm * lda + k : A + k * lda + tm, lda);
        wmma::load_matrix_sync(b, B_ROW ? B + k * ldb + tn : B + tn * ldb + k, ldb);
        wmma::mma_sync(c, a, b, c);
      }
      wmma::store_matrix_sync(C + tm * ldc + tn, c, ldc, wmma::mem_row_major);
    }
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Forward

template <typename T, int D>
struct FwdTile {
  static constexpr int BM = 64;  // packed query rows per block
  static constexpr int BN = 32;  // keys per step (= warp size: one lane per key in the softmax)
  static constexpr int LD = D + kPad<T>;    // Q, K, V tiles
  static constexpr int LDS = BN + 4;        // fp32 scores
  static constexpr int LDP = BN + kPad<T>;  // probabilities, in T for the P V product
  static constexpr int LDO = D + 4;         // fp32 output accumulator
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = kQ + align128(sizeof(T) * BM * LD);
  static constexpr size_t kV = kK + align128(sizeof(T) * BN * LD);
  static constexpr size_t kS = kV + align128(sizeof(T) * BN * LD);
  static constexpr size_t kP = kS + align128(sizeof(float) * BM * LDS);
  static constexpr size_t kO = kP + align128(sizeof(T) * BM * LDP);
  static constexpr size_t kStats = kO + align128(sizeof(float) * BM * LDO);
  static constexpr size_t kBytes = kStats + sizeof(float) * 3 * BM;  // row max, row sum, rescale
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const FwdParams p) {
  using L = FwdTile<T, D>;
  static_assert(L::BN == 32, "the softmax maps one lane to one key");
  extern __shared__ __align__(128) unsigned char smem[];
  T* sq = reinterpret_cast<T*>(smem + L::kQ);
  T* sk = reinterpret_cast<T*>(smem + L::kK);
  T* sv = reinterpret_cast<T*>(smem + L::kV);
  float* ss = reinterpret_cast<float*>(smem + L::kS);
  T* sp = reinterpret_cast<T*>(smem + L::kP);
  float* so = reinterpret_cast<float*>(smem + L::kO);
  float* row_max = reinterpret_cast<float*>(smem + L::kStats);
  float* row_sum = row_max + L::BM;
  float* row_rescale = row_sum + L::BM;

  const int G = p.Hq / p.Hkv;
  const int rows_total = p.T * G;
  const int row0 = blockIdx.x * L::BM;
  const int kv_head = blockIdx.y, b = blockIdx.z;
  const int64_t first_key = first_key_of(p.mask, b);
  const T* q = static_cast<const T*>(p.q.data);
  const T* k = static_cast<const T*>(p.k.data);
  const T* v = static_cast<const T*>(p.v.data);
  T* out = static_cast<T*>(p.out.data);

  // Q tile; rows past the end are zeros (and are never written back).
  load_rows<T, D, L::LD>(sq, L::BM, [&](int r) -> const T* {
    const int i = row0 + r;
    return i < rows_total ? q + row_offset(p.q, b, kv_head * G + i % G, i / G) : nullptr;
  });
  for (int idx = threadIdx.x; idx < L::BM * D; idx += blockDim.x) so[idx / D * L::LDO + idx % D] = 0.f;
  for (int r = threadIdx.x; r < L::BM; r += blockDim.x) {
    row_max[r] = kNegInf;
    row_sum[r] = 0.f;
  }
  __syncthreads();

  // Keys any row of the tile may see: from the window start of its first position to the end of
  // its last (per-element masking below handles the rest).
  const int i_last = static_cast<int>(min64(row0 + L::BM, rows_total)) - 1;
  const int64_t pos_first = p.mask.q_offset + row0 / G, pos_last = p.mask.q_offset + i_last / G;
  int64_t key_lo = p.mask.window > 0 ? max64(first_key, pos_first - p.mask.window + 1) : first_key;
  const int64_t key_hi = min64(p.S, p.mask.strict ? pos_last : pos_last + 1);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t n0 = key_lo; n0 < key_hi; n0 += L::BN) {
    // K and V rows n0 .. n0 + BN; rows past the end or seen by no row of the tile are zeros (and
    // masked below).
    auto seen = [&](int r) {
      return n0 + r < p.S && key_seen(p.mask, first_key, pos_first, pos_last, n0 + r);
    };
    load_rows<T, D, L::LD>(sk, L::BN, [&](int r) -> const T* {
      return seen(r) ? k + row_offset(p.k, b, kv_head, n0 + r) : nullptr;
    });
    load_rows<T, D, L::LD>(sv, L::BN, [&](int r) -> const T* {
      return seen(r) ? v + row_offset(p.v, b, kv_head, n0 + r) : nullptr;
    });
    __syncthreads();

    // S = Q K^T  (K^T read as a column-major view of the K tile).
    tile_mma<T, true, false, L::BM, L::BN, D>(sq, L::LD, sk, L::LD, ss, L::LDS, false);

    // Online softmax: a warp per row, a lane per key.
    for (int r = warp; r < L::BM; r += kWarps) {
      const int i = row0 + r;
      const int64_t key = n0 + lane;
      const bool visible = i < rows_total && key < p.S && key_visible(p.mask, first_key, p.mask.q_offset + i / G, key);
      const float s = visible ? ss[r * L::LDS + lane] * p.scale : kNegInf;
      const float m_old = row_max[r];
      const float m_new = fmaxf(m_old, warp_max(s));
      float prob = 0.f, rescale = 1.f;
      if (m_new != kNegInf) {  // else nothing visible yet: keep zeros
        prob = visible ? expf(s - m_new) : 0.f;
        rescale = expf(m_old - m_new);  // 0 when m_old = -inf
      }
      const float sum = warp_sum(prob);
      sp[r * L::LDP + lane] = from_float<T>(prob);
      if (lane == 0) {
        row_sum[r] = row_sum[r] * rescale + sum;
        row_max[r] = m_new;
        row_rescale[r] = rescale;
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < L::BM * D; idx += blockDim.x) so[idx / D * L::LDO + idx % D] *= row_rescale[idx / D];
    __syncthreads();

    // O += P V
    tile_mma<T, true, true, L::BM, D, L::BN>(sp, L::LDP, sv, L::LD, so, L::LDO, true);
  }

  // out = O / sum (zeros for rows that saw no key); lse = max + log(sum).
  for (int idx = threadIdx.x; idx < L::BM * D; idx += blockDim.x) {
    const int r = idx / D, c = idx % D, i = row0 + r;
    if (i >= rows_total) continue;
    const float sum = row_sum[r];
    const float o = sum > 0.f ? so[r * L::LDO + c] / sum : 0.f;
    out[row_offset(p.out, b, kv_head * G + i % G, i / G) + c] = from_float<T>(o);
  }
  for (int r = threadIdx.x; r < L::BM; r += blockDim.x) {
    const int i = row0 + r;
    if (i >= rows_total) continue;
    const float sum = row_sum[r];
    p.lse[(static_cast<int64_t>(b) * p.Hq + kv_head * G + i % G) * p.T + i / G] =
        sum > 0.f ? row_max[r] + logf(sum) : kNegInf;
  }
}

// ---------------------------------------------------------------------------------------------
// Decode (T == 1): split-KV

template <typename T, int D>
struct DecodeTile {
  static constexpr int BN = 32;                              // keys per step (one lane per key)
  static constexpr int kHeadsPerWarp = kDecodeMaxGroup / kWarps;  // heads g = warp + kWarps * j
  static constexpr int LD = D + kPad<T>;
  static constexpr int LDQ = D + 1;  // fp32 queries
  static constexpr size_t kK = 0;
  static constexpr size_t kV = kK + align128(sizeof(T) * BN * LD);
  static constexpr size_t kQ = kV + align128(sizeof(T) * BN * LD);
  static constexpr size_t kBytes = kQ + sizeof(float) * kDecodeMaxGroup * LDQ;
};

// Workspace record of (split, b, head): D unnormalised output sums, then the running max and sum.
__device__ __forceinline__ float* decode_record(const DecodeParams& dp, int split, int b, int h) {
  const FwdParams& p = dp.fwd;
  return dp.workspace + ((static_cast<int64_t>(split) * p.B + b) * p.Hq + h) * (p.D + 2);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_kernel(const DecodeParams dp) {
  using L = DecodeTile<T, D>;
  constexpr int E = D / 32;  // head-dim elements per lane: d = lane + 32 * e
  extern __shared__ __align__(128) unsigned char smem[];
  T* sk = reinterpret_cast<T*>(smem + L::kK);
  T* sv = reinterpret_cast<T*>(smem + L::kV);
  float* sq = reinterpret_cast<float*>(smem + L::kQ);

  const FwdParams& p = dp.fwd;
  const int split = blockIdx.x, kv_head = blockIdx.y, b = blockIdx.z;
  const int G = p.Hq / p.Hkv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* q = static_cast<const T*>(p.q.data);
  const T* k = static_cast<const T*>(p.k.data);
  const T* v = static_cast<const T*>(p.v.data);

  // The one query position sees the contiguous key range [key_lo, key_hi); this split takes a
  // share of it that is a multiple of BN keys long (the last splits may be short or empty).
  const int64_t pos = p.mask.q_offset;
  const int64_t first_key = first_key_of(p.mask, b);
  const int64_t key_lo = p.mask.window > 0 ? max64(first_key, pos - p.mask.window + 1) : first_key;
  const int64_t key_hi = min64(p.S, p.mask.strict ? pos : pos + 1);
  const int64_t n = max64(0, key_hi - key_lo);
  const int64_t per_split = ((n + dp.splits - 1) / dp.splits + L::BN - 1) / L::BN * L::BN;
  const int64_t split_lo = key_lo + min64(n, split * per_split);
  const int64_t split_hi = key_lo + min64(n, (split + 1) * per_split);

  for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {
    const int g = idx / D, d = idx % D;
    sq[g * L::LDQ + d] = to_float(q[row_offset(p.q, b, kv_head * G + g, 0) + d]);
  }

  float run_max[L::kHeadsPerWarp], run_sum[L::kHeadsPerWarp], acc[L::kHeadsPerWarp][E];
  for (int j = 0; j < L::kHeadsPerWarp; ++j) {
    run_max[j] = kNegInf;
    run_sum[j] = 0.f;
    for (int e = 0; e < E; ++e) acc[j][e] = 0.f;
  }

  for (int64_t n0 = split_lo; n0 < split_hi; n0 += L::BN) {
    __syncthreads();  // the queries are staged / the previous step is done with the tiles
    load_rows<T, D, L::LD>(sk, L::BN, [&](int r) -> const T* {
      return n0 + r < split_hi ? k + row_offset(p.k, b, kv_head, n0 + r) : nullptr;
    });
    load_rows<T, D, L::LD>(sv, L::BN, [&](int r) -> const T* {
      return n0 + r < split_hi ? v + row_offset(p.v, b, kv_head, n0 + r) : nullptr;
    });
    __syncthreads();

    const bool visible = n0 + lane < split_hi;  // the whole range is visible: only its end matters
#pragma unroll
    for (int j = 0; j < L::kHeadsPerWarp; ++j) {
      const int g = warp + kWarps * j;
      if (g >= G) break;  // warp-uniform
      float dot = 0.f;
      for (int d = 0; d < D; ++d) dot = fmaf(sq[g * L::LDQ + d], to_float(sk[lane * L::LD + d]), dot);
      const float s = visible ? dot * p.scale : kNegInf;
      const float m_new = fmaxf(run_max[j], warp_max(s));  // finite: lane 0's key is always visible
      const float prob = visible ? expf(s - m_new) : 0.f;
      const float rescale = expf(run_max[j] - m_new);
      run_sum[j] = run_sum[j] * rescale + warp_sum(prob);
      run_max[j] = m_new;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[j][e] *= rescale;
      for (int key = 0; key < L::BN; ++key) {
        const float pk = __shfl_sync(0xffffffffu, prob, key);
#pragma unroll
        for (int e = 0; e < E; ++e) acc[j][e] = fmaf(pk, to_float(sv[key * L::LD + lane + 32 * e]), acc[j][e]);
      }
    }
  }

#pragma unroll
  for (int j = 0; j < L::kHeadsPerWarp; ++j) {
    const int g = warp + kWarps * j;
    if (g >= G) break;
    float* rec = decode_record(dp, split, b, kv_head * G + g);
#pragma unroll
    for (int e = 0; e < E; ++e) rec[lane + 32 * e] = acc[j][e];
    if (lane == 0) {
      rec[D] = run_max[j];
      rec[D + 1] = run_sum[j];
    }
  }
}

// Merges the splits of one (b, head): a thread per head-dim element.
template <typename T, int D>
__global__ void __launch_bounds__(D) decode_merge_kernel(const DecodeParams dp) {
  const FwdParams& p = dp.fwd;
  const int h = blockIdx.x % p.Hq, b = blockIdx.x / p.Hq, d = threadIdx.x;
  float m = kNegInf;
  for (int s = 0; s < dp.splits; ++s) m = fmaxf(m, decode_record(dp, s, b, h)[D]);
  float sum = 0.f, o = 0.f;
  if (m != kNegInf) {
    for (int s = 0; s < dp.splits; ++s) {
      const float* rec = decode_record(dp, s, b, h);
      const float w = expf(rec[D] - m);  // 0 for a split that saw no key
      sum += rec[D + 1] * w;
      o += rec[d] * w;
    }
  }
  T* out = static_cast<T*>(p.out.data);
  out[row_offset(p.out, b, h, 0) + d] = from_float<T>(sum > 0.f ? o / sum : 0.f);
  if (d == 0) p.lse[static_cast<int64_t>(b) * p.Hq + h] = sum > 0.f ? m + logf(sum) : kNegInf;
}

// ---------------------------------------------------------------------------------------------
// Backward

// delta[b, h, t] = sum_d dO * O in fp32: a warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_delta_kernel(const BwdParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= static_cast<int64_t>(p.B) * p.Hq * p.T) return;
  const int64_t t = row % p.T;
  const int h = static_cast<int>(row / p.T % p.Hq), b = static_cast<int>(row / p.T / p.Hq);
  const T* o = static_cast<const T*>(p.out.data) + row_offset(p.out, b, h, t);
  const T* dout = static_cast<const T*>(p.grad_out.data) + row_offset(p.grad_out, b, h, t);
  float acc = 0.f;
  for (int d = lane; d < p.D; d += 32) acc = fmaf(to_float(o[d]), to_float(dout[d]), acc);
  acc = warp_sum(acc);
  if (lane == 0) p.delta[row] = acc;
}

template <typename T, int D>
struct BwdTile {
  static constexpr int BM = 32;  // packed query rows per step
  static constexpr int BN = 32;  // keys per block
  static constexpr int LD = D + kPad<T>;
  static constexpr int LDS = BN + 4;
  static constexpr int LDP = BN + kPad<T>;
  static constexpr int LDO = D + 4;
  static constexpr size_t kK = 0;
  static constexpr size_t kV = kK + align128(sizeof(T) * BN * LD);
  static constexpr size_t kQ = kV + align128(sizeof(T) * BN * LD);
  static constexpr size_t kDO = kQ + align128(sizeof(T) * BM * LD);
  static constexpr size_t kS = kDO + align128(sizeof(T) * BM * LD);
  static constexpr size_t kDP = kS + align128(sizeof(float) * BM * LDS);
  static constexpr size_t kP = kDP + align128(sizeof(float) * BM * LDS);
  static constexpr size_t kDS = kP + align128(sizeof(T) * BM * LDP);
  static constexpr size_t kDK = kDS + align128(sizeof(T) * BM * LDP);
  static constexpr size_t kDV = kDK + align128(sizeof(float) * BN * LDO);
  static constexpr size_t kDQ = kDV + align128(sizeof(float) * BN * LDO);
  static constexpr size_t kRows = kDQ + align128(sizeof(float) * BM * LDO);
  static constexpr size_t kBytes = kRows + sizeof(float) * 2 * BM;  // lse, delta
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const BwdParams p) {
  using L = BwdTile<T, D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sk = reinterpret_cast<T*>(smem + L::kK);
  T* sv = reinterpret_cast<T*>(smem + L::kV);
  T* sq = reinterpret_cast<T*>(smem + L::kQ);
  T* sdo = reinterpret_cast<T*>(smem + L::kDO);
  float* ss = reinterpret_cast<float*>(smem + L::kS);
  float* sdp = reinterpret_cast<float*>(smem + L::kDP);
  T* sp = reinterpret_cast<T*>(smem + L::kP);
  T* sds = reinterpret_cast<T*>(smem + L::kDS);
  float* sdk = reinterpret_cast<float*>(smem + L::kDK);
  float* sdv = reinterpret_cast<float*>(smem + L::kDV);
  float* sdq = reinterpret_cast<float*>(smem + L::kDQ);
  float* row_lse = reinterpret_cast<float*>(smem + L::kRows);
  float* row_delta = row_lse + L::BM;

  const int G = p.Hq / p.Hkv;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * L::BN;
  const int nk = static_cast<int>(min64(L::BN, p.S - n0));
  const int kv_head = blockIdx.y, b = blockIdx.z;
  const int64_t first_key = first_key_of(p.mask, b);
  const T* q = static_cast<const T*>(p.q.data);
  const T* k = static_cast<const T*>(p.k.data);
  const T* v = static_cast<const T*>(p.v.data);
  const T* dout = static_cast<const T*>(p.grad_out.data);

  for (int idx = threadIdx.x; idx < L::BN * D; idx += blockDim.x) {
    sdk[idx / D * L::LDO + idx % D] = 0.f;
    sdv[idx / D * L::LDO + idx % D] = 0.f;
  }

  // Query positions P that may see a key of [n0, n0 + nk): P >= n0 (+1 when strict) and, with a
  // window, P < key + window for the last key. None when every key is left padding.
  const int64_t t_lo = max64(0, n0 + (p.mask.strict ? 1 : 0) - p.mask.q_offset);
  int64_t t_hi = p.T - 1;
  if (p.mask.window > 0) t_hi = min64(t_hi, n0 + nk - 1 + p.mask.window - 1 - p.mask.q_offset);
  if (n0 + nk <= first_key) t_hi = -1;
  const int i_begin = static_cast<int>(t_lo * G);
  const int i_end = t_hi >= t_lo ? static_cast<int>((t_hi + 1) * G) : i_begin;

  // K and V of the block's keys; keys past the end or seen by no query are zeros.
  auto seen = [&](int r) {
    return r < nk && key_seen(p.mask, first_key, p.mask.q_offset + t_lo, p.mask.q_offset + t_hi, n0 + r);
  };
  load_rows<T, D, L::LD>(sk, L::BN, [&](int r) -> const T* {
    return seen(r) ? k + row_offset(p.k, b, kv_head, n0 + r) : nullptr;
  });
  load_rows<T, D, L::LD>(sv, L::BN, [&](int r) -> const T* {
    return seen(r) ? v + row_offset(p.v, b, kv_head, n0 + r) : nullptr;
  });

  for (int i0 = i_begin; i0 < i_end; i0 += L::BM) {
    __syncthreads();  // K/V staged, or the previous step is done with Q, dO and the row data
    // Q and dO of packed rows i0 .. i0 + BM (row i: query i / G of head kv_head * G + i % G).
    load_rows<T, D, L::LD>(sq, L::BM, [&](int r) -> const T* {
      const int i = i0 + r;
      return i < i_end ? q + row_offset(p.q, b, kv_head * G + i % G, i / G) : nullptr;
    });
    load_rows<T, D, L::LD>(sdo, L::BM, [&](int r) -> const T* {
      const int i = i0 + r;
      return i < i_end ? dout + row_offset(p.grad_out, b, kv_head * G + i % G, i / G) : nullptr;
    });
    for (int r = threadIdx.x; r < L::BM; r += blockDim.x) {
      const int i = i0 + r;
      const int64_t row = (static_cast<int64_t>(b) * p.Hq + kv_head * G + i % G) * p.T + i / G;
      row_lse[r] = i < i_end ? p.lse[row] : kNegInf;
      row_delta[r] = i < i_end ? p.delta[row] : 0.f;
    }
    __syncthreads();

    tile_mma<T, true, false, L::BM, L::BN, D>(sq, L::LD, sk, L::LD, ss, L::LDS, false);    // S = Q K^T
    tile_mma<T, true, false, L::BM, L::BN, D>(sdo, L::LD, sv, L::LD, sdp, L::LDS, false);  // dP = dO V^T

    // P = exp(scale * S - lse) on visible entries; dS = P * (dP - delta) * scale.
    for (int idx = threadIdx.x; idx < L::BM * L::BN; idx += blockDim.x) {
      const int r = idx / L::BN, c = idx % L::BN, i = i0 + r;
      const float lse = row_lse[r];
      const bool visible = i < i_end && c < nk && lse != kNegInf &&
                           key_visible(p.mask, first_key, p.mask.q_offset + i / G, n0 + c);
      const float prob = visible ? expf(ss[r * L::LDS + c] * p.scale - lse) : 0.f;
      const float ds = prob * (sdp[r * L::LDS + c] - row_delta[r]) * p.scale;
      sp[r * L::LDP + c] = from_float<T>(prob);
      sds[r * L::LDP + c] = from_float<T>(ds);
    }
    __syncthreads();

    tile_mma<T, false, true, L::BN, D, L::BM>(sp, L::LDP, sdo, L::LD, sdv, L::LDO, true);  // dV += P^T dO
    tile_mma<T, false, true, L::BN, D, L::BM>(sds, L::LDP, sq, L::LD, sdk, L::LDO, true);  // dK += dS^T Q
    tile_mma<T, true, true, L::BM, D, L::BN>(sds, L::LDP, sk, L::LD, sdq, L::LDO, false);  // dQ_tile = dS K

    for (int idx = threadIdx.x; idx < L::BM * D; idx += blockDim.x) {
      const int r = idx / D, c = idx % D, i = i0 + r;
      if (i >= i_end) continue;
      const int64_t row = (static_cast<int64_t>(b) * p.Hq + kv_head * G + i % G) * p.T + i / G;
      atomicAdd(p.dq_accum + row * D + c, sdq[r * L::LDO + c]);
    }
  }
  __syncthreads();

  T* dk = static_cast<T*>(p.dk.data);
  T* dv = static_cast<T*>(p.dv.data);
  for (int idx = threadIdx.x; idx < nk * D; idx += blockDim.x) {
    const int r = idx / D, c = idx % D;
    dk[row_offset(p.dk, b, kv_head, n0 + r) + c] = from_float<T>(sdk[r * L::LDO + c]);
    dv[row_offset(p.dv, b, kv_head, n0 + r) + c] = from_float<T>(sdv[r * L::LDO + c]);
  }
}

// ---------------------------------------------------------------------------------------------
// Launch shapes (blocks of kThreads threads, except the merge kernel: D threads)

template <typename T, int D>
dim3 fwd_grid(const FwdParams& p) {
  const int64_t rows = static_cast<int64_t>(p.T) * (p.Hq / p.Hkv);
  return dim3(static_cast<unsigned>((rows + FwdTile<T, D>::BM - 1) / FwdTile<T, D>::BM), p.Hkv, p.B);
}
inline dim3 decode_grid(const DecodeParams& dp) { return dim3(dp.splits, dp.fwd.Hkv, dp.fwd.B); }
inline dim3 decode_merge_grid(const DecodeParams& dp) { return dim3(dp.fwd.B * dp.fwd.Hq); }
inline dim3 bwd_delta_grid(const BwdParams& p) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.T;
  return dim3(static_cast<unsigned>((rows + kWarps - 1) / kWarps));
}
template <typename T, int D>
dim3 bwd_grid(const BwdParams& p) {
  return dim3(static_cast<unsigned>((p.S + BwdTile<T, D>::BN - 1) / BwdTile<T, D>::BN), p.Hkv, p.B);
}

}  // namespace
}  // namespace lckv::cuda
