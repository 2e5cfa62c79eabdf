// Fused CPU kernels (see fused_kernels.h). Compiled once per capability: CMake defines
// CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) and the matching -m flags for this file only.
// Every kernel computes in acc_t (fp32, or fp64 for fp64 tensors) on at::vec::Vectorized<acc_t>,
// loading two vectors' worth of elements per step so bf16/fp16 convert in one instruction.
#include "lckv/ops/cpu/fused_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace lckv::ops::cpu {
namespace CPU_CAPABILITY {
namespace {

#include "lckv/ops/cpu/vec_lanes.h"  // NOLINT: per-capability helpers, inside this namespace

// Rows r in [begin, end) of [B, H, T, D] tensors with any strides (rows in b, h, t order), walked without a
// division per row (three per row and tensor, with at::Tensor::stride calls, were ~2% of a bf16 training step).
class RowWalk {
 public:
  RowWalk(int64_t begin, int64_t H, int64_t T) : H_(H), T_(T), b_(begin / (H * T)), h_(begin / T % H), t_(begin % T) {}
  using Strides = std::array<int64_t, 3>;
  // A tensor's strides of its first three dims, read once outside the loop.
  static Strides strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }
  // The offset of the current row in a tensor with these strides.
  int64_t offset(const Strides& s) const { return b_ * s[0] + h_ * s[1] + t_ * s[2]; }
  void next() {
    if (++t_ < T_) return;
    t_ = 0;
    if (++h_ < H_) return;
    h_ = 0;
    ++b_;
  }

 private:
  int64_t H_, T_, b_, h_, t_;
};

// Rows per parallel task so that each task touches ~16k elements.
int64_t row_grain(int64_t row_length) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_length, 1)); }

// ---------------------------------------------------------------------------------------------
// RMSNorm

// One row: out[0, D) = weight * x * rstd, returning rstd = (mean(x^2) + eps)^-1/2 (acc dtype).
template <typename T, typename O>
acc_t<T> rms_norm_row(const T* xr, const acc_t<T>* wp, double eps, O* orow, int64_t D) {
  using A = acc_t<T>;
  using In = Lanes<T, A>;
  using Out = Lanes<O, A>;
  using W = Lanes<A, A>;
  typename In::V ss(A(0));
  for (int64_t j = 0; j < D; j += In::kStep) {
    auto [a, b] = In::load(xr + j, D - j);
    ss = at::vec::fmadd(a, a, at::vec::fmadd(b, b, ss));
  }
  const A inv = A(1) / std::sqrt(sum_lanes(ss) / A(D) + A(eps));
  const typename In::V vinv(inv);
  for (int64_t j = 0; j < D; j += In::kStep) {
    auto [a, b] = In::load(xr + j, D - j);
    auto [wa, wb] = W::load(wp + j, D - j);
    Out::store(orow + j, a * vinv * wa, b * vinv * wb, D - j);
  }
  return inv;
}

template <typename T, typename O>
void rms_norm_forward_impl(const at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor& out,
                           const at::Tensor& rstd) {
  using A = acc_t<T>;
  const int64_t R = x.size(0), D = x.size(1);
  const T* xp = x.const_data_ptr<T>();
  const A* wp = weight.const_data_ptr<A>();
  O* op = out.mutable_data_ptr<O>();
  A* rp = rstd.mutable_data_ptr<A>();
  at::parallel_for(0, R, row_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rp[r] = rms_norm_row(xp + r * D, wp, eps, op + r * D, D);
  });
}

// With `add_grad` defined (x's dtype and shape), dx = add_grad + the norm's gradient (the sum's other use, in the
// fused residual add: the same bits as autograd adding the two); with `dx_narrow` defined (type N), dx is also
// written rounded to N there (the residual branch's gradient).
template <typename T, typename G, typename N = T>
void rms_norm_backward_impl(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& rstd, const at::Tensor& dx, const at::Tensor& dweight_partial,
                            const at::Tensor& add_grad = {}, const at::Tensor& dx_narrow = {}) {
  using A = acc_t<T>;
  using In = Lanes<T, A>;
  using Gr = Lanes<G, A>;
  using W = Lanes<A, A>;
  using V = typename In::V;
  const int64_t R = x.size(0), D = x.size(1);
  const T* xp = x.const_data_ptr<T>();
  const G* gp = grad.const_data_ptr<G>();
  const A* wp = weight.const_data_ptr<A>();
  const A* rp = rstd.const_data_ptr<A>();
  T* dxp = dx.mutable_data_ptr<T>();
  A* dwp = dweight_partial.mutable_data_ptr<A>();
  const T* addp = add_grad.defined() ? add_grad.const_data_ptr<T>() : nullptr;
  N* narrowp = dx_narrow.defined() ? dx_narrow.mutable_data_ptr<N>() : nullptr;
  const int64_t blocks = dweight_partial.size(0);
  // y = w * x * r with r = (mean(x^2) + eps)^-1/2:
  //   dx = r * (g * w) - x * r^3 * sum(g * w * x) / D,   dw = sum over rows of g * x * r.
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      A* dw = dwp + blk * D;
      std::fill(dw, dw + D, A(0));
      const int64_t row_end = std::min(R, (blk + 1) * kRMSNormRowsPerPartial);
      for (int64_t r = blk * kRMSNormRowsPerPartial; r < row_end; ++r) {
        const T* xr = xp + r * D;
        const G* gr = gp + r * D;
        const A inv = rp[r];
        V dot(A(0));
        for (int64_t j = 0; j < D; j += In::kStep) {
          auto [xa, xb] = In::load(xr + j, D - j);
          auto [ga, gb] = Gr::load(gr + j, D - j);
          auto [wa, wb] = W::load(wp + j, D - j);
          dot = at::vec::fmadd(ga * wa, xa, at::vec::fmadd(gb * wb, xb, dot));
        }
        const V vinv(inv), coef(-inv * inv * inv * sum_lanes(dot) / A(D));
        for (int64_t j = 0; j < D; j += In::kStep) {
          auto [xa, xb] = In::load(xr + j, D - j);
          auto [ga, gb] = Gr::load(gr + j, D - j);
          auto [wa, wb] = W::load(wp + j, D - j);
          V dxa = at::vec::fmadd(xa, coef, ga * wa * vinv), dxb = at::vec::fmadd(xb, coef, gb * wb * vinv);
          if (addp != nullptr) {
            auto [aa, ab] = In::load(addp + r * D + j, D - j);
            dxa = aa + dxa;
            dxb = ab + dxb;
          }
          In::store(dxp + r * D + j, dxa, dxb, D - j);
          if constexpr (kLoadable<N, A>) {
            if (narrowp != nullptr) Lanes<N, A>::store(narrowp + r * D + j, dxa, dxb, D - j);
          }
          auto [da, db] = W::load(dw + j, D - j);
          W::store(dw + j, at::vec::fmadd(ga * xa, vinv, da), at::vec::fmadd(gb * xb, vinv, db), D - j);
        }
      }
    }
  });
}

void rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor& out,
                      const at::Tensor& rstd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_forward", [&] {
    using XT = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "rms_norm_forward", [&] {
      if constexpr (kLoadable<scalar_t, acc_t<XT>>) {
        rms_norm_forward_impl<XT, scalar_t>(x, weight, eps, out, rstd);
      } else {
        TORCH_CHECK(false, "rms_norm: output dtype ", out.scalar_type(), " with input dtype ", x.scalar_type());
      }
    });
  });
}

void rms_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rstd,
                       const at::Tensor& dx, const at::Tensor& dweight_partial) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_backward", [&] {
    using XT = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "rms_norm_backward", [&] {
      if constexpr (kLoadable<scalar_t, acc_t<XT>>) {
        rms_norm_backward_impl<XT, scalar_t>(grad, x, weight, rstd, dx, dweight_partial);
      } else {
        TORCH_CHECK(false, "rms_norm: gradient dtype ", grad.scalar_type(), " with input dtype ", x.scalar_type());
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding

template <typename T>
void rotary_impl(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out,
                 bool transpose) {
  using A = acc_t<T>;
  using In = Lanes<T, A>;
  using C = Lanes<A, A>;
  const int64_t H = x.size(1), T_ = x.size(2), half = x.size(3) / 2;
  const int64_t rows = x.size(0) * H * T_;
  const T* xp = x.const_data_ptr<T>();
  const A* cp = cos.const_data_ptr<A>();
  const A* sp = sin.const_data_ptr<A>();
  T* op = out.mutable_data_ptr<T>();
  const auto xs = RowWalk::strides(x), cs = RowWalk::strides(cos), ss = RowWalk::strides(sin),
             os = RowWalk::strides(out);
  at::parallel_for(0, rows, row_grain(2 * half), [&](int64_t begin, int64_t end) {
    RowWalk walk(begin, H, T_);
    for (int64_t r = begin; r < end; ++r, walk.next()) {
      const T* xr = xp + walk.offset(xs);
      const A* cr = cp + walk.offset(cs);
      const A* sr = sp + walk.offset(ss);
      T* orow = op + walk.offset(os);
      for (int64_t j = 0; j < half; j += In::kStep) {
        const int64_t n = half - j;
        auto [x1a, x1b] = In::load(xr + j, n);
        auto [x2a, x2b] = In::load(xr + half + j, n);
        auto [c1a, c1b] = C::load(cr + j, n);
        auto [c2a, c2b] = C::load(cr + half + j, n);
        auto [s1a, s1b] = C::load(sr + j, n);
        auto [s2a, s2b] = C::load(sr + half + j, n);
        if (!transpose) {  // [o1, o2] = [x1 c1 - x2 s1, x2 c2 + x1 s2]
          In::store(orow + j, x1a * c1a - x2a * s1a, x1b * c1b - x2b * s1b, n);
          In::store(orow + half + j, at::vec::fmadd(x1a, s2a, x2a * c2a), at::vec::fmadd(x1b, s2b, x2b * c2b), n);
        } else {  // the transpose: [d1, d2] = [g1 c1 + g2 s2, g2 c2 - g1 s1]
          In::store(orow + j, at::vec::fmadd(x2a, s2a, x1a * c1a), at::vec::fmadd(x2b, s2b, x1b * c1b), n);
          In::store(orow + half + j, x2a * c2a - x1a * s1a, x2b * c2b - x1b * s1b, n);
        }
      }
    }
  });
}

void rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out,
            bool transpose) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary",
                                  [&] { rotary_impl<scalar_t>(x, cos, sin, out, transpose); });
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

