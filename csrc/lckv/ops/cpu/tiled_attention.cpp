// Tiled (flash-style) condensed attention on CPU: the score tiles stay in cache, and every product is one
// micro-GEMM of ATen's cpublas::brgemm (oneDNN's ukernel: AMX tiles or avx512_bf16 for bf16, AVX2/AVX-512 FMA
// for fp32). Compiled once per CPU capability (CMake defines CPU_CAPABILITY), as fused_kernels.cpp.
//
// Why by hand: the matmul-based blocked path streams its [rows, keys] score, probability and gradient
// matrices through memory between ATen calls, and PyTorch's own fused CPU kernels run their backward through
// one cpublas::gemm call per tile (bf16: ~10% of the matmul rate measured on AMX). Here a tile's scores,
// probabilities and gradients are computed, used and dropped while they sit in L1/L2.
//
// Layout. Tiles of kTiledAttentionRows query rows (one head) against kTiledAttentionKeys keys, aligned at key 0. brgemm takes
// A [M, K] row-major and B [K, N] in "VNNI" pairs for 16-bit types: element (k, n) at
// ((k / P) * ldb + n) * P + k % P with P = 2 (P = 1, plain row-major, for fp32). So
//   S  = Q K^T     B = K^T packed: the [keys, D / P] matrix of P-element words, transposed;
//   O += P V       B = V packed by key pairs;
//   dP = dO V^T    B = V^T packed as K^T;
//   dV^T += dO^T P, dK^T += Q^T dS   A = Q^T, dO^T (plain transposes), B = P, dS written in pairs of rows;
//   dQ += dS K     B = K packed by key pairs.
// Q and dO rows are read in place (lda = their row stride).
//
// Hidden keys. Packing copies only the keys some query of the call sees ([lo, hi) of each batch entry) and
// writes zeros for the rest and for padding, so a key no query sees (an unwritten cache slot, a pad, NaN or
// not) never enters a product. A score the mask hides is replaced, never added to. (A non-finite key that
// some query does see makes that query's output non-finite, as it must, and may do so for the other rows of
// its tile too, through 0 * inf in the products.)
#include "lckv/ops/cpu/fused_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace lckv::ops::cpu {
namespace CPU_CAPABILITY {
namespace {

#include "lckv/ops/cpu/vec_lanes.h"  // NOLINT: per-capability helpers, inside this namespace

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using Vec = Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kPairLanes = 2 * kLanes;

// Elements per VNNI group: 2 for 16-bit types, 1 for fp32.
template <typename T>
constexpr int64_t kPack = sizeof(T) == 2 ? 2 : 1;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Packed key counts are padded to this (the packers' 16 x 16 blocks; even for the VNNI pairs), not to a whole
// tile: a tile's products take only the keys its rows see.
constexpr int64_t kKeyAlign = 16;

// C [M, N] (ldc) = (add ? C : 0) + A [M, K] (lda) x B [K, N] (ldb, packed as above).
void gemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add, const float* a,
          const float* b, float* c) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, a, b, c, /*is_vnni=*/false);
}
void gemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add, const at::BFloat16* a,
          const at::BFloat16* b, float* c) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, a, b, c, /*is_vnni=*/true);
}

// Releases the thread's brgemm hardware context (AMX tile configuration) at the end of a parallel task, so the
// next oneDNN kernel on this thread configures its own.
struct BrgemmRelease {
  bool vnni;
  ~BrgemmRelease() { at::native::cpublas::brgemm_release(vnni); }
};

// The keys query position `pos` of batch entry b sees: [lo, hi), empty when lo >= hi.
struct KeyRange {
  int64_t lo, hi;
  bool empty() const { return lo >= hi; }
};

struct Visibility {
  const AttentionMask& mask;
  const int64_t* key_start;  // [B] or null
  int64_t S;

  KeyRange row(int64_t b, int64_t t) const {
    const int64_t pos = mask.q_offset + t;
    int64_t lo = mask.key_begin(pos);
    if (key_start != nullptr) lo = std::max(lo, key_start[b]);
    return {lo, std::min(S, mask.key_end(pos))};
  }
  // The union of the ranges of rows [t0, t0 + n) (one run: both ends move forward with the position).
  KeyRange rows(int64_t b, int64_t t0, int64_t n) const {
    KeyRange u{S, 0};
    for (int64_t t = t0; t < t0 + n; ++t) {
      const KeyRange r = row(b, t);
      if (r.empty()) continue;
      u.lo = std::min(u.lo, r.lo);
      u.hi = std::max(u.hi, r.hi);
    }
    return u.empty() ? KeyRange{0, 0} : u;
  }
};

// ---------------------------------------------------------------------------------------------
// Packing. x: rows of an [R, D] matrix at row stride ld (elements, a multiple of P), unit stride in D. Rows
// outside [lo, hi) and up to the padded row count R_pad (a multiple of 16) are written as zeros. A "word" is
// a VNNI group: P = 2 bf16 elements, or one fp32: 32 bits either way.

