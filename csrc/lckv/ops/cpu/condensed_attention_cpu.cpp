// The blocked ATen implementation of condensed attention (oneDNN/AMX matmuls for bf16, MKL for
// fp32/fp64) and the call of PyTorch's fused CPU attention with the condensed mask.
//
// Keys that no query sees may hold anything (an unwritten cache slot, a pad). A masked score is
// replaced, not added to, but the products still multiply such a key and its value by a zero
// weight, and 0 * NaN = NaN. The keys a block (or the fused call) covers that none of its rows
// sees (left padding in a block; the keys outside its rows' run in the fused call) are therefore
// checked, by one reduction over just those keys, and zeroed in a copy of K and V only if one is
// not finite: finite ones give exactly the zeros that zeroed ones give.
#include "lckv/ops/cpu/condensed_attention_cpu.h"

#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "lckv/autocast.h"
#include "lckv/ops/accumulate.h"
#include "lckv/ops/cpu/fused_kernels.h"

namespace lckv::ops::cpu {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// [tq, ke - kb] bool: true where key s in [kb, ke) is hidden from query row t in [t0, t0 + tq) by the
// causal/strict and window rules (key_start is applied by the callers that support it).
at::Tensor hidden_keys(const AttentionMask& m, int64_t t0, int64_t tq, int64_t kb, int64_t ke) {
  auto opts = at::TensorOptions().dtype(at::kLong);
  at::Tensor pos = at::arange(m.q_offset + t0, m.q_offset + t0 + tq, opts).unsqueeze(1);
  at::Tensor key = at::arange(kb, ke, opts).unsqueeze(0);
  at::Tensor hidden = m.strict ? key.ge(pos) : key.gt(pos);
  if (m.window > 0) hidden = hidden.logical_or(key.le(pos - m.window));
  return hidden;
}

// Whether x is all finite, by one reduction: its sum is NaN or inf if an element is (or, harmlessly,
// if it overflows).
bool all_finite(const at::Tensor& x) { return x.numel() == 0 || std::isfinite(x.sum().item<double>()); }

// One block of query rows [t0, t0 + tb) and the key range [kb, ke) it multiplies with: the union of its
// rows' ranges [seen_kb, seen_ke), widened to a multiple of kKeyMultiple keys where S allows, since
// oneDNN's bf16 matmul is ~2x slower for other key counts (strict attention over 511 keys, say). Every
// key of [seen_kb, seen_ke) is seen by some row unless key_start hides it; the widening keys by none.
struct Block {
  int64_t t0, tb, kb, ke, seen_kb, seen_ke;
};

constexpr int64_t kKeyMultiple = 16;

Block make_block(const AttentionMask& m, int64_t t0, int64_t tb, int64_t S) {
  const int64_t first = m.q_offset + t0, last = m.q_offset + t0 + tb - 1;
  const int64_t kb = std::min(S, m.key_begin(first));
  const int64_t ke = std::max(kb, std::min(S, m.key_end(last)));
  if ((m.strict && m.window == 1) || ke == kb) return {t0, tb, kb, kb, kb, kb};  // no row sees a key
  const int64_t want = (ke - kb + kKeyMultiple - 1) / kKeyMultiple * kKeyMultiple;
  const int64_t wide_ke = std::min(S, kb + want);
  const int64_t wide_kb = std::max<int64_t>(0, wide_ke - want);
  return {t0, tb, wide_kb, wide_ke, kb, ke};
}

// x [B, Hkv, n, D], or, if one of its keys outside [lo, hi) (keys no query sees) is not finite, a copy with
// those keys set to zero: finite ones give exactly the zeros that zeroed ones give.
at::Tensor without_unseen_keys(const at::Tensor& x, int64_t lo, int64_t hi) {
  const int64_t n = x.size(2);
  if (all_finite(x.narrow(2, 0, lo)) && all_finite(x.narrow(2, hi, n - hi))) return x;
  at::Tensor y = x.clone();
  y.narrow(2, 0, lo).zero_();
  y.narrow(2, hi, n - hi).zero_();
  return y;
}

// x [B, Hkv, ke - kb, D] of a block's keys, with its widening keys (which no row sees) as without_unseen_keys.
at::Tensor without_widening(const at::Tensor& x, const Block& b) {
  return without_unseen_keys(x, b.seen_kb - b.kb, b.seen_ke - b.kb);
}

// The keys of a block that no row sees because of key_start: padded [B, 1, ns, 1] marks the keys
// before key_start[b]; they all lie in the first pad_span keys. (The causal, strict and window
// rules hide keys from some rows only: each key of a block's range is seen by one of its rows.)
struct BlockPadding {
  at::Tensor padded;
  int64_t pad_span = 0;
};

BlockPadding block_padding(const AttentionMask& m, const Block& b, int64_t B, int64_t pad_end) {
  BlockPadding bp;
  if (!m.key_start.defined()) return bp;
  const int64_t ns = b.ke - b.kb;
  at::Tensor key = at::arange(b.kb, b.ke, at::TensorOptions().dtype(at::kLong));
  bp.padded = key.lt(m.key_start.view({B, 1})).view({B, 1, ns, 1});
  bp.pad_span = std::clamp<int64_t>(pad_end - b.kb, 0, ns);
  return bp;
}

int64_t max_key_start(const AttentionMask& m) {
  return m.key_start.defined() && m.key_start.numel() > 0 ? m.key_start.max().item<int64_t>() : 0;
}

// x [B, Hkv, ns, D] of the block's key range, or, if a key in the padding's span is not finite, a
// copy with the padded keys set to zero.
at::Tensor without_padding(const at::Tensor& x, const BlockPadding& bp) {
  if (bp.pad_span == 0 || all_finite(x.narrow(2, 0, bp.pad_span))) return x;
  return x.masked_fill(bp.padded, 0);
}

// The mask as the fused block kernels read it: key_start contiguous.
AttentionMask kernel_mask(const AttentionMask& m) {
  AttentionMask km = m;
  if (km.key_start.defined()) km.key_start = km.key_start.contiguous();
  return km;
}

// out [B, H, rows, D] and lse [B, H, rows] of the query rows [first, first + rows) that see a key, padded
// to all T rows (zeros, lse = -inf), out in [B, T, H, D] layout so that the caller's transpose + reshape
// to [B, T, H * D] stays a view.
std::tuple<at::Tensor, at::Tensor> pad_rows(const at::Tensor& out, const at::Tensor& lse, int64_t B, int64_t T,
                                            int64_t H, int64_t D, int64_t first) {
  const int64_t rows = out.size(2);
  at::Tensor padded = at::empty({B, T, H, D}, out.options());  // zeroes only the pad rows
  padded.narrow(1, 0, first).zero_();
  padded.narrow(1, first + rows, T - first - rows).zero_();
  padded.narrow(1, first, rows).copy_(out.transpose(1, 2));
  at::Tensor full_lse = at::full({B, H, T}, -kInf, lse.options());
  full_lse.narrow(2, first, rows).copy_(lse);
  return std::make_tuple(padded.transpose(1, 2), full_lse);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> condensed_attention_forward_blocked(const at::Tensor& q, const at::Tensor& k,
                                                                       const at::Tensor& v, const AttentionParams& p,
                                                                       double scale) {
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), G = Hq / Hkv;
  const auto acc = accumulate_dtype(q.scalar_type());
  const int64_t pad_end = max_key_start(p.mask);
  const AttentionMask km = kernel_mask(p.mask);
  const FusedKernels& kernels = active_fused_kernels();

  at::Tensor out = at::zeros({B, Hkv, G, T, D}, q.options());
  at::Tensor lse = at::full({B, Hkv, G, T}, -kInf, q.options().dtype(acc));
  const at::Tensor q5 = q.reshape({B, Hkv, G, T, D});
  for (int64_t t0 = 0; t0 < T; t0 += p.query_block) {
    const Block b = make_block(p.mask, t0, std::min(p.query_block, T - t0), S);
    if (b.ke == b.kb) continue;  // no row of this block sees a key: zeros, lse = -inf
    const int64_t ns = b.ke - b.kb;
    const BlockPadding bp = block_padding(p.mask, b, B, pad_end);
    at::Tensor qb = q5.narrow(3, b.t0, b.tb).reshape({B, Hkv, G * b.tb, D});
    at::Tensor kk = without_widening(without_padding(k.narrow(2, b.kb, ns), bp), b);
    at::Tensor vv = without_widening(without_padding(v.narrow(2, b.kb, ns), bp), b);
    // Scores in q's dtype (the matmul's), softmax in acc: one fused pass for mask, scale, exp, sum.
    const at::Tensor s = at::matmul(qb, kk.transpose(-1, -2)).contiguous();
    at::Tensor probs = at::empty_like(s);
    at::Tensor block_lse = at::empty({B * Hkv * G * b.tb}, lse.options());
    kernels.block_softmax(s, km, b.t0, b.tb, b.kb, scale, probs, block_lse);
    lse.narrow(3, b.t0, b.tb).copy_(block_lse.view({B, Hkv, G, b.tb}));
    out.narrow(3, b.t0, b.tb).copy_(at::matmul(probs, vv).view({B, Hkv, G, b.tb, D}));
  }
  return {out.view({B, Hq, T, D}), lse.view({B, Hq, T})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> condensed_attention_backward_blocked(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const AttentionParams& p, double scale) {
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), G = Hq / Hkv;
  const auto dt = q.scalar_type();
  const auto acc = accumulate_dtype(dt);
  const int64_t pad_end = max_key_start(p.mask);
  const AttentionMask km = kernel_mask(p.mask);
  const FusedKernels& kernels = active_fused_kernels();

  const at::Tensor go = grad_out.to(dt), oo = out.to(dt);
  const at::Tensor q5 = q.reshape({B, Hkv, G, T, D});
  const at::Tensor do5 = go.reshape({B, Hkv, G, T, D});
  // rowsum(dO * O) of every row at once, in one fused pass (three ATen passes cost ~10% of the backward).
  at::Tensor delta_all = at::empty({B, Hq, T}, q.options().dtype(acc));
  kernels.row_dot(go.stride(3) == 1 ? go : go.contiguous(), oo.stride(3) == 1 ? oo : oo.contiguous(), delta_all);
  const at::Tensor delta4 = delta_all.view({B, Hkv, G, T});
  const at::Tensor lse4 = lse.to(acc).reshape({B, Hkv, G, T});
  // Blocks of the forward's query_block rows: 128-row blocks waste less on the diagonal tiles and were faster
  // for the op alone, but slower inside a training step (0.44 vs 0.40 s for Llama at T = 512, one process).
  const int64_t qblock = p.query_block;
  // One block over all keys (T <= qblock, e.g. the T = 128 training chunk): the products are the gradients
  // themselves, written once in q's dtype, without fp32 accumulators, adds and casts.
  const Block only = make_block(p.mask, 0, T, S);
  if (T <= qblock && only.kb == 0 && only.ke == S && !p.mask.key_start.defined()) {
    const int64_t rows = G * T;
    const at::Tensor qb = q5.reshape({B, Hkv, rows, D}), dob = do5.reshape({B, Hkv, rows, D});
    const at::Tensor kk = without_widening(k, only), vv = without_widening(v, only);
    const at::Tensor s = at::matmul(qb, kk.transpose(-1, -2)).contiguous();
    const at::Tensor dp = at::matmul(dob, vv.transpose(-1, -2)).contiguous();
    const at::Tensor delta = delta4.reshape({-1});
    const at::Tensor block_lse = lse4.reshape({-1}).contiguous();
    at::Tensor probs = at::empty_like(s), ds = at::empty_like(s);
    kernels.block_softmax_backward(s, dp, delta, block_lse, km, 0, T, 0, scale, probs, ds);
    at::Tensor dv = at::matmul(probs.transpose(-1, -2), dob);
    at::Tensor dk = at::matmul(ds.transpose(-1, -2), qb);
    at::Tensor dq = at::matmul(ds, kk);
    return {dq.view({B, Hq, T, D}), dk, dv};
  }
  at::Tensor dq = at::zeros({B, Hkv, G, T, D}, q.options());
  at::Tensor dk = at::zeros({B, Hkv, S, D}, q.options().dtype(acc));
  at::Tensor dv = at::zeros({B, Hkv, S, D}, q.options().dtype(acc));
  for (int64_t t0 = 0; t0 < T; t0 += qblock) {
    const Block b = make_block(p.mask, t0, std::min(qblock, T - t0), S);
    if (b.ke == b.kb) continue;
    const int64_t ns = b.ke - b.kb, rows = G * b.tb;
    const BlockPadding bp = block_padding(p.mask, b, B, pad_end);
    at::Tensor qb = q5.narrow(3, b.t0, b.tb).reshape({B, Hkv, rows, D});
    at::Tensor dob = do5.narrow(3, b.t0, b.tb).reshape({B, Hkv, rows, D});
    at::Tensor kk = without_widening(without_padding(k.narrow(2, b.kb, ns), bp), b);
    at::Tensor vv = without_widening(without_padding(v.narrow(2, b.kb, ns), bp), b);
    // Probabilities recomputed from the saved lse; dS = P * (dP - rowsum(dO * O)), the softmax
    // backward written with the forward output, in one fused pass.
    const at::Tensor s = at::matmul(qb, kk.transpose(-1, -2)).contiguous();
    const at::Tensor dp = at::matmul(dob, vv.transpose(-1, -2)).contiguous();
    const at::Tensor delta = delta4.narrow(3, b.t0, b.tb).contiguous();
    const at::Tensor block_lse = lse4.narrow(3, b.t0, b.tb).contiguous();
    at::Tensor probs = at::empty_like(s), ds = at::empty_like(s);
    kernels.block_softmax_backward(s, dp, delta, block_lse, km, b.t0, b.tb, b.kb, scale, probs, ds);
    dv.narrow(2, b.kb, ns).add_(at::matmul(probs.transpose(-1, -2), dob));
    dk.narrow(2, b.kb, ns).add_(at::matmul(ds.transpose(-1, -2), qb));
    dq.narrow(3, b.t0, b.tb).copy_(at::matmul(ds, kk).view({B, Hkv, G, b.tb, D}));
  }
  return {dq.view({B, Hq, T, D}), dk.to(dt), dv.to(dt)};
}

std::optional<std::tuple<at::Tensor, at::Tensor>> condensed_attention_forward_flash(const at::Tensor& q,
                                                                                     const at::Tensor& k,
                                                                                     const at::Tensor& v,
                                                                                     const AttentionParams& p,
                                                                                     double scale) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), S = k.size(2);
  const AttentionMask& m = p.mask;
  if (m.window <= 0 && m.q_offset == 0 && T == S) {
    if (!m.strict) return at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, /*is_causal=*/true, {}, scale);
    // Strict is causal one row down: query t >= 1 sees keys s < t, which is the kernel's own top-left
    // causal mask for queries 1.. T-1 over all T keys (row i sees keys <= i). No mask tensor to build
    // or read, masked tiles skipped (an additive mask made the kernel compute every tile), and S stays
    // a multiple of 16 (the kernel is ~2x slower otherwise). Row 0 sees no key: zeros, lse = -inf.
    if (T == 1) return std::nullopt;
    // The last key is seen by no row but enters the kernel's products.
    auto [rows_out, rows_lse] = at::_scaled_dot_product_flash_attention_for_cpu(
        q.narrow(2, 1, T - 1), without_unseen_keys(k, 0, S - 1), without_unseen_keys(v, 0, S - 1), 0.0,
        /*is_causal=*/true, {}, scale);
    return pad_rows(rows_out, rows_lse, B, T, H, D, /*first=*/1);
  }
  // The fused kernel gives NaN for a row that sees no key (a strict row at position 0, say). The
  // rows that see some key are one run, since both ends of a row's key range only move forward with
  // its position: attend with that run, and give the rest zeros and lse = -inf, in [B, T, H, D]
  // layout for out, so that the caller's transpose + reshape to [B, T, H * D] stays a view.
  const at::Tensor visible = hidden_keys(m, 0, T, 0, S).logical_not();
  const at::Tensor sees = visible.any(-1);
  const int64_t rows = sees.sum().item<int64_t>();
  if (rows == 0) return std::nullopt;
  const int64_t first = sees.to(at::kByte).argmax().item<int64_t>();
  TORCH_INTERNAL_ASSERT(sees.narrow(0, first, rows).all().item<bool>(), "rows that see a key are not one run");
  // Those rows see the keys [lo, hi), one run too; the keys outside it are zeroed if one is not
  // finite. (Attending over [lo, hi) alone would leave them out too, but the fused kernel is ~2x
  // slower when the number of keys is not a multiple of 16, as for strict attention with S = T = 128.)
  const int64_t lo = m.key_begin(m.q_offset + first), hi = std::min(S, m.key_end(m.q_offset + first + rows - 1));
  const at::Tensor kk = without_unseen_keys(k, lo, hi), vv = without_unseen_keys(v, lo, hi);
  // The kernel takes an additive mask in q's dtype: 0 where visible, -inf where hidden.
  const at::Tensor additive =
      at::zeros({rows, S}, q.options()).masked_fill_(visible.narrow(0, first, rows).logical_not(), -kInf);
  auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(q.narrow(2, first, rows), kk, vv, 0.0, false,
                                                                    additive, scale);
  if (rows == T) return std::make_tuple(out, lse);
  return pad_rows(out, lse, B, T, H, D, first);
}