template <typename T>
void swiglu_forward_impl(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out) {
  using L = Lanes<T>;
  using V = typename L::V;
  const T* gp = gate.const_data_ptr<T>();
  const T* up_ = up.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const V one(1);
  at::parallel_for(0, gate.numel(), 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += L::kStep) {
      const int64_t n = end - i;
      auto [ga, gb] = L::load(gp + i, n);
      auto [ua, ub] = L::load(up_ + i, n);
      L::store(op + i, ga / (one + ga.neg().exp()) * ua, gb / (one + gb.neg().exp()) * ub, n);
    }
  });
}

template <typename T>
void swiglu_backward_impl(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                          const at::Tensor& dgate, const at::Tensor& dup) {
  using L = Lanes<T>;
  using V = typename L::V;
  const T* dp = grad.const_data_ptr<T>();
  const T* gp = gate.const_data_ptr<T>();
  const T* up_ = up.const_data_ptr<T>();
  T* dgp = dgate.mutable_data_ptr<T>();
  T* dup_ = dup.mutable_data_ptr<T>();
  const V one(1);
  // s = sigmoid(g): d/dg [g s u] = u s (1 + g (1 - s)),  d/du = g s.
  auto parts = [&](const V& d, const V& g, const V& u, V& dg, V& du) {
    const V s = one / (one + g.neg().exp());
    du = d * g * s;
    dg = d * u * s * at::vec::fmadd(g, one - s, one);
  };
  at::parallel_for(0, gate.numel(), 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += L::kStep) {
      const int64_t n = end - i;
      auto [da, db] = L::load(dp + i, n);
      auto [ga, gb] = L::load(gp + i, n);
      auto [ua, ub] = L::load(up_ + i, n);
      V dga, dgb, dua, dub;
      parts(da, ga, ua, dga, dua);
      parts(db, gb, ub, dgb, dub);
      L::store(dgp + i, dga, dgb, n);
      L::store(dup_ + i, dua, dub, n);
    }
  });
}

void swiglu_forward(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_forward",
                                  [&] { swiglu_forward_impl<scalar_t>(gate, up, out); });
}

void swiglu_backward(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& dgate,
                     const at::Tensor& dup) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_backward",
                                  [&] { swiglu_backward_impl<scalar_t>(grad, gate, up, dgate, dup); });
}

// ---------------------------------------------------------------------------------------------
// Residual add: fp32 stream + low-precision branch, without widening the branch into a temporary

// out[0, n) = h + branch, each sum rounded once to fp32 (residual_add and the fused residual add + RMSNorm both
// call this, so their sums are the same bits).
template <typename B>
void residual_add_span(const float* hp, const B* bp, float* op, int64_t n) {
  using Wide = Lanes<float>;
  using Narrow = Lanes<B, float>;
  for (int64_t i = 0; i < n; i += Wide::kStep) {
    auto [ha, hb] = Wide::load(hp + i, n - i);
    auto [ba, bb] = Narrow::load(bp + i, n - i);
    Wide::store(op + i, ha + ba, hb + bb, n - i);
  }
}

template <typename B>
void residual_add_impl(const at::Tensor& h, const at::Tensor& branch, const at::Tensor& out) {
  const float* hp = h.const_data_ptr<float>();
  const B* bp = branch.const_data_ptr<B>();
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, h.numel(), 16384, [&](int64_t begin, int64_t end) {
    residual_add_span(hp + begin, bp + begin, op + begin, end - begin);
  });
}

void residual_add(const at::Tensor& h, const at::Tensor& branch, const at::Tensor& out) {
  AT_DISPATCH_REDUCED_FLOATING_TYPES(branch.scalar_type(), "residual_add",
                                     [&] { residual_add_impl<scalar_t>(h, branch, out); });
}

// ---------------------------------------------------------------------------------------------
// Residual add + RMSNorm (the sum after a layer's attention and the norm before its MLP) in one pass per row:
// the sum's row is normalised by rms_norm_row while it is in L1, where apart it was written, then read back by a
// second parallel region. The same operations in the same order as residual_add then rms_norm_forward: the same
// bits.

template <typename B, typename O>
void residual_add_rms_norm_forward_impl(const at::Tensor& h, const at::Tensor& branch, const at::Tensor& weight,
                                        double eps, const at::Tensor& sum, const at::Tensor& out,
                                        const at::Tensor& rstd) {
  const int64_t R = h.size(0), D = h.size(1);
  const float* hp = h.const_data_ptr<float>();
  const B* bp = branch.const_data_ptr<B>();
  const float* wp = weight.const_data_ptr<float>();
  float* sp = sum.mutable_data_ptr<float>();
  O* op = out.mutable_data_ptr<O>();
  float* rp = rstd.mutable_data_ptr<float>();
  at::parallel_for(0, R, row_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      residual_add_span(hp + r * D, bp + r * D, sp + r * D, D);
      rp[r] = rms_norm_row(sp + r * D, wp, eps, op + r * D, D);
    }
  });
}