// dst [W][R_pad] words (row stride ldd >= R_pad) = the transpose of src's [R, W] word matrix (row stride ldw).
void transpose_words(const uint32_t* src, int64_t ldw, int64_t W, int64_t lo, int64_t hi, int64_t R_pad,
                     uint32_t* dst, int64_t ldd) {
#if defined(CPU_CAPABILITY_AVX512)
  // 16 x 16 blocks in registers: masked loads of the rows in [lo, hi) (zeros elsewhere), three shuffle stages.
  for (int64_t w0 = 0; w0 < W; w0 += 16) {
    const int64_t nw = std::min<int64_t>(16, W - w0);
    const __mmask16 wmask = static_cast<__mmask16>((1u << nw) - 1);
    for (int64_t r0 = 0; r0 < R_pad; r0 += 16) {
      __m512i r[16], t[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t row = r0 + i;
        r[i] = row >= lo && row < hi ? _mm512_maskz_loadu_epi32(wmask, src + row * ldw + w0) : _mm512_setzero_si512();
      }
      for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
      }
      // u[4g + c]: in 128-bit lane L, rows 4g..4g+3 of column 4L + c.
      for (int g = 0; g < 4; ++g) {
        r[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g + 0], t[4 * g + 2]);
        r[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g + 0], t[4 * g + 2]);
        r[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        r[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
      }
      for (int c = 0; c < 4; ++c) {
        const __m512i v0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), v1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD);
        const __m512i x0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88),
                      x1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
        const __m512i cols[4] = {_mm512_shuffle_i32x4(v0, x0, 0x88), _mm512_shuffle_i32x4(v1, x1, 0x88),
                                 _mm512_shuffle_i32x4(v0, x0, 0xDD), _mm512_shuffle_i32x4(v1, x1, 0xDD)};
        for (int q = 0; q < 4; ++q) {  // column 4q + c of this block
          const int64_t col = 4 * q + c;
          if (col < nw) _mm512_storeu_si512(dst + (w0 + col) * ldd + r0, cols[q]);
        }
      }
    }
  }
#else
  for (int64_t w = 0; w < W; ++w) {
    uint32_t* o = dst + w * ldd;
    for (int64_t r = 0; r < R_pad; ++r) o[r] = r >= lo && r < hi ? src[r * ldw + w] : 0u;
  }
#endif
}

// dst [D / P][R_pad] words (B = x^T in VNNI pairs): the transpose of x's [R, D / P] word matrix.
template <typename T>
void pack_transposed_words(const T* x, int64_t ld, int64_t D, int64_t lo, int64_t hi, int64_t R_pad, T* dst) {
  constexpr int64_t P = kPack<T>;
  static_assert(sizeof(T) * P == sizeof(uint32_t));
  transpose_words(reinterpret_cast<const uint32_t*>(x), ld / P, D / P, lo, hi, R_pad, reinterpret_cast<uint32_t*>(dst),
                  R_pad);
}

// dst [R_pad / P][D][P] (B = x in VNNI pairs of rows; for fp32 a plain copy).
template <typename T>
void pack_row_pairs(const T* x, int64_t ld, int64_t D, int64_t lo, int64_t hi, int64_t R_pad, T* dst) {
  constexpr int64_t P = kPack<T>;
  auto in = [&](int64_t r) { return r >= lo && r < hi; };
  if constexpr (P == 1) {
    for (int64_t r = 0; r < R_pad; ++r) {
      if (in(r)) {
        std::memcpy(dst + r * D, x + r * ld, D * sizeof(T));
      } else {
        std::fill(dst + r * D, dst + (r + 1) * D, T(0));
      }
    }
  } else {
    for (int64_t r = 0; r < R_pad; r += 2) {
      uint32_t* o = reinterpret_cast<uint32_t*>(dst + r * D);
      const uint16_t* a = in(r) ? reinterpret_cast<const uint16_t*>(x + r * ld) : nullptr;
      const uint16_t* b = in(r + 1) ? reinterpret_cast<const uint16_t*>(x + (r + 1) * ld) : nullptr;
#if defined(CPU_CAPABILITY_AVX512)
      for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, D - d)) - 1);
        const __m512i wa = a ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, a + d)) : _mm512_setzero_si512();
        const __m512i wb = b ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, b + d)) : _mm512_setzero_si512();
        _mm512_mask_storeu_epi32(o + d, m, _mm512_or_si512(wa, _mm512_slli_epi32(wb, 16)));
      }
#else
      for (int64_t d = 0; d < D; ++d) o[d] = (a ? a[d] : 0u) | (uint32_t(b ? b[d] : 0u) << 16);
#endif
    }
  }
}

