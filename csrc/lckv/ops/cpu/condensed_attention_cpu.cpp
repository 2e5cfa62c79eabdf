// The blocked ATen implementation of condensed attention (oneDNN/AMX matmuls for bf16, MKL for
// fp32/fp64) and the call of PyTorch's fused CPU attention with the condensed mask as booleans.
//
// Keys that no query sees may hold anything (an unwritten cache slot, a pad). A masked score is
// replaced, not added to, but the products still multiply such a key and its value by a zero
// weight, and 0 * NaN = NaN. The keys a block (or the fused call) covers that none of its rows
// sees (left padding in a block; the keys outside its rows' run in the fused call) are therefore
// checked, by one reduction over just those keys, and zeroed in a copy of K and V only if one is
// not finite: finite ones give exactly the zeros that zeroed ones give.
#include "lckv/ops/cpu/condensed_attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "lckv/ops/accumulate.h"

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

// One block of query rows [t0, t0 + tb) and the key range [kb, ke) they can see: the union of its
// rows' ranges, so every key in it is seen by some row unless key_start hides it.
struct Block {
  int64_t t0, tb, kb, ke;
};

Block make_block(const AttentionMask& m, int64_t t0, int64_t tb, int64_t S) {
  const int64_t first = m.q_offset + t0, last = m.q_offset + t0 + tb - 1;
  const int64_t kb = std::min(S, m.key_begin(first));
  const int64_t ke = std::min(S, m.key_end(last));
  if (m.strict && m.window == 1) return {t0, tb, kb, kb};  // every row's range [p, p) is empty
  return {t0, tb, kb, std::max(kb, ke)};
}

// The mask of a block: hidden [nb, 1, 1, tb, ns] is true where a key of the block's range is hidden
// from a row (nb = B with key_start, else 1). With key_start, padded [B, 1, ns, 1] marks the keys
// before key_start[b], the only ones no row sees; they all lie in the first pad_span keys.
struct BlockMask {
  at::Tensor hidden, padded;
  int64_t pad_span = 0;
};

BlockMask block_mask(const AttentionMask& m, const Block& b, int64_t B, int64_t pad_end) {
  const int64_t ns = b.ke - b.kb;
  at::Tensor hidden = hidden_keys(m, b.t0, b.tb, b.kb, b.ke);  // [tb, ns]
  BlockMask bm;
  if (!m.key_start.defined()) {
    bm.hidden = hidden.view({1, 1, 1, b.tb, ns});
    return bm;
  }
  at::Tensor key = at::arange(b.kb, b.ke, at::TensorOptions().dtype(at::kLong));
  at::Tensor padded = key.lt(m.key_start.view({B, 1}));  // [B, ns]
  bm.hidden = hidden.unsqueeze(0).logical_or(padded.unsqueeze(1)).view({B, 1, 1, b.tb, ns});
  bm.padded = padded.view({B, 1, ns, 1});
  bm.pad_span = std::clamp<int64_t>(pad_end - b.kb, 0, ns);
  return bm;
}

int64_t max_key_start(const AttentionMask& m) {
  return m.key_start.defined() && m.key_start.numel() > 0 ? m.key_start.max().item<int64_t>() : 0;
}

// Whether x is all finite, by one reduction: its sum is NaN or inf if an element is (or, harmlessly,
// if it overflows).
bool all_finite(const at::Tensor& x) { return x.numel() == 0 || std::isfinite(x.sum().item<double>()); }

// x [B, Hkv, ns, D] of the block's key range, or, if a key in the padding's span is not finite, a
// copy with the padded keys set to zero.
at::Tensor without_padding(const at::Tensor& x, const BlockMask& bm) {
  if (bm.pad_span == 0 || all_finite(x.narrow(2, 0, bm.pad_span))) return x;
  return x.masked_fill(bm.padded, 0);
}