void residual_add_rms_norm_forward(const at::Tensor& h, const at::Tensor& branch, const at::Tensor& weight,
                                   double eps, const at::Tensor& sum, const at::Tensor& out, const at::Tensor& rstd) {
  AT_DISPATCH_REDUCED_FLOATING_TYPES(branch.scalar_type(), "residual_add_rms_norm_forward", [&] {
    using BT = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "residual_add_rms_norm_forward", [&] {
      if constexpr (kLoadable<scalar_t, float>) {
        residual_add_rms_norm_forward_impl<BT, scalar_t>(h, branch, weight, eps, sum, out, rstd);
      } else {
        TORCH_CHECK(false, "residual_add_rms_norm: output dtype ", out.scalar_type(), " with an fp32 stream");
      }
    });
  });
}

void residual_add_rms_norm_backward(const at::Tensor& grad, const at::Tensor& sum_grad, const at::Tensor& x,
                                    const at::Tensor& weight, const at::Tensor& rstd, const at::Tensor& dx,
                                    const at::Tensor& dbranch, const at::Tensor& dweight_partial) {
  AT_DISPATCH_REDUCED_FLOATING_TYPES(dbranch.scalar_type(), "residual_add_rms_norm_backward", [&] {
    using BT = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "residual_add_rms_norm_backward",
                                    [&] {
      if constexpr (kLoadable<scalar_t, float>) {
        rms_norm_backward_impl<float, scalar_t, BT>(grad, x, weight, rstd, dx, dweight_partial, sum_grad, dbranch);
      } else {
        TORCH_CHECK(false, "residual_add_rms_norm: gradient dtype ", grad.scalar_type(), " with an fp32 stream");
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy

// Row r = (b, t) of logits [B, T, V] (unit stride in V) and its target.
template <typename T>
struct LogitRows {
  LogitRows(const at::Tensor& logits, const at::Tensor& targets_)
      : base(logits.const_data_ptr<T>()),
        targets(targets_.const_data_ptr<int64_t>()),
        tokens(logits.size(1)),
        vocab(logits.size(2)),
        count(logits.size(0) * tokens),
        batch_stride(logits.stride(0)),
        token_stride(logits.stride(1)) {}
  const T* row(int64_t r) const { return base + (r / tokens) * batch_stride + (r % tokens) * token_stride; }

  const T* base;
  const int64_t* targets;
  int64_t tokens, vocab, count, batch_stride, token_stride;
};

template <typename T>
void cross_entropy_forward_impl(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                const at::Tensor& lse, const at::Tensor& loss) {
  using A = acc_t<T>;
  using L = Lanes<T>;
  using V = typename L::V;
  const LogitRows<T> rows(logits, targets);
  const int64_t Vn = rows.vocab;
  A* lsep = lse.mutable_data_ptr<A>();
  A* lossp = loss.mutable_data_ptr<A>();
  const V neg_inf(-std::numeric_limits<A>::infinity());
  at::parallel_for(0, rows.count, row_grain(Vn), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = rows.row(r);
      V mx = neg_inf;
      for (int64_t j = 0; j < Vn; j += L::kStep) {
        const int64_t n = Vn - j;
        auto [a, b] = L::load(row + j, n);
        if (n < L::kStep) {  // tail lanes are zeros: make them -inf so they cannot be the max
          a = V::set(neg_inf, a, std::min(n, L::kWidth));
          b = V::set(neg_inf, b, std::max<int64_t>(n - L::kWidth, 0));
        }
        mx = at::vec::maximum(mx, at::vec::maximum(a, b));
      }
      const A m = max_lanes(mx);
      const V vm(m);
      V sum(A(0));
      for (int64_t j = 0; j < Vn; j += L::kStep) {
        const int64_t n = Vn - j;
        auto [a, b] = L::load(row + j, n);
        V ea = (a - vm).exp(), eb = (b - vm).exp();
        if (n < L::kStep) {
          ea = V::set(V(A(0)), ea, std::min(n, L::kWidth));
          eb = V::set(V(A(0)), eb, std::max<int64_t>(n - L::kWidth, 0));
        }
        sum = sum + ea + eb;
      }
      const A l = m + std::log(sum_lanes(sum));
      lsep[r] = l;
      const int64_t t = rows.targets[r];
      lossp[r] = t == ignore_index ? A(0) : l - static_cast<A>(row[t]);
    }
  });
}

template <typename T>
void cross_entropy_backward_impl(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                 const at::Tensor& lse, double scale, const at::Tensor& dlogits) {
  using A = acc_t<T>;
  using L = Lanes<T>;
  using V = typename L::V;
  const LogitRows<T> rows(logits, targets);
  const int64_t Vn = rows.vocab;
  const A* lsep = lse.const_data_ptr<A>();
  T* dp = dlogits.mutable_data_ptr<T>();
  at::parallel_for(0, rows.count, row_grain(Vn), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = rows.row(r);
      T* drow = dp + r * Vn;
      const int64_t t = rows.targets[r];
      if (t == ignore_index) {
        std::fill(drow, drow + Vn, T(0));
        continue;
      }
      const V vl(lsep[r]), vs(static_cast<A>(scale));
      for (int64_t j = 0; j < Vn; j += L::kStep) {
        auto [a, b] = L::load(row + j, Vn - j);
        L::store(drow + j, (a - vl).exp() * vs, (b - vl).exp() * vs, Vn - j);
      }
      drow[t] = static_cast<T>((std::exp(static_cast<A>(row[t]) - lsep[r]) - A(1)) * static_cast<A>(scale));
    }
  });
}

void cross_entropy_forward(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                           const at::Tensor& lse, const at::Tensor& loss) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "cross_entropy_forward",
                                  [&] { cross_entropy_forward_impl<scalar_t>(logits, targets, ignore_index, lse, loss); });
}