// dst [D][R_pad] at row stride ldd (A = x^T, plain) for rows [0, R); `scratch` holds R_pad * D elements. For
// 16-bit types the rows are paired first: the word transpose of the pairs is the element transpose.
template <typename T>
void pack_transposed(const T* x, int64_t ld, int64_t D, int64_t R, int64_t R_pad, T* dst, int64_t ldd, T* scratch) {
  constexpr int64_t P = kPack<T>;
  if constexpr (P == 1) {
    transpose_words(reinterpret_cast<const uint32_t*>(x), ld, D, 0, R, R_pad, reinterpret_cast<uint32_t*>(dst), ldd);
  } else {
    pack_row_pairs(x, ld, D, 0, R, R_pad, scratch);
    transpose_words(reinterpret_cast<const uint32_t*>(scratch), D, D, 0, R_pad / P, R_pad / P,
                    reinterpret_cast<uint32_t*>(dst), ldd / P);
  }
}

// Per-thread buffers that outlive a call: kernels run many times per step, and fresh megabyte-sized allocations
// page-faulted on every call (~3% of a backward's time). Slot s holds at least n elements of T, 64-byte aligned.
// They stay allocated for the thread's life (a few MiB at training shapes). A new buffer, and every buffer after
// poison_tiled_attention_scratch(), is filled with NaN (all-ones bytes, for fp32 and bf16), so that a read of an
// element the kernel did not write first shows in the results instead of passing as stale finite data.
constexpr int kThreadBufferSlots = 17;
constexpr int kPackedSlot = 16;  // the forward's packed K^T and V, on the calling thread

template <typename T>
T* thread_buffer(int slot, int64_t n) {
  constexpr int kSlots = kThreadBufferSlots;
  thread_local std::unique_ptr<char[]> buffers[kSlots];
  thread_local int64_t sizes[kSlots] = {};
  thread_local int generation = -1;
  const int now = tiled_attention_scratch_generation().load(std::memory_order_relaxed);
  if (generation != now) {
    for (int i = 0; i < kSlots; ++i) {
      if (sizes[i] > 0) std::memset(buffers[i].get(), 0xff, sizes[i]);
    }
    generation = now;
  }
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T)) + 64;
  if (sizes[slot] < bytes) {
    buffers[slot].reset(new char[bytes]);
    sizes[slot] = bytes;
    std::memset(buffers[slot].get(), 0xff, bytes);
  }
  const auto addr = reinterpret_cast<uintptr_t>(buffers[slot].get());
  return reinterpret_cast<T*>((addr + 63) / 64 * 64);
}

// Stores of a pair of fp32 vectors as T (the first n elements): avx512_bf16's one-instruction rounding where
// this variant is built with it (at::vec's emulation takes ~10 instructions per vector; it was a quarter of the
// softmax's time), else Lanes' store.
template <typename T>
inline void store_pair(T* p, const Vec& a, const Vec& b, int64_t n = kPairLanes) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const __m512i x = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
    if (n >= kPairLanes) {
      _mm512_storeu_si512(p, x);
    } else {
      _mm512_mask_storeu_epi16(p, static_cast<__mmask32>((uint64_t(1) << n) - 1), x);
    }
    return;
  }
#endif
  Lanes<T, float>::store(p, a, b, n);
}

// dst[0, n) = src[0, n) * mul, rounded to T once.
template <typename T>
inline void store_row(T* dst, const float* src, int64_t n, float mul = 1.f) {
  using F = Lanes<float, float>;
  const Vec vm(mul);
  for (int64_t c = 0; c < n; c += F::kStep) {
    const int64_t w = std::min(F::kStep, n - c);
    auto [x0, x1] = F::load(src + c, w);
    store_pair(dst + c, x0 * vm, x1 * vm, w);
  }
}