bool flash_backward_applies(const at::Tensor& q, const at::Tensor& k, const AttentionParams& p) {
  const AttentionMask& m = p.mask;
  const int64_t T = q.size(2);
  return m.window <= 0 && m.q_offset == 0 && !m.key_start.defined() && T == k.size(2) && T > 1 &&
         q.scalar_type() != at::kDouble;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> condensed_attention_backward_flash(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const AttentionParams& p, double scale) {
  TORCH_INTERNAL_ASSERT(flash_backward_applies(q, k, p), "condensed_attention_backward_flash: unsupported mask");
  const auto dt = q.scalar_type();
  const at::Tensor go = grad_out.to(dt), oo = out.to(dt), ll = lse.to(at::kFloat);
  if (!p.mask.strict) {
    return at::_scaled_dot_product_flash_attention_for_cpu_backward(go, q, k, v, oo, ll.contiguous(), 0.0,
                                                                    /*is_causal=*/true, {}, scale);
  }
  // Strict, as the forward computes it: queries 1..T-1 causally over all T keys (row i sees keys <= i). Row 0
  // sees no key (dq = 0); the last key is seen by none (its dk, dv are 0), and a non-finite one is zeroed as
  // in the forward, so that it cannot reach dq through the products.
  const int64_t T = q.size(2), S = k.size(2);
  const at::Tensor kk = without_unseen_keys(k, 0, S - 1), vv = without_unseen_keys(v, 0, S - 1);
  auto [dq_rows, dk, dv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
      go.narrow(2, 1, T - 1), q.narrow(2, 1, T - 1), kk, vv, oo.narrow(2, 1, T - 1),
      ll.narrow(2, 1, T - 1).contiguous(), 0.0, /*is_causal=*/true, {}, scale);
  at::Tensor dq = at::empty(q.sizes(), dq_rows.options());
  dq.narrow(2, 0, 1).zero_();
  dq.narrow(2, 1, T - 1).copy_(dq_rows);
  return {dq, dk, dv};
}

namespace {

// Whether brgemm computes a 32 x 32 x 32 product of this dtype right here (oneDNN may refuse a kernel, e.g.
// under ONEDNN_MAX_CPU_ISA): checked once, against at::matmul, on fixed values (drawing random ones would
// advance the user's generator on the first attention call).
template <typename T>
bool brgemm_works() {
  try {
    constexpr int64_t n = 32, P = sizeof(T) == 2 ? 2 : 1;
    const at::Tensor i = at::arange(n * n, at::kFloat).view({n, n});
    const at::Tensor a = (at::remainder(i, 7) - 3).div(4).to(c10::CppTypeToScalarType<T>::value);
    const at::Tensor b = (at::remainder(i * 3, 11) - 5).div(8).to(a.scalar_type());
    // b packed in VNNI pairs of rows ([n / P][n][P]) for 16-bit types.
    const at::Tensor packed = b.view({n / P, P, n}).transpose(1, 2).contiguous();
    at::Tensor c = at::empty({n, n});
    at::native::cpublas::brgemm(n, n, n, n, n, n, false, a.const_data_ptr<T>(), packed.const_data_ptr<T>(),
                                c.mutable_data_ptr<float>(), P == 2);
    at::native::cpublas::brgemm_release(P == 2);
    return at::allclose(c, at::matmul(a.to(at::kFloat), b.to(at::kFloat)), 1e-3, 1e-3);
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

std::atomic<int>& tiled_attention_scratch_generation() {
  static std::atomic<int> generation{0};
  return generation;
}

void poison_tiled_attention_scratch() { ++tiled_attention_scratch_generation(); }

bool tiled_attention_applies(const at::Tensor& q) {
  if (!q.device().is_cpu() || !at::globalContext().userEnabledMkldnn()) return false;
  const int64_t D = q.size(3);
  if (D <= 0 || D % 2 != 0 || D > kMaxTiledHeadDim) return false;
  if (q.scalar_type() == at::kBFloat16) {
    // avx512_bf16 (which the AMX CPUs have too): the kernel's AVX512 variant rounds to bf16 with its instructions.
    static const bool ok = cpu_has_capability("avx512_bf16") && brgemm_works<at::BFloat16>();
    return ok;
  }
  if (q.scalar_type() == at::kFloat) {
    static const bool ok = cpu_has_capability("avx2") && brgemm_works<float>();
    return ok;
  }
  return false;
}

namespace {

// x as the tiled kernel reads it: unit stride in D and, for 16-bit types, even strides and offset, since it
// moves pairs of elements as 32-bit words (a view with an odd row stride is copied).
at::Tensor tiled_layout(const at::Tensor& x) {
  const bool pairs = x.element_size() == 2;
  auto even = [](int64_t v) { return v % 2 == 0; };
  const bool ok = x.stride(3) == 1 && (!pairs || (even(x.stride(0)) && even(x.stride(1)) && even(x.stride(2)) &&
                                                  even(x.storage_offset())));
  return ok ? x : x.contiguous();
}

// An empty [B, H, T, D] tensor laid out as [B, T, H, D] (the model's layout around attention).
at::Tensor empty_bthd(const at::Tensor& like, at::ScalarType dtype) {
  return at::empty({like.size(0), like.size(2), like.size(1), like.size(3)}, like.options().dtype(dtype))
      .transpose(1, 2);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> condensed_attention_forward_tiled(const at::Tensor& q, const at::Tensor& k,
                                                                     const at::Tensor& v, const AttentionParams& p,
                                                                     double scale) {
  TORCH_CHECK(tiled_attention_applies(q), "condensed_attention: the tiled CPU path takes fp32 (AVX2) or bf16 (AMX or "
              "avx512_bf16) with an even head dim <= ", kMaxTiledHeadDim, ", got ", q.scalar_type(), " and head dim ",
              q.size(3), " on this CPU");
  at::Tensor out = empty_bthd(q, q.scalar_type());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  active_fused_kernels().tiled_attention_forward(tiled_layout(q), tiled_layout(k), tiled_layout(v),
                                                 kernel_mask(p.mask), scale, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> condensed_attention_backward_tiled(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const AttentionParams& p, double scale) {
  TORCH_CHECK(tiled_attention_applies(q), "condensed_attention backward: the tiled CPU path takes fp32 (AVX2) or bf16 "
              "(AMX or avx512_bf16) with an even head dim <= ", kMaxTiledHeadDim, ", got ", q.scalar_type(),
              " and head dim ", q.size(3), " on this CPU");
  const auto dt = q.scalar_type();
  const FusedKernels& kernels = active_fused_kernels();
  const at::Tensor go = tiled_layout(grad_out.to(dt)), oo = tiled_layout(out.to(dt));
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  kernels.row_dot(go, oo, delta);
  at::Tensor dq = empty_bthd(q, dt), dk = empty_bthd(k, dt), dv = empty_bthd(k, dt);
  kernels.tiled_attention_backward(go, tiled_layout(q), tiled_layout(k), tiled_layout(v),
                                   lse.to(at::kFloat).contiguous(), delta, kernel_mask(p.mask), scale, dq, dk, dv);
  return {dq, dk, dv};
}

}  // namespace lckv::ops::cpu