void cross_entropy_backward(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                            const at::Tensor& lse, double scale, const at::Tensor& dlogits) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "cross_entropy_backward", [&] {
    cross_entropy_backward_impl<scalar_t>(logits, targets, ignore_index, lse, scale, dlogits);
  });
}

// ---------------------------------------------------------------------------------------------
// Condensed attention of a few query rows (decode)

template <typename T>
void attention_rows_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionMask& mask,
                         double scale, const at::Tensor& out, const at::Tensor& lse) {
  using A = acc_t<T>;
  using In = Lanes<T, A>;
  using Acc = Lanes<A, A>;
  using V = typename In::V;
  const int64_t B = q.size(0), Hq = q.size(1), T_ = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), G = Hq / Hkv;
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  A* lp = lse.mutable_data_ptr<A>();
  const int64_t* ks = mask.key_start.defined() ? mask.key_start.const_data_ptr<int64_t>() : nullptr;
  const A a_scale = static_cast<A>(scale);
  const A neg_inf = -std::numeric_limits<A>::infinity();
  // One task: the G query heads of one KV head at one query row, so each key and value is loaded once.
  // Chunks of >= 2^18 multiply-adds: a decode step at batch 1 (a few tasks of ~10^4) runs on the calling
  // thread, since waking a passive OpenMP pool for it cost more than the work (measured: 6.9 vs 4.5 ms
  // per token on 2 vs 1 threads before this grain).
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, S * G * D));
  at::parallel_for(0, B * Hkv * T_, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> scores, acc(G * D), qrow(G * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task % T_, h = task / T_ % Hkv, b = task / (T_ * Hkv);
      const int64_t pos = mask.q_offset + t;
      const int64_t lo = std::max(mask.key_begin(pos), ks ? ks[b] : int64_t(0));
      const int64_t hi = std::min(S, mask.key_end(pos));
      const int64_t n = std::max<int64_t>(0, hi - lo);
      const T* kb = kp + b * k.stride(0) + h * k.stride(1);
      const T* vb = vp + b * v.stride(0) + h * v.stride(1);
      for (int64_t g = 0; g < G; ++g) {  // the query rows in the acc dtype, times the scale
        const T* qr = qp + b * q.stride(0) + (h * G + g) * q.stride(1) + t * q.stride(2);
        for (int64_t d = 0; d < D; ++d) qrow[g * D + d] = static_cast<A>(qr[d]) * a_scale;
      }
      scores.resize(G * n);
      std::vector<A> row_max(G, neg_inf), row_sum(G, A(0));
      for (int64_t j = 0; j < n; ++j) {
        const T* kr = kb + (lo + j) * k.stride(2);
        for (int64_t g = 0; g < G; ++g) {
          typename Acc::V dot(A(0));
          for (int64_t d = 0; d < D; d += In::kStep) {
            auto [ka, kb2] = In::load(kr + d, D - d);
            auto [qa, qb] = Acc::load(qrow.data() + g * D + d, D - d);
            dot = at::vec::fmadd(ka, qa, at::vec::fmadd(kb2, qb, dot));
          }
          const A s = sum_lanes(dot);
          scores[g * n + j] = s;
          row_max[g] = std::max(row_max[g], s);
        }
      }
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t g = 0; g < G; ++g) {  // probabilities, unnormalised
        A* sg = scores.data() + g * n;
        const typename Acc::V m(row_max[g]);
        typename Acc::V sum(A(0));
        for (int64_t j = 0; j < n; j += Acc::kStep) {
          auto [a, b2] = Acc::load(sg + j, n - j);
          const int64_t w = std::min<int64_t>(n - j, Acc::kStep);
          typename Acc::V ea = (a - m).exp(), eb = (b2 - m).exp();
          ea = Acc::V::set(typename Acc::V(A(0)), ea, std::min<int64_t>(w, Acc::kWidth));
          eb = Acc::V::set(typename Acc::V(A(0)), eb, std::max<int64_t>(w - Acc::kWidth, 0));
          Acc::store(sg + j, ea, eb, w);
          sum = sum + ea + eb;
        }
        row_sum[g] = sum_lanes(sum);
      }
      for (int64_t j = 0; j < n; ++j) {  // out = sum_j p_j v_j
        const T* vr = vb + (lo + j) * v.stride(2);
        for (int64_t d = 0; d < D; d += In::kStep) {
          auto [va, vb2] = In::load(vr + d, D - d);
          for (int64_t g = 0; g < G; ++g) {
            const typename Acc::V p(scores[g * n + j]);
            A* ar = acc.data() + g * D + d;
            auto [aa, ab] = Acc::load(ar, D - d);
            Acc::store(ar, at::vec::fmadd(va, p, aa), at::vec::fmadd(vb2, p, ab), D - d);
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t row = (b * Hq + h * G + g) * T_ + t;
        T* orow = op + row * D;
        const A inv = n > 0 ? A(1) / row_sum[g] : A(0);
        for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<T>(acc[g * D + d] * inv);
        lp[row] = n > 0 ? row_max[g] + std::log(row_sum[g]) : neg_inf;
      }
    }
  });
}