// dst [BN][P] groups for rows (r, r + 1) of a tile written as B in VNNI pairs (P = 2), from their fp32 values;
// fp32 (P = 1) stores row r plainly. Only the DEFAULT and AVX2 variants' bf16 backward uses the pairs: the AVX512
// one (built with avx512_bf16) writes them straight from registers in pair_rows.
template <typename T>
void store_row_group(T* dst, const float* row0, const float* row1, int64_t n) {
  if constexpr (kPack<T> == 1) {
    std::memcpy(dst, row0, n * sizeof(float));
  } else {
    static_assert(std::is_same_v<T, at::BFloat16>, "16-bit groups are bf16");
    for (int64_t c = 0; c < n; ++c) {
      dst[2 * c] = static_cast<T>(row0[c]);
      dst[2 * c + 1] = static_cast<T>(row1[c]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Rows of a score tile. Row r of a [BM, BN] fp32 tile sees the columns [a, e); the vectors covering them are
// those of [lo, hi) (whole pairs of vectors), and only the ones at the two edges need masks.

// max without NaN propagation (a NaN score still reaches the output through exp).
inline Vec vmax(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}

struct RowSpan {
  int64_t a, e, lo, hi;
  RowSpan(int64_t a_, int64_t e_) : a(a_), e(e_), lo(a_ / kPairLanes * kPairLanes), hi(round_up(e_, kPairLanes)) {}
  bool empty() const { return a >= e; }
  bool edge(int64_t c) const { return c < a || c + kLanes > e; }  // vector [c, c + kLanes) is partly hidden
};

// The columns of the tile [j0, j0 + n) that a row seeing the keys r sees.
inline RowSpan tile_span(const KeyRange& r, int64_t j0, int64_t n) {
  return RowSpan(std::max(r.lo, j0) - j0, std::min(r.hi, j0 + n) - j0);
}

// Column indices 0, 1, ... as floats, for the edge masks.
struct Iota {
  alignas(64) float v[kTiledAttentionKeys];
  Iota() {
    for (int64_t c = 0; c < kTiledAttentionKeys; ++c) v[c] = static_cast<float>(c);
  }
  Vec visible(int64_t c, const RowSpan& sp) const {
    const Vec idx = Vec::loadu(v + c);
    return (idx >= Vec(static_cast<float>(sp.a))) & (idx < Vec(static_cast<float>(sp.e)));
  }
};

// The largest visible score of a row (unscaled).
inline float row_max(const float* srow, const RowSpan& sp, const Iota& iota) {
  const Vec vneg(kNegInf);
  Vec mx = vneg;
  for (int64_t c = sp.lo; c < sp.hi; c += kLanes) {
    const Vec x = Vec::loadu(srow + c);
    mx = vmax(mx, sp.edge(c) ? Vec::blendv(vneg, x, iota.visible(c, sp)) : x);
  }
  return max_lanes(mx);
}

// out[c] = exp(scale * s[c] - shift) on the visible columns, 0 on the others of [0, n_pad) (plus up to a pair
// of vectors more); returns the row's sum. `shift` is the running max (forward) or the row's lse (backward).
template <typename T>
float row_exp(const float* srow, const RowSpan& sp, float scale, float shift, T* out, int64_t n_pad, const Iota& iota) {
  const Vec vscale(scale), vshift(shift), vzero(0.f);
  for (int64_t c = 0; c < sp.lo; c += kPairLanes) store_pair(out + c, vzero, vzero);
  for (int64_t c = sp.hi; c < n_pad; c += kPairLanes) store_pair(out + c, vzero, vzero);
  Vec sum = vzero;
  for (int64_t c = sp.lo; c < sp.hi; c += kPairLanes) {
    Vec p0 = at::vec::fmsub(Vec::loadu(srow + c), vscale, vshift).exp_u20();
    Vec p1 = at::vec::fmsub(Vec::loadu(srow + c + kLanes), vscale, vshift).exp_u20();
    if (sp.edge(c)) p0 = Vec::blendv(vzero, p0, iota.visible(c, sp));
    if (sp.edge(c + kLanes)) p1 = Vec::blendv(vzero, p1, iota.visible(c + kLanes, sp));
    sum = sum + p0 + p1;
    store_pair(out + c, p0, p1);
  }
  return sum_lanes(sum);
}

// ---------------------------------------------------------------------------------------------
// Forward

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionMask& mask,
                  double scale, const at::Tensor& out, const at::Tensor& lse) {
  constexpr int64_t BM = kTiledAttentionRows, BN = kTiledAttentionKeys, P = kPack<T>;
  const int64_t B = q.size(0), Hq = q.size(1), T_ = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), G = Hq / Hkv;
  const int64_t S_pad = round_up(std::max<int64_t>(S, 1), kKeyAlign), blocks = (T_ + BM - 1) / BM;
  const Visibility vis{mask, mask.key_start.defined() ? mask.key_start.const_data_ptr<int64_t>() : nullptr, S};
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  float* lp = lse.mutable_data_ptr<float>();

  // K^T and V of each (batch, KV head), packed once: every query block and head of the group reads them.
  std::vector<KeyRange> seen(B);
  for (int64_t b = 0; b < B; ++b) seen[b] = vis.rows(b, 0, T_);
  // On the calling thread's own slot (its parallel tasks use slots 0-2 of theirs): this call's workers only read it
  // during the call. Every element is written by the packers.
  T* const packed = thread_buffer<T>(kPackedSlot, B * Hkv * 2 * S_pad * D);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      const KeyRange r = seen[b];
      T* dst = packed + bh * 2 * S_pad * D;
      pack_transposed_words(kp + b * k.stride(0) + h * k.stride(1), k.stride(2), D, r.lo, r.hi, S_pad, dst);
      pack_row_pairs(vp + b * v.stride(0) + h * v.stride(1), v.stride(2), D, r.lo, r.hi, S_pad, dst + S_pad * D);
    }
  });

  const float fscale = static_cast<float>(scale);
  const Iota iota;
  at::parallel_for(0, B * Hkv * blocks, 1, [&](int64_t begin, int64_t end) {
    BrgemmRelease release{P == 2};
    // Online softmax over the key tiles, per row: m the running max of the scaled scores, l the running sum of
    // exp(score - m), o the running sum of exp(score - m) v.
    float* s_buf = thread_buffer<float>(0, BM * BN);
    float* o_buf = thread_buffer<float>(1, BM * D);
    T* p_buf = thread_buffer<T>(2, BM * BN);
    float m[BM], l[BM], m_prev[BM], tile_sum[BM], corr[BM];
    KeyRange ranges[BM];
    for (int64_t u = begin; u < end; ++u) {
      const int64_t bh = u / blocks, b = bh / Hkv, h = bh % Hkv;
      const int64_t t0 = (u % blocks) * BM, M = std::min(BM, T_ - t0);
      for (int64_t r = 0; r < M; ++r) ranges[r] = vis.row(b, t0 + r);
      const KeyRange block = vis.rows(b, t0, M);
      const T* ktp = packed + bh * 2 * S_pad * D;
      const T* vvp = ktp + S_pad * D;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t hq = h * G + g;
        const T* qrows = qp + b * q.stride(0) + hq * q.stride(1) + t0 * q.stride(2);
        std::fill(m, m + BM, kNegInf);
        std::fill(l, l + BM, 0.f);
        std::fill(o_buf, o_buf + BM * D, 0.f);
        for (int64_t j0 = block.lo / BN * BN; j0 < block.hi; j0 += BN) {
          const int64_t n = std::min(BN, block.hi - j0), n_pad = round_up(n, P);
          gemm(M, n, D, q.stride(2), S_pad, BN, false, qrows, ktp + j0 * P, s_buf);
          // Two passes over the rows, each a run of independent per-row chains (one pass per row was latency-bound
          // on its horizontal max, broadcast, exp and sum: 2x slower). 1: the new running max.
          for (int64_t r = 0; r < M; ++r) {
            const RowSpan sp = tile_span(ranges[r], j0, n);
            m_prev[r] = m[r];
            if (!sp.empty()) m[r] = std::max(m[r], row_max(s_buf + r * BN, sp, iota) * fscale);
          }
          // 2: P = exp(scale * S - m) and its row sums.
          for (int64_t r = 0; r < M; ++r) {
            const RowSpan sp = tile_span(ranges[r], j0, n);
            T* prow = p_buf + r * BN;
            if (sp.empty()) {
              std::fill(prow, prow + n_pad, T(0));
              tile_sum[r] = 0.f;
            } else {
              tile_sum[r] = row_exp(s_buf + r * BN, sp, fscale, m[r], prow, n_pad, iota);
            }
          }
          // corr = exp(m_prev - m): 0 before a row's first visible key, 1 where m did not move.
          const Vec vneg(kNegInf), vzero(0.f), vone(1.f);
          for (int64_t r = 0; r < M; r += kLanes) {
            const int64_t w = std::min(kLanes, M - r);
            const Vec mp = Vec::loadu(m_prev + r, w), mn = Vec::loadu(m + r, w);
            Vec c = Vec::blendv((mp - mn).exp_u20(), vone, mp == mn);
            c = Vec::blendv(c, vzero, mp == vneg);
            c.store(corr + r, w);
            (Vec::loadu(l + r, w) * c + Vec::loadu(tile_sum + r, w)).store(l + r, w);
          }
          for (int64_t r = 0; r < M; ++r) {
            if (corr[r] == 1.f || m_prev[r] == kNegInf) continue;  // unchanged, or still all zeros
            float* orow = o_buf + r * D;
            const Vec vc(corr[r]);
            for (int64_t d = 0; d < D; d += kLanes) {
              const int64_t w = std::min(kLanes, D - d);
              (Vec::loadu(orow + d, w) * vc).store(orow + d, w);
            }
          }
          gemm(M, D, n_pad, BN, D, D, true, p_buf, vvp + j0 * D, o_buf);
        }
        T* orows = op + b * out.stride(0) + hq * out.stride(1) + t0 * out.stride(2);
        float* lrows = lp + (b * Hq + hq) * T_ + t0;
        for (int64_t r = 0; r < M; ++r) {
          lrows[r] = l[r] > 0 ? m[r] + std::log(l[r]) : kNegInf;
          store_row(orows + r * out.stride(2), o_buf + r * D, D, l[r] > 0 ? 1.f / l[r] : 0.f);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
// A pair of rows (r, r + 1) of a bf16 backward tile in registers, no fp32 round trip: P = exp(scale * S - lse)
// on the visible columns, dS = scale * P * (dP - delta), stored as the VNNI pairs of the dV and dK products and
// (dS) as the rows of the dQ product (ds_row null: a padding row, not stored). Columns [n, n_pad) and hidden ones
// are zeros; S and dP are read only below n (the rest is unwritten scratch). (The portable path writes P and dS
// rows in fp32 and reads them back to interleave and round them.)
constexpr bool kFusedPairRows = true;
void pair_rows(const float* s0, const float* s1, const float* dp0, const float* dp1, const RowSpan& sp0,
               const RowSpan& sp1, float lse0, float lse1, float delta0, float delta1, float scale, int64_t n,
               int64_t n_pad, at::BFloat16* p_pair, at::BFloat16* ds_pair, at::BFloat16* ds_row0,
               at::BFloat16* ds_row1) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512 vs = _mm512_set1_ps(scale), vl0 = _mm512_set1_ps(lse0), vl1 = _mm512_set1_ps(lse1),
               vd0 = _mm512_set1_ps(delta0), vd1 = _mm512_set1_ps(delta1);
  auto span_mask = [&](const RowSpan& sp, const __m512i& idx) -> __mmask16 {
    return _mm512_cmpge_epi32_mask(idx, _mm512_set1_epi32(static_cast<int32_t>(sp.a))) &
           _mm512_cmplt_epi32_mask(idx, _mm512_set1_epi32(static_cast<int32_t>(sp.e)));
  };
  uint32_t* pp = reinterpret_cast<uint32_t*>(p_pair);
  uint32_t* dsp = reinterpret_cast<uint32_t*>(ds_pair);
  for (int64_t c = 0; c < n_pad; c += 16) {
    const __m512i idx = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(c)));
    const __mmask16 out_mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, n_pad - c)) - 1);
    const __mmask16 in_n = static_cast<__mmask16>((1u << std::clamp<int64_t>(n - c, 0, 16)) - 1);
    const __mmask16 v0 = span_mask(sp0, idx) & in_n, v1 = span_mask(sp1, idx) & in_n;
    __m512 p0 = _mm512_setzero_ps(), p1 = p0, ds0 = p0, ds1 = p0;
    if (v0 != 0) {
      p0 = _mm512_maskz_mov_ps(v0, Vec(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(v0, s0 + c), vs, vl0)).exp_u20());
      ds0 = _mm512_maskz_mul_ps(v0, _mm512_mul_ps(p0, _mm512_sub_ps(_mm512_maskz_loadu_ps(v0, dp0 + c), vd0)), vs);
    }
    if (v1 != 0) {
      p1 = _mm512_maskz_mov_ps(v1, Vec(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(v1, s1 + c), vs, vl1)).exp_u20());
      ds1 = _mm512_maskz_mul_ps(v1, _mm512_mul_ps(p1, _mm512_sub_ps(_mm512_maskz_loadu_ps(v1, dp1 + c), vd1)), vs);
    }
    _mm512_mask_storeu_epi32(pp + c, out_mask,
                             _mm512_permutexvar_epi16(interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(p1, p0))));
    _mm512_mask_storeu_epi32(dsp + c, out_mask,
                             _mm512_permutexvar_epi16(interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(ds1, ds0))));
    if (ds_row0 != nullptr) {
      _mm256_mask_storeu_epi16(ds_row0 + c, out_mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(ds0)));
    }
    if (ds_row1 != nullptr) {
      _mm256_mask_storeu_epi16(ds_row1 + c, out_mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(ds1)));
    }
  }
}
#else
constexpr bool kFusedPairRows = false;
#endif