// Scaled scores of one block with hidden keys at -inf: [B, Hkv, G, tb, ns] in the accumulate type.
at::Tensor block_scores(const at::Tensor& qb, const at::Tensor& kk, const BlockMask& bm, const Block& b, int64_t G,
                        double scale, at::ScalarType acc) {
  const int64_t B = qb.size(0), Hkv = qb.size(1), ns = b.ke - b.kb;
  at::Tensor s = at::matmul(qb, kk.transpose(-1, -2)).to(acc).mul_(scale).view({B, Hkv, G, b.tb, ns});
  return s.masked_fill_(bm.hidden, -kInf);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> condensed_attention_forward_blocked(const at::Tensor& q, const at::Tensor& k,
                                                                       const at::Tensor& v, const AttentionParams& p,
                                                                       double scale) {
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), G = Hq / Hkv;
  const auto acc = accumulate_dtype(q.scalar_type());
  const int64_t pad_end = max_key_start(p.mask);

  at::Tensor out = at::zeros({B, Hkv, G, T, D}, q.options());
  at::Tensor lse = at::full({B, Hkv, G, T}, -kInf, q.options().dtype(acc));
  const at::Tensor q5 = q.reshape({B, Hkv, G, T, D});
  for (int64_t t0 = 0; t0 < T; t0 += p.query_block) {
    const Block b = make_block(p.mask, t0, std::min(p.query_block, T - t0), S);
    if (b.ke == b.kb) continue;  // no row of this block sees a key: zeros, lse = -inf
    const BlockMask bm = block_mask(p.mask, b, B, pad_end);
    at::Tensor qb = q5.narrow(3, b.t0, b.tb).reshape({B, Hkv, G * b.tb, D});
    at::Tensor kk = without_padding(k.narrow(2, b.kb, b.ke - b.kb), bm);
    at::Tensor vv = without_padding(v.narrow(2, b.kb, b.ke - b.kb), bm);
    at::Tensor s = block_scores(qb, kk, bm, b, G, scale, acc);
    at::Tensor row_max = std::get<0>(s.max(-1, true));
    row_max.masked_fill_(row_max.isinf(), 0);  // rows with no visible key: keep exp() at 0, not NaN
    at::Tensor e = (s - row_max).exp_();
    at::Tensor denom = e.sum(-1, true);
    lse.narrow(3, b.t0, b.tb).copy_((row_max + denom.log()).squeeze(-1));
    at::Tensor probs = e.div_(denom.clamp_min(std::numeric_limits<float>::min()));
    at::Tensor ob = at::matmul(probs.view({B, Hkv, G * b.tb, b.ke - b.kb}).to(v.scalar_type()), vv);
    out.narrow(3, b.t0, b.tb).copy_(ob.view({B, Hkv, G, b.tb, D}));
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

  at::Tensor dq = at::zeros({B, Hkv, G, T, D}, q.options());
  at::Tensor dk = at::zeros({B, Hkv, S, D}, q.options().dtype(acc));
  at::Tensor dv = at::zeros({B, Hkv, S, D}, q.options().dtype(acc));
  const at::Tensor q5 = q.reshape({B, Hkv, G, T, D});
  const at::Tensor do5 = grad_out.to(dt).reshape({B, Hkv, G, T, D});
  const at::Tensor o5 = out.reshape({B, Hkv, G, T, D});
  const at::Tensor lse4 = lse.reshape({B, Hkv, G, T});
  for (int64_t t0 = 0; t0 < T; t0 += p.query_block) {
    const Block b = make_block(p.mask, t0, std::min(p.query_block, T - t0), S);
    if (b.ke == b.kb) continue;
    const int64_t ns = b.ke - b.kb, rows = G * b.tb;
    const BlockMask bm = block_mask(p.mask, b, B, pad_end);
    at::Tensor qb = q5.narrow(3, b.t0, b.tb).reshape({B, Hkv, rows, D});
    at::Tensor dob = do5.narrow(3, b.t0, b.tb).reshape({B, Hkv, rows, D});
    at::Tensor ob = o5.narrow(3, b.t0, b.tb).reshape({B, Hkv, rows, D});
    at::Tensor kk = without_padding(k.narrow(2, b.kb, ns), bm), vv = without_padding(v.narrow(2, b.kb, ns), bm);
    at::Tensor s = block_scores(qb, kk, bm, b, G, scale, acc);
    at::Tensor row_lse = lse4.narrow(3, b.t0, b.tb).unsqueeze(-1).clone();
    row_lse.masked_fill_(row_lse.isinf(), 0);  // empty rows: every score is -inf, so probs stay 0
    at::Tensor probs = (s - row_lse).exp_().view({B, Hkv, rows, ns});
    // dS = P * (dP - rowsum(dO * O)), the softmax backward written with the forward output.
    at::Tensor delta = (dob.to(acc) * ob.to(acc)).sum(-1, true);
    at::Tensor dp = at::matmul(dob, vv.transpose(-1, -2)).to(acc);
    at::Tensor ds = probs.mul(dp.sub_(delta)).mul_(scale).to(dt);
    dv.narrow(2, b.kb, ns).add_(at::matmul(probs.to(dt).transpose(-1, -2), dob));
    dk.narrow(2, b.kb, ns).add_(at::matmul(ds.transpose(-1, -2), qb));
    dq.narrow(3, b.t0, b.tb).copy_(at::matmul(ds, kk).view({B, Hkv, G, b.tb, D}));
  }
  return {dq.view({B, Hq, T, D}), dk.to(dt), dv.to(dt)};
}

std::optional<at::Tensor> condensed_attention_sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const AttentionParams& p) {
  const int64_t T = q.size(2), S = k.size(2);
  const std::optional<double> scale = p.scale > 0 ? std::optional<double>(p.scale) : std::nullopt;
  const AttentionMask& m = p.mask;
  if (!m.strict && m.window <= 0 && m.q_offset == 0 && T == S) {
    return at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true, scale, /*enable_gqa=*/true);
  }
  // SDPA gives NaN for a row that sees no key (a strict row at position 0, say). The rows that see
  // some key are one run, since both ends of a row's key range only move forward with its
  // position: attend with that run, and zero-pad the rest in [B, T, H, D] layout, so that the
  // caller's transpose + reshape to [B, T, H * D] stays a view.
  const at::Tensor visible = hidden_keys(m, 0, T, 0, S).logical_not();
  const at::Tensor sees = visible.any(-1);
  const int64_t rows = sees.sum().item<int64_t>();
  if (rows == 0) return std::nullopt;
  const int64_t first = sees.to(at::kByte).argmax().item<int64_t>();
  TORCH_INTERNAL_ASSERT(sees.narrow(0, first, rows).all().item<bool>(), "rows that see a key are not one run");
  // Those rows see the keys [lo, hi), one run too; the keys outside it are zeroed if one is not
  // finite. (Attending over [lo, hi) alone would leave them out too, but SDPA is ~2x slower when
  // the number of keys is not a multiple of 16, as for strict attention with S = T = 128.)
  const int64_t lo = m.key_begin(m.q_offset + first), hi = std::min(S, m.key_end(m.q_offset + first + rows - 1));
  auto finite_outside = [&](const at::Tensor& x) {
    return all_finite(x.narrow(2, 0, lo)) && all_finite(x.narrow(2, hi, S - hi));
  };
  at::Tensor kk = k, vv = v;
  if (!finite_outside(k) || !finite_outside(v)) {
    const at::Tensor key = at::arange(S, at::TensorOptions().dtype(at::kLong));
    const at::Tensor unseen = key.lt(lo).logical_or(key.ge(hi)).view({1, 1, S, 1});
    kk = k.masked_fill(unseen, 0), vv = v.masked_fill(unseen, 0);
  }
  at::Tensor out = at::scaled_dot_product_attention(q.narrow(2, first, rows), kk, vv, visible.narrow(0, first, rows),
                                                    0.0, false, scale, /*enable_gqa=*/true);
  if (rows == T) return out;
  at::Tensor padded = at::empty({q.size(0), T, q.size(1), q.size(3)}, out.options());  // zeroes only the pad rows
  padded.narrow(1, 0, first).zero_();
  padded.narrow(1, first + rows, T - first - rows).zero_();
  padded.narrow(1, first, rows).copy_(out.transpose(1, 2));
  return padded.transpose(1, 2);
}

}  // namespace lckv::ops::cpu