void attention_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionMask& mask,
                    double scale, const at::Tensor& out, const at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_rows",
                                  [&] { attention_rows_impl<scalar_t>(q, k, v, mask, scale, out, lse); });
}

// ---------------------------------------------------------------------------------------------
// The softmax of a block of the blocked attention

// Row r of a block's [B, Hkv, G * tb, ns] scores: its visible keys [lo, hi) within the block.
struct BlockRows {
  BlockRows(const at::Tensor& scores, const AttentionMask& m, int64_t t0_, int64_t tb_, int64_t kb_)
      : mask(m),
        key_start(m.key_start.defined() ? m.key_start.const_data_ptr<int64_t>() : nullptr),
        t0(t0_), tb(tb_), kb(kb_), ns(scores.size(3)), rows(scores.numel() / std::max<int64_t>(1, scores.size(3))),
        rows_per_sequence(scores.size(1) * scores.size(2)) {}
  std::pair<int64_t, int64_t> range(int64_t r) const {
    const int64_t pos = mask.q_offset + t0 + r % tb;
    int64_t lo = mask.key_begin(pos);
    if (key_start) lo = std::max(lo, key_start[r / rows_per_sequence]);
    lo = std::clamp<int64_t>(lo - kb, 0, ns);
    const int64_t hi = std::clamp<int64_t>(mask.key_end(pos) - kb, lo, ns);
    return {lo, hi};
  }
  const AttentionMask& mask;
  const int64_t* key_start;
  int64_t t0, tb, kb, ns, rows, rows_per_sequence;
};

template <typename T>
void block_softmax_impl(const at::Tensor& scores, const AttentionMask& mask, int64_t t0, int64_t tb, int64_t kb,
                        double scale, const at::Tensor& probs, const at::Tensor& lse) {
  using A = acc_t<T>;
  using In = Lanes<T, A>;
  using Acc = Lanes<A, A>;
  using V = typename Acc::V;
  const BlockRows br(scores, mask, t0, tb, kb);
  const int64_t ns = br.ns;
  const T* sp = scores.const_data_ptr<T>();
  T* pp = probs.mutable_data_ptr<T>();
  A* lp = lse.mutable_data_ptr<A>();
  const A a_scale = static_cast<A>(scale);
  at::parallel_for(0, br.rows, row_grain(ns), [&](int64_t begin, int64_t end) {
    std::vector<A> buf(ns + Acc::kStep);
    for (int64_t r = begin; r < end; ++r) {
      const auto [lo, hi] = br.range(r);
      const int64_t n = hi - lo;
      const T* srow = sp + r * ns + lo;
      T* prow = pp + r * ns;
      std::fill(prow, prow + lo, T(0));
      std::fill(prow + hi, prow + ns, T(0));
      if (n == 0) {
        lp[r] = -std::numeric_limits<A>::infinity();
        continue;
      }
      const V vs(a_scale);
      V mx(-std::numeric_limits<A>::infinity());
      for (int64_t j = 0; j < n; j += In::kStep) {  // scaled scores into buf, and their max
        const int64_t w = std::min<int64_t>(n - j, In::kStep);
        auto [a, b] = In::load(srow + j, w);
        a = a * vs, b = b * vs;
        Acc::store(buf.data() + j, a, b, w);
        if (w < In::kStep) {  // tail lanes are zeros: keep them out of the max
          a = V::set(mx, a, std::min<int64_t>(w, In::kWidth));
          b = V::set(mx, b, std::max<int64_t>(w - In::kWidth, 0));
        }
        mx = at::vec::maximum(mx, at::vec::maximum(a, b));
      }
      const A m = max_lanes(mx);
      const V vm(m);
      V sum(A(0));
      for (int64_t j = 0; j < n; j += Acc::kStep) {
        const int64_t w = std::min<int64_t>(n - j, Acc::kStep);
        auto [a, b] = Acc::load(buf.data() + j, w);
        V ea = (a - vm).exp(), eb = (b - vm).exp();
        ea = V::set(V(A(0)), ea, std::min<int64_t>(w, Acc::kWidth));
        eb = V::set(V(A(0)), eb, std::max<int64_t>(w - Acc::kWidth, 0));
        Acc::store(buf.data() + j, ea, eb, w);
        sum = sum + ea + eb;
      }
      const A total = sum_lanes(sum);
      lp[r] = m + std::log(total);
      const V inv(A(1) / total);
      for (int64_t j = 0; j < n; j += Acc::kStep) {
        const int64_t w = std::min<int64_t>(n - j, Acc::kStep);
        auto [a, b] = Acc::load(buf.data() + j, w);
        In::store(prow + lo + j, a * inv, b * inv, w);
      }
    }
  });
}