template <typename T>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& lse, const at::Tensor& delta, const AttentionMask& mask, double scale,
                   const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  constexpr int64_t BM = kTiledAttentionRows, BN = kTiledAttentionKeys, P = kPack<T>;
  const int64_t B = q.size(0), Hq = q.size(1), T_ = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), G = Hq / Hkv;
  const int64_t S_pad = round_up(std::max<int64_t>(S, 1), kKeyAlign), T_pad = round_up(T_, BM), blocks = T_pad / BM;
  const Visibility vis{mask, mask.key_start.defined() ? mask.key_start.const_data_ptr<int64_t>() : nullptr, S};
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const T* gp = grad_out.const_data_ptr<T>();
  const float* lp = lse.const_data_ptr<float>();
  const float* dlp = delta.const_data_ptr<float>();
  T* dqp = dq.mutable_data_ptr<T>();
  T* dkp = dk.mutable_data_ptr<T>();
  T* dvp = dv.mutable_data_ptr<T>();
  const float fscale = static_cast<float>(scale);
  const Iota iota;

  // One task per (batch, KV head): it owns that head's dK, dV and its query heads' dQ, so no two tasks write
  // one gradient. Keys outer (FlashAttention-2's order): per key tile, P and dS of every query block that sees it
  // are kept (in chunks of kRowChunk rows) so that dV^T += dO^T P and dK^T += Q^T dS reduce over all those rows
  // in one product each (per block, those products re-read and re-wrote their fp32 accumulators and ran at a
  // third of the rate); dQ += dS K per block, accumulating in fp32 for the whole head.
  constexpr int64_t kRowChunk = 512;
  const int64_t GT = G * T_pad;  // columns of Q^T, dO^T: head g's rows at g * T_pad
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    BrgemmRelease release{P == 2};
    const int64_t D_pad = round_up(D, 16);
    T* kt = thread_buffer<T>(0, D * S_pad);
    T* vt = thread_buffer<T>(1, D * S_pad);
    T* kv = thread_buffer<T>(2, S_pad * D);
    T* qt = thread_buffer<T>(3, D * GT);
    T* got = thread_buffer<T>(4, D * GT);
    T* scratch = thread_buffer<T>(5, T_pad * D);
    T* p_all = thread_buffer<T>(6, G * kRowChunk * BN);
    T* ds_all = thread_buffer<T>(7, G * kRowChunk * BN);
    T* ds_rows = thread_buffer<T>(8, BM * BN);
    float* dq_acc = thread_buffer<float>(9, G * T_ * D);
    float* dkt = thread_buffer<float>(10, D * BN);
    float* dvt = thread_buffer<float>(11, D * BN);
    float* s_buf = thread_buffer<float>(12, BM * BN);
    float* dp_buf = thread_buffer<float>(13, BM * BN);
    float* rows_tmp = thread_buffer<float>(14, 2 * P * BN);  // P and dS of a VNNI group of rows, fp32
    float* tile_t = thread_buffer<float>(15, BN * D_pad);
    std::vector<KeyRange> ranges(T_), block_ranges(blocks);
    const Vec vscale(fscale);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      const KeyRange seen = vis.rows(b, 0, T_);
      for (int64_t t = 0; t < T_; ++t) ranges[t] = vis.row(b, t);
      for (int64_t i = 0; i < blocks; ++i) block_ranges[i] = vis.rows(b, i * BM, std::min(BM, T_ - i * BM));
      const T* kh = kp + b * k.stride(0) + h * k.stride(1);
      const T* vh = vp + b * v.stride(0) + h * v.stride(1);
      pack_transposed_words(kh, k.stride(2), D, seen.lo, seen.hi, S_pad, kt);
      pack_transposed_words(vh, v.stride(2), D, seen.lo, seen.hi, S_pad, vt);
      pack_row_pairs(kh, k.stride(2), D, seen.lo, seen.hi, S_pad, kv);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t hq = h * G + g;
        pack_transposed(qp + b * q.stride(0) + hq * q.stride(1), q.stride(2), D, T_, T_pad, qt + g * T_pad, GT,
                        scratch);
        pack_transposed(gp + b * grad_out.stride(0) + hq * grad_out.stride(1), grad_out.stride(2), D, T_, T_pad,
                        got + g * T_pad, GT, scratch);
      }
      std::fill(dq_acc, dq_acc + G * T_ * D, 0.f);
      T* dkh = dkp + b * dk.stride(0) + h * dk.stride(1);
      T* dvh = dvp + b * dv.stride(0) + h * dv.stride(1);
      for (int64_t s = 0; s < S; ++s) {  // keys no query sees: zero gradients
        if (s >= seen.lo && s < seen.hi) continue;
        std::fill(dkh + s * dk.stride(2), dkh + s * dk.stride(2) + D, T(0));
        std::fill(dvh + s * dv.stride(2), dvh + s * dv.stride(2) + D, T(0));
      }
      for (int64_t j0 = seen.lo / BN * BN; j0 < seen.hi; j0 += BN) {
        const int64_t n = std::min(BN, seen.hi - j0), n_pad = round_up(n, P);
        // The query blocks that see this key tile: one run (both ends of a row's key range move forward).
        int64_t i_first = blocks, i_end = 0;
        for (int64_t i = 0; i < blocks; ++i) {
          const KeyRange br = block_ranges[i];
          if (br.empty() || br.hi <= j0 || br.lo >= j0 + n) continue;
          i_first = std::min(i_first, i);
          i_end = i + 1;
        }
        if (i_first >= i_end) continue;  // (keys no row sees; their gradients are zero above)
        std::fill(dkt, dkt + D * BN, 0.f);
        std::fill(dvt, dvt + D * BN, 0.f);
        for (int64_t c0 = i_first * BM; c0 < std::min(T_, i_end * BM); c0 += kRowChunk) {
          const int64_t c_end = std::min({c0 + kRowChunk, i_end * BM, T_});  // rows [c0, c_end) of this chunk
          const int64_t R_pad = round_up(c_end - c0, P);
          for (int64_t g = 0; g < G; ++g) {
            const int64_t hq = h * G + g;
            T* pg = p_all + g * kRowChunk * BN;
            T* dsg = ds_all + g * kRowChunk * BN;
            for (int64_t t0 = c0; t0 < c_end; t0 += BM) {
              const int64_t M = std::min(BM, c_end - t0), M_pad = round_up(M, P);
              const T* qrows = qp + b * q.stride(0) + hq * q.stride(1) + t0 * q.stride(2);
              const T* grows = gp + b * grad_out.stride(0) + hq * grad_out.stride(1) + t0 * grad_out.stride(2);
              // The tile's keys this block's rows see end at ni (causal: a block left of the diagonal sees all n;
              // the rest of the P and dS rows, which the dV/dK products reduce over, are written as zeros).
              const int64_t ni = std::min(n, block_ranges[t0 / BM].hi - j0), ni_pad = round_up(ni, P);
              gemm(M, ni, D, q.stride(2), S_pad, BN, false, qrows, kt + j0 * P, s_buf);
              gemm(M, ni, D, grad_out.stride(2), S_pad, BN, false, grows, vt + j0 * P, dp_buf);
              const float* lrow = lp + (b * Hq + hq) * T_ + t0;
              const float* drow = dlp + (b * Hq + hq) * T_ + t0;
              // P = exp(scale * S - lse) and dS = scale * P * (dP - delta) on the visible keys, zeros elsewhere;
              // rows in groups of P (the VNNI pairs of the B operands), padded with zero rows to M_pad.
              for (int64_t r0 = 0; r0 < M_pad; r0 += P) {
                const int64_t row = t0 - c0 + r0;  // in the chunk
                if constexpr (kFusedPairRows && P == 2) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
                  auto span = [&](int64_t r) { return r < M ? tile_span(ranges[t0 + r], j0, n) : RowSpan(0, 0); };
                  const int64_t r1 = r0 + 1;
                  pair_rows(s_buf + r0 * BN, s_buf + r1 * BN, dp_buf + r0 * BN, dp_buf + r1 * BN, span(r0), span(r1),
                            lrow[r0], r1 < M ? lrow[r1] : 0.f, drow[r0], r1 < M ? drow[r1] : 0.f, fscale, ni, n_pad,
                            pg + row * BN, dsg + row * BN, ds_rows + r0 * BN, r1 < M ? ds_rows + r1 * BN : nullptr);
#endif
                  continue;
                }
                for (int64_t gi = 0; gi < P; ++gi) {
                  const int64_t r = r0 + gi;
                  float* pr = rows_tmp + gi * BN;
                  float* dsr = rows_tmp + (P + gi) * BN;
                  const RowSpan sp = r < M ? tile_span(ranges[t0 + r], j0, n) : RowSpan(0, 0);
                  if (sp.empty()) {
                    std::fill(pr, pr + n_pad, 0.f);
                    std::fill(dsr, dsr + n_pad, 0.f);
                  } else {
                    row_exp(s_buf + r * BN, sp, fscale, lrow[r], pr, n_pad, iota);
                    // dS = scale * P * (dP - delta): zero wherever P is, so no masks of its own. dP has ni columns
                    // (the ones up to n_pad are unwritten, so never loaded: 0 * NaN would not be zero).
                    const float* dpr = dp_buf + r * BN;
                    const Vec vd(drow[r]);
                    for (int64_t c = 0; c < n_pad; c += kLanes) {
                      const int64_t w = std::min(kLanes, n_pad - c), wn = std::clamp<int64_t>(ni - c, 0, kLanes);
                      (Vec::loadu(pr + c, w) * (Vec::loadu(dpr + c, wn) - vd) * vscale).store(dsr + c, w);
                    }
                  }
                  if (r < M) store_row(ds_rows + r * BN, dsr, n_pad);
                }
                store_row_group<T>(pg + row * BN, rows_tmp, rows_tmp + (P - 1) * BN, n_pad);
                store_row_group<T>(dsg + row * BN, rows_tmp + P * BN, rows_tmp + (2 * P - 1) * BN, n_pad);
              }
              gemm(M, D, ni_pad, BN, D, D, true, ds_rows, kv + j0 * D, dq_acc + (g * T_ + t0) * D);
            }
            gemm(D, n, R_pad, GT, BN, BN, true, got + g * T_pad + c0, pg, dvt);
            gemm(D, n, R_pad, GT, BN, BN, true, qt + g * T_pad + c0, dsg, dkt);
          }
        }
        // dK, dV of the tile: the transposes of the [D, n] accumulators (fp32: 32-bit words), rounded once.
        for (auto [acc, dst, ld] : {std::tuple{dkt, dkh, dk.stride(2)}, std::tuple{dvt, dvh, dv.stride(2)}}) {
          transpose_words(reinterpret_cast<const uint32_t*>(acc), BN, n, 0, D, D_pad,
                          reinterpret_cast<uint32_t*>(tile_t), D_pad);
          for (int64_t c = 0; c < n; ++c) store_row(dst + (j0 + c) * ld, tile_t + c * D_pad, D);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t hq = h * G + g;
        T* dqh = dqp + b * dq.stride(0) + hq * dq.stride(1);
        for (int64_t t = 0; t < T_; ++t) store_row(dqh + t * dq.stride(2), dq_acc + (g * T_ + t) * D, D);
      }
    }
  });
}

}  // namespace

void tiled_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionMask& mask,
                             double scale, const at::Tensor& out, const at::Tensor& lse) {
  if (q.scalar_type() == at::kBFloat16) {
    forward_impl<at::BFloat16>(q, k, v, mask, scale, out, lse);
  } else {
    TORCH_INTERNAL_ASSERT(q.scalar_type() == at::kFloat, "tiled attention: fp32 or bf16, got ", q.scalar_type());
    forward_impl<float>(q, k, v, mask, scale, out, lse);
  }
}

void tiled_attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta,
                              const AttentionMask& mask, double scale, const at::Tensor& dq, const at::Tensor& dk,
                              const at::Tensor& dv) {
  if (q.scalar_type() == at::kBFloat16) {
    backward_impl<at::BFloat16>(grad_out, q, k, v, lse, delta, mask, scale, dq, dk, dv);
  } else {
    TORCH_INTERNAL_ASSERT(q.scalar_type() == at::kFloat, "tiled attention: fp32 or bf16, got ", q.scalar_type());
    backward_impl<float>(grad_out, q, k, v, lse, delta, mask, scale, dq, dk, dv);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace lckv::ops::cpu
