// The blocked ATen implementation of condensed attention (oneDNN/AMX matmuls for bf16, MKL for
// fp32/fp64) and the call of PyTorch's fused CPU attention with the condensed mask as booleans.
//
// Keys that no query sees may hold anything (an unwritten cache slot, a pad): a masked score is
// replaced, not added to, but a product with a zero weight still gives 0 * NaN = NaN. So the keys
// and values of a block that none of its rows sees are zeroed before the products (a copy made only
// when such keys are in the block's range), and the fused path attends over the run of keys its
// rows see and nothing beyond.
#include "lckv/ops/cpu/condensed_attention_cpu.h"

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

// One block of query rows [t0, t0 + tb) and the key range [kb, ke) they can see.
struct Block {
  int64_t t0, tb, kb, ke;
};

Block make_block(const AttentionMask& m, int64_t t0, int64_t tb, int64_t S) {
  const int64_t first = m.q_offset + t0, last = m.q_offset + t0 + tb - 1;
  const int64_t kb = std::min(S, m.key_begin(first));
  const int64_t ke = std::min(S, m.key_end(last));
  return {t0, tb, kb, std::max(kb, ke)};
}

// The mask of a block with nb = B (key_start given) or 1 (the same for every sequence):
// hidden [nb, 1, 1, tb, ns] is true where a key of the block's range is hidden from a row, and
// unseen [nb, 1, ns, 1] where no row of the block sees the key (undefined when there is none).
struct BlockMask {
  at::Tensor hidden, unseen;
};

BlockMask block_mask(const AttentionMask& m, const Block& b, int64_t B) {
  const int64_t ns = b.ke - b.kb;
  at::Tensor hidden = hidden_keys(m, b.t0, b.tb, b.kb, b.ke).unsqueeze(0);  // [1, tb, ns]
  if (m.key_start.defined()) {
    // Left padding of each sequence, [B, 1, ns], against [1, tb, ns].
    at::Tensor key = at::arange(b.kb, b.ke, at::TensorOptions().dtype(at::kLong));
    hidden = hidden.logical_or(key.lt(m.key_start.view({B, 1})).unsqueeze(1));
  }
  const int64_t nb = hidden.size(0);
  at::Tensor unseen = hidden.all(1);  // [nb, ns]
  BlockMask bm;
  bm.hidden = hidden.view({nb, 1, 1, b.tb, ns});
  if (unseen.any().item<bool>()) bm.unseen = unseen.view({nb, 1, ns, 1});
  return bm;
}

// x [B, Hkv, ns, D] of the block's key range, with the keys no row sees set to zero.
at::Tensor without_unseen(const at::Tensor& x, const BlockMask& bm) {
  return bm.unseen.defined() ? x.masked_fill(bm.unseen, 0) : x;
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

  at::Tensor out = at::zeros({B, Hkv, G, T, D}, q.options());
  at::Tensor lse = at::full({B, Hkv, G, T}, -kInf, q.options().dtype(acc));
  const at::Tensor q5 = q.reshape({B, Hkv, G, T, D});
  for (int64_t t0 = 0; t0 < T; t0 += p.query_block) {
    const Block b = make_block(p.mask, t0, std::min(p.query_block, T - t0), S);
    if (b.ke == b.kb) continue;  // no row of this block sees a key: zeros, lse = -inf
    const BlockMask bm = block_mask(p.mask, b, B);
    at::Tensor qb = q5.narrow(3, b.t0, b.tb).reshape({B, Hkv, G * b.tb, D});
    at::Tensor kk = without_unseen(k.narrow(2, b.kb, b.ke - b.kb), bm);
    at::Tensor vv = without_unseen(v.narrow(2, b.kb, b.ke - b.kb), bm);
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
    const BlockMask bm = block_mask(p.mask, b, B);
    at::Tensor qb = q5.narrow(3, b.t0, b.tb).reshape({B, Hkv, rows, D});
    at::Tensor dob = do5.narrow(3, b.t0, b.tb).reshape({B, Hkv, rows, D});
    at::Tensor ob = o5.narrow(3, b.t0, b.tb).reshape({B, Hkv, rows, D});
    at::Tensor kk = without_unseen(k.narrow(2, b.kb, ns), bm), vv = without_unseen(v.narrow(2, b.kb, ns), bm);
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
  // position, and so are the keys they see, [lo, hi): attend with those rows over those keys, and
  // zero-pad the other rows in [B, T, H, D] layout, so that the caller's transpose + reshape to
  // [B, T, H * D] stays a view. Keys outside [lo, hi) are seen by no query and are left out of the
  // products, where a NaN in them would survive its zero weight.
  const at::Tensor sees = hidden_keys(m, 0, T, 0, S).logical_not().any(-1);
  const int64_t rows = sees.sum().item<int64_t>();
  if (rows == 0) return std::nullopt;
  const int64_t first = sees.to(at::kByte).argmax().item<int64_t>();
  TORCH_INTERNAL_ASSERT(sees.narrow(0, first, rows).all().item<bool>(), "rows that see a key are not one run");
  const int64_t lo = m.key_begin(m.q_offset + first), hi = std::min(S, m.key_end(m.q_offset + first + rows - 1));
  const at::Tensor visible = hidden_keys(m, first, rows, lo, hi).logical_not();
  at::Tensor out = at::scaled_dot_product_attention(q.narrow(2, first, rows), k.narrow(2, lo, hi - lo),
                                                    v.narrow(2, lo, hi - lo), visible, 0.0, false, scale,
                                                    /*enable_gqa=*/true);
  if (rows == T) return out;
  at::Tensor padded = at::empty({q.size(0), T, q.size(1), q.size(3)}, out.options());  // zeroes only the pad rows
  padded.narrow(1, 0, first).zero_();
  padded.narrow(1, first + rows, T - first - rows).zero_();
  padded.narrow(1, first, rows).copy_(out.transpose(1, 2));
  return padded.transpose(1, 2);
}

}  // namespace lckv::ops::cpu