template <typename T>
void block_softmax_backward_impl(const at::Tensor& scores, const at::Tensor& dp, const at::Tensor& delta,
                                 const at::Tensor& lse, const AttentionMask& mask, int64_t t0, int64_t tb, int64_t kb,
                                 double scale, const at::Tensor& probs, const at::Tensor& ds) {
  using A = acc_t<T>;
  using In = Lanes<T, A>;
  using V = typename In::V;
  const BlockRows br(scores, mask, t0, tb, kb);
  const int64_t ns = br.ns;
  const T* sp = scores.const_data_ptr<T>();
  const T* dpp = dp.const_data_ptr<T>();
  const A* dl = delta.const_data_ptr<A>();
  const A* lp = lse.const_data_ptr<A>();
  T* pp = probs.mutable_data_ptr<T>();
  T* dsp = ds.mutable_data_ptr<T>();
  const A a_scale = static_cast<A>(scale);
  at::parallel_for(0, br.rows, row_grain(ns), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      auto [lo, hi] = br.range(r);
      if (std::isinf(lp[r])) hi = lo;  // a row that sees no key: zeros
      T* prow = pp + r * ns;
      T* dsrow = dsp + r * ns;
      for (T* row : {prow, dsrow}) {
        std::fill(row, row + lo, T(0));
        std::fill(row + hi, row + ns, T(0));
      }
      const V vs(a_scale), vl(lp[r]), vd(dl[r]);
      for (int64_t j = lo; j < hi; j += In::kStep) {
        const int64_t w = std::min<int64_t>(hi - j, In::kStep);
        auto [sa, sb] = In::load(sp + r * ns + j, w);
        auto [da, db] = In::load(dpp + r * ns + j, w);
        const V pa = at::vec::fmsub(sa, vs, vl).exp(), pb = at::vec::fmsub(sb, vs, vl).exp();
        In::store(prow + j, pa, pb, w);
        In::store(dsrow + j, pa * (da - vd) * vs, pb * (db - vd) * vs, w);
      }
    }
  });
}

void block_softmax(const at::Tensor& scores, const AttentionMask& mask, int64_t t0, int64_t tb, int64_t kb,
                   double scale, const at::Tensor& probs, const at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scores.scalar_type(), "block_softmax", [&] {
    block_softmax_impl<scalar_t>(scores, mask, t0, tb, kb, scale, probs, lse);
  });
}

void block_softmax_backward(const at::Tensor& scores, const at::Tensor& dp, const at::Tensor& delta,
                            const at::Tensor& lse, const AttentionMask& mask, int64_t t0, int64_t tb, int64_t kb,
                            double scale, const at::Tensor& probs, const at::Tensor& ds) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scores.scalar_type(), "block_softmax_backward", [&] {
    block_softmax_backward_impl<scalar_t>(scores, dp, delta, lse, mask, t0, tb, kb, scale, probs, ds);
  });
}

// ---------------------------------------------------------------------------------------------
// Linear layers of few rows (decode)

// Rows [n, n + NR) of W against rows [m0, m0 + MB) of x (in the acc dtype): NR * MB dot products sharing
// each load, two independent accumulators per product (the two halves of a load) to hide the FMA latency.
constexpr int64_t kPrefetchRows = 16;

template <typename T, int NR, int MB>
void small_linear_tile(const T* w, const acc_t<T>* xa, int64_t K, int64_t N, const T* bias, T* out,
                       int64_t row0, int64_t m0) {
  using A = acc_t<T>;
  using In = Lanes<T, A>;
  using Acc = Lanes<A, A>;
  using V = typename In::V;
  V lo[NR][MB], hi[NR][MB];
  for (int r = 0; r < NR; ++r) {
    for (int m = 0; m < MB; ++m) lo[r][m] = hi[r][m] = V(A(0));
  }
  const bool prefetch = row0 + NR + kPrefetchRows <= N;
  // Full steps without the tail's bounds (so the loop has no branch), then the tail.
  auto step = [&](int64_t d, int64_t n) {
    std::pair<V, V> wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = In::load(w + (row0 + r) * K + d, n);
    // The rows a few tiles on: DRAM latency is what a decode step waits on.
    if (prefetch) {
      for (int r = 0; r < NR; ++r) __builtin_prefetch(w + (row0 + r + kPrefetchRows) * K + d);
    }
    for (int m = 0; m < MB; ++m) {
      auto [xl, xh] = Acc::load(xa + (m0 + m) * K + d, n);
      for (int r = 0; r < NR; ++r) {
        lo[r][m] = at::vec::fmadd(wv[r].first, xl, lo[r][m]);
        hi[r][m] = at::vec::fmadd(wv[r].second, xh, hi[r][m]);
      }
    }
  };
  const int64_t full = K / In::kStep * In::kStep;
  for (int64_t d = 0; d < full; d += In::kStep) step(d, In::kStep);
  if (full < K) step(full, K - full);
  for (int r = 0; r < NR; ++r) {
    const A b = bias ? static_cast<A>(bias[row0 + r]) : A(0);
    for (int m = 0; m < MB; ++m) out[(m0 + m) * N + row0 + r] = static_cast<T>(sum_lanes(lo[r][m] + hi[r][m]) + b);
  }
}

// W rows [n, n + rows) against rows [m0, m0 + MB) of x, in tiles of as many W rows as keep a tile's 2 * NR * MB
// accumulators and NR loaded W vectors in registers (MaxNR 8 for one x row, 4 for two, 2 for more): with 2 W rows
// per tile a one-row product was latency-bound on its 4 FMA chains (~7 GMAC/s on cached weights, ~10x under one
// AVX-512 core). Each output keeps its own fixed summation order whatever the tile.
template <typename T, int MB, int MaxNR>
void small_linear_tiles(const T* w, const acc_t<T>* xa, int64_t K, int64_t N, const T* bias, T* out, int64_t n,
                        int64_t rows, int64_t m0) {
  int64_t r = 0;
  if constexpr (MaxNR >= 8) {
    for (; r + 8 <= rows; r += 8) small_linear_tile<T, 8, MB>(w, xa, K, N, bias, out, n + r, m0);
  }
  if constexpr (MaxNR >= 4) {
    for (; r + 4 <= rows; r += 4) small_linear_tile<T, 4, MB>(w, xa, K, N, bias, out, n + r, m0);
  }
  for (; r + 2 <= rows; r += 2) small_linear_tile<T, 2, MB>(w, xa, K, N, bias, out, n + r, m0);
  for (; r < rows; ++r) small_linear_tile<T, 1, MB>(w, xa, K, N, bias, out, n + r, m0);
}

// W rows per parallel work item.
constexpr int64_t kSmallLinearGroup = 8;

template <typename T>
void small_linear_group(const T* w, const acc_t<T>* xa, int64_t M, int64_t K, int64_t N, const T* bias, T* out,
                        int64_t n) {
  const int64_t rows = std::min(kSmallLinearGroup, N - n);
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) small_linear_tiles<T, 4, 2>(w, xa, K, N, bias, out, n, rows, m0);
  switch (M - m0) {
    case 3: small_linear_tiles<T, 3, 2>(w, xa, K, N, bias, out, n, rows, m0); break;
    case 2: small_linear_tiles<T, 2, 4>(w, xa, K, N, bias, out, n, rows, m0); break;
    case 1: small_linear_tiles<T, 1, 8>(w, xa, K, N, bias, out, n, rows, m0); break;
    default: break;
  }
}

template <typename T>
void small_linear_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& out) {
  using A = acc_t<T>;
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const T* xp = x.const_data_ptr<T>();
  std::vector<A> xa(M * K);
  for (int64_t i = 0; i < M * K; ++i) xa[i] = static_cast<A>(xp[i]);
  const T* wp = w.const_data_ptr<T>();
  const T* bp = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  T* op = out.mutable_data_ptr<T>();
  // A task streams >= 2 MiB of W (times the rows of x): smaller products run on the calling thread, since
  // waking a passive OpenMP pool costs more than a second core adds to a memory-bound product.
  const int64_t grain_rows = (int64_t(2) << 20) / std::max<int64_t>(1, M * K * int64_t(sizeof(T)));
  const int64_t groups = (N + kSmallLinearGroup - 1) / kSmallLinearGroup;
  at::parallel_for(0, groups, std::max<int64_t>(1, grain_rows / kSmallLinearGroup), [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) small_linear_group<T>(wp, xa.data(), M, K, N, bp, op, g * kSmallLinearGroup);
  });
}

void small_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "small_linear",
                                  [&] { small_linear_impl<scalar_t>(x, w, bias, out); });
}

// ---------------------------------------------------------------------------------------------
// Row dot products (rowsum(dO * O) of the attention backward)

template <typename T>
void row_dot_impl(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) {
  using A = acc_t<T>;
  using In = Lanes<T, A>;
  const int64_t H = a.size(1), T_ = a.size(2), D = a.size(3);
  const int64_t rows = a.size(0) * H * T_;
  const T* ap = a.const_data_ptr<T>();
  const T* bp = b.const_data_ptr<T>();
  A* op = out.mutable_data_ptr<A>();
  const auto as = RowWalk::strides(a), bs = RowWalk::strides(b);
  at::parallel_for(0, rows, row_grain(D), [&](int64_t begin, int64_t end) {
    RowWalk walk(begin, H, T_);
    for (int64_t r = begin; r < end; ++r, walk.next()) {
      const T* ar = ap + walk.offset(as);
      const T* br = bp + walk.offset(bs);
      typename In::V acc(A(0));
      for (int64_t d = 0; d < D; d += In::kStep) {
        auto [a0, a1] = In::load(ar + d, D - d);
        auto [b0, b1] = In::load(br + d, D - d);
        acc = at::vec::fmadd(a0, b0, at::vec::fmadd(a1, b1, acc));
      }
      op[r] = sum_lanes(acc);
    }
  });
}

void row_dot(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "row_dot",
                                  [&] { row_dot_impl<scalar_t>(a, b, out); });
}

}  // namespace

// tiled_attention.cpp, compiled for the same capability.
void tiled_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionMask& mask,
                             double scale, const at::Tensor& out, const at::Tensor& lse);
void tiled_attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta,
                              const AttentionMask& mask, double scale, const at::Tensor& dq, const at::Tensor& dk,
                              const at::Tensor& dv);

const FusedKernels& fused_kernels() {
  static const FusedKernels table{rms_norm_forward,      rms_norm_backward,     rotary,
                                  swiglu_forward,        swiglu_backward,       residual_add,
                                  cross_entropy_forward, cross_entropy_backward, attention_rows,
                                  block_softmax,         block_softmax_backward, small_linear,
                                  row_dot,               tiled_attention_forward, tiled_attention_backward,
                                  residual_add_rms_norm_forward, residual_add_rms_norm_backward};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace lckv::ops::cpu
