// The fused elementwise ops (RMSNorm, rotary, SwiGLU, cross-entropy), every compiled CPU variant
// this machine runs, forward and backward against naive fp64 formulas differentiated by autograd.
#include <catch2/catch.hpp>
#include <torch/torch.h>
#include <ATen/autocast_mode.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "lckv/ops/cpu/fused_kernels.h"
#include "lckv/ops/fused_ops.h"
#include "test_reference.h"

namespace ops = lckv::ops;
using lckv::testing::rel_err;

namespace {

// Tolerance for results stored in dtype, computed in fp32 (fp64 for fp64).
double tolerance(torch::ScalarType dt) {
  if (dt == torch::kDouble) return 1e-12;
  if (dt == torch::kFloat) return 2e-5;
  return 2e-2;  // one bf16/fp16 rounding of results and inputs' gradients
}

torch::Tensor naive_rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  return w * x / torch::sqrt(x.pow(2).mean(-1, true) + eps);
}

torch::Tensor naive_rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  return x * cos + torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1) * sin;
}

torch::Tensor naive_cross_entropy(const torch::Tensor& logits, const torch::Tensor& targets, int64_t ignore) {
  const torch::Tensor lp = torch::log_softmax(logits.reshape({-1, logits.size(-1)}), -1);
  const torch::Tensor t = targets.reshape({-1});
  const torch::Tensor keep = t.ne(ignore);
  const torch::Tensor picked = lp.gather(1, t.clamp_min(0).unsqueeze(1)).squeeze(1);
  return -(picked * keep).sum() / keep.sum();
}

// A leaf of dtype dt holding `values`, and its fp64 copy (also a leaf) for the reference.
std::pair<torch::Tensor, torch::Tensor> leaves(const torch::Tensor& values, torch::ScalarType dt) {
  torch::Tensor low = values.to(dt).detach().requires_grad_(true);
  torch::Tensor ref = low.detach().to(torch::kDouble).requires_grad_(true);
  return {low, ref};
}

const torch::ScalarType kDtypes[] = {torch::kDouble, torch::kFloat, torch::kBFloat16};

}  // namespace

TEST_CASE("fused CPU kernels: the variants this CPU runs are known", "[ops][fused]") {
  const auto variants = ops::runnable_fused_cpu_capabilities();
  REQUIRE(!variants.empty());
  CHECK(variants.front() == "DEFAULT");
  CHECK(ops::fused_cpu_capability() == variants.back());
  CHECK_THROWS_WITH(ops::ScopedFusedCpuCapability("AVX9000"), Catch::Contains("AVX9000"));
}

TEST_CASE("rms_norm matches the fp64 formula, forward and backward", "[ops][fused]") {
  torch::manual_seed(0);
  const int64_t R = 130, D = 72;  // rows beyond one partial block, D not a multiple of the vector step
  const torch::Tensor xv = torch::randn({2, R / 2, D}) * 3, wv = torch::rand({D}) + 0.5, gv = torch::randn({2, R / 2, D});
  for (const auto& cap : ops::runnable_fused_cpu_capabilities()) {
    ops::ScopedFusedCpuCapability use(cap);
    for (auto dt : kDtypes) {
      // fp32 statistics written as bf16 (the autocast case) and as x's own dtype.
      for (auto out_dt : {dt, dt == torch::kDouble ? torch::kDouble : torch::kBFloat16}) {
        INFO(cap << " x " << dt << " out " << out_dt);
        auto [x, xr] = leaves(xv, dt);
        torch::Tensor w = wv.detach().clone().requires_grad_(true), wr = wv.to(torch::kDouble).requires_grad_(true);
        torch::Tensor y = ops::rms_norm(x, w, 1e-5, out_dt);
        torch::Tensor yr = naive_rms_norm(xr, wr, 1e-5);
        CHECK(y.scalar_type() == out_dt);
        CHECK(rel_err(y, yr) < std::max(tolerance(dt), tolerance(out_dt)));
        const torch::Tensor g = gv.to(out_dt);
        y.backward(g);
        yr.backward(g.to(torch::kDouble));
        CHECK(x.grad().scalar_type() == dt);
        CHECK(w.grad().scalar_type() == torch::kFloat);
        CHECK(rel_err(x.grad(), xr.grad()) < tolerance(dt));
        CHECK(rel_err(w.grad(), wr.grad()) < std::max(tolerance(dt), 1e-5));
      }
    }
  }
}

TEST_CASE("rms_norm's weight gradient has the same bits for any thread count", "[ops][fused]") {
  torch::manual_seed(1);
  const torch::Tensor xv = torch::randn({300, 64}), gv = torch::randn({300, 64});
  auto weight_grad = [&](int threads) {
    const int before = torch::get_num_threads();
    torch::set_num_threads(threads);
    torch::Tensor w = torch::ones({64}).requires_grad_(true);
    ops::rms_norm(xv, w, 1e-6, torch::kFloat).backward(gv);
    torch::set_num_threads(before);
    return w.grad();
  };
  CHECK(torch::equal(weight_grad(1), weight_grad(2)));
}

TEST_CASE("apply_rotary matches the rotate_half formula on strided inputs, forward and backward", "[ops][fused]") {
  torch::manual_seed(2);
  const int64_t B = 2, H = 3, T = 5, D = 80;  // half = 40: a vector step plus a tail
  // q/k come as transposed views of a linear's [B, T, H, D] output.
  const torch::Tensor xv = torch::randn({B, T, H, D}), gv = torch::randn({B, H, T, D});
  const torch::Tensor angles = torch::rand({1, 1, T, D / 2}, torch::kDouble) * 6;
  const torch::Tensor rope_cos = torch::cat({angles.cos(), angles.cos()}, -1);
  const torch::Tensor rope_sin = torch::cat({angles.sin(), angles.sin()}, -1);
  // Tables whose halves differ (not RoPE, but the op's contract): catch a transpose written for
  // symmetric tables only. Per-batch tables, as with per-sequence positions.
  const torch::Tensor any_cos = torch::randn({B, 1, T, D}, torch::kDouble);
  const torch::Tensor any_sin = torch::randn({B, 1, T, D}, torch::kDouble);
  for (const auto& cap : ops::runnable_fused_cpu_capabilities()) {
    ops::ScopedFusedCpuCapability use(cap);
    for (auto dt : kDtypes) {
      for (int tables = 0; tables < 2; ++tables) {
        INFO(cap << " " << dt << " tables " << tables);
        const torch::Tensor& c = tables == 0 ? rope_cos : any_cos;
        const torch::Tensor& s = tables == 0 ? rope_sin : any_sin;
        auto [x0, xr0] = leaves(xv, dt);
        const torch::Tensor x = x0.transpose(1, 2), xr = xr0.transpose(1, 2);
        const auto table_dt = dt == torch::kDouble ? torch::kDouble : torch::kFloat;
        torch::Tensor y = ops::apply_rotary(x, c.to(table_dt), s.to(table_dt));
        torch::Tensor yr = naive_rotary(xr, c, s);
        CHECK(y.scalar_type() == dt);
        CHECK(rel_err(y, yr) < tolerance(dt));
        y.backward(gv.to(dt));
        yr.backward(gv.to(dt).to(torch::kDouble));
        CHECK(rel_err(x0.grad(), xr0.grad()) < tolerance(dt));
      }
    }
  }
}

TEST_CASE("swiglu matches silu(gate) * up, forward and backward, saturated gates included", "[ops][fused]") {
  torch::manual_seed(3);
  torch::Tensor gate_v = torch::randn({7, 333}) * 4;
  gate_v[0][0] = -100;  // exp(-gate) overflows to inf: silu must give -0, its gradient 0
  gate_v[0][1] = 100;
  // Around fp32 exp's overflow and underflow (|x| ~ 87-89) and far beyond: a faster sigmoid tried once (ATen's
  // exp_u20 and a Newton-refined reciprocal estimate) gave NaN gradients there, and a 1-ulp error in sigmoid(87)
  // on AVX2 made the gradient miss the fp32 tolerance.
  const std::vector<float> extremes{-88.5f, -88.8f, -89.f, -1e4f, 87.2f, 88.8f, 1e4f, -87.f};
  for (size_t j = 0; j < extremes.size(); ++j) gate_v[1][static_cast<int64_t>(j)] = extremes[j];
  const torch::Tensor up_v = torch::randn({7, 333}), gv = torch::randn({7, 333});
  for (const auto& cap : ops::runnable_fused_cpu_capabilities()) {
    ops::ScopedFusedCpuCapability use(cap);
    for (auto dt : kDtypes) {
      INFO(cap << " " << dt);
      auto [g, gr] = leaves(gate_v, dt);
      auto [u, ur] = leaves(up_v, dt);
      torch::Tensor y = ops::swiglu(g, u);
      torch::Tensor yr = gr * torch::sigmoid(gr) * ur;
      CHECK(y.scalar_type() == dt);
      CHECK(rel_err(y, yr) < tolerance(dt));
      y.backward(gv.to(dt));
      yr.backward(gv.to(dt).to(torch::kDouble));
      CHECK(rel_err(g.grad(), gr.grad()) < tolerance(dt));
      CHECK(rel_err(u.grad(), ur.grad()) < tolerance(dt));
      CHECK(torch::isfinite(g.grad()).all().item<bool>());
    }
    // A NaN gate gives NaN where it is, and only there.
    torch::Tensor nan_gate = gate_v.clone();
    nan_gate[2][5] = std::numeric_limits<float>::quiet_NaN();
    const torch::Tensor y = ops::swiglu(nan_gate, up_v);
    CHECK(std::isnan(y[2][5].item<float>()));
    CHECK(torch::isfinite(y).sum().item<int64_t>() == y.numel() - 1);
  }
}

TEST_CASE("residual_add of an fp32 stream and a bf16 branch equals the promoted add, gradients too",
          "[ops][fused]") {
  torch::manual_seed(5);
  const torch::Tensor hv = torch::randn({3, 7, 45}), bv = torch::randn({3, 7, 45}), gv = torch::randn({3, 7, 45});
  for (const auto& cap : ops::runnable_fused_cpu_capabilities()) {
    ops::ScopedFusedCpuCapability use(cap);
    for (auto branch_dt : {torch::kBFloat16, torch::kHalf}) {
      INFO(cap << " " << branch_dt);
      torch::Tensor h = hv.clone().requires_grad_(true), b = bv.to(branch_dt).requires_grad_(true);
      torch::Tensor y = ops::residual_add(h, b);
      // fp32 + a widened bf16/fp16 value rounds once, exactly as the naive fp64 sum rounded to fp32.
      CHECK(torch::equal(y, (hv.to(torch::kDouble) + b.detach().to(torch::kDouble)).to(torch::kFloat)));
      y.backward(gv);
      CHECK(torch::equal(h.grad(), gv));
      CHECK(b.grad().scalar_type() == branch_dt);
      CHECK(torch::equal(b.grad(), gv.to(branch_dt)));
    }
  }
  // Other dtype pairs are the plain promoted add.
  const torch::Tensor d = torch::randn({4, 5}, torch::kDouble), f = torch::randn({4, 5});
  CHECK(torch::equal(ops::residual_add(d, f), d + f));
  CHECK_THROWS_WITH(ops::residual_add(torch::randn({2, 3}), torch::randn({3, 2})), Catch::Contains("share shape"));
}

TEST_CASE("residual_add_rms_norm is residual_add then rms_norm bit for bit, and the fp64 formula, both ways",
          "[ops][fused]") {
  torch::manual_seed(6);
  const int64_t R = 150, D = 72;  // rows beyond two weight-gradient blocks, D past a vector step
  const torch::Tensor hv = torch::randn({2, R / 2, D}) * 2, bv = torch::randn({2, R / 2, D}),
                      wv = torch::rand({D}) + 0.5, gs = torch::randn({2, R / 2, D}), gy = torch::randn({2, R / 2, D});
  for (const auto& cap : ops::runnable_fused_cpu_capabilities()) {
    ops::ScopedFusedCpuCapability use(cap);
    for (auto branch_dt : {torch::kBFloat16, torch::kHalf}) {
      for (auto out_dt : {torch::kBFloat16, torch::kFloat}) {
        // uses: 0 both outputs (as in a layer), 1 only the normalised one, 2 only the sum.
        for (int uses = 0; uses < 3; ++uses) {
          INFO(cap << " branch " << branch_dt << " out " << out_dt << " uses " << uses);
          auto run = [&](bool fused) {
            torch::Tensor h = hv.clone().requires_grad_(true), b = bv.to(branch_dt).requires_grad_(true),
                          w = wv.clone().requires_grad_(true);
            torch::Tensor sum, y;
            if (fused) {
              std::tie(sum, y) = ops::residual_add_rms_norm(h, b, w, 1e-5, out_dt);
            } else {
              sum = ops::residual_add(h, b);
              y = ops::rms_norm(sum, w, 1e-5, out_dt);
            }
            torch::Tensor loss = torch::zeros({});
            if (uses != 1) loss = loss + (sum * gs).sum();
            if (uses != 2) loss = loss + (y.to(torch::kFloat) * gy).sum();
            loss.backward();
            return std::vector<torch::Tensor>{sum, y, h.grad(), b.grad(), w.grad()};
          };
          const auto fused = run(true), apart = run(false);
          const char* names[] = {"sum", "y", "dh", "dbranch", "dweight"};
          for (int i = 0; i < 5; ++i) {
            INFO(names[i]);
            REQUIRE(fused[i].defined() == apart[i].defined());
            if (!fused[i].defined()) continue;
            CHECK(fused[i].scalar_type() == apart[i].scalar_type());
            CHECK(torch::equal(fused[i], apart[i]));
          }
          // And against the formula in fp64 (on the branch as rounded), differentiated by autograd.
          const torch::Tensor hr = hv.to(torch::kDouble).requires_grad_(true),
                              br = bv.to(branch_dt).to(torch::kDouble).requires_grad_(true),
                              wr = wv.to(torch::kDouble).requires_grad_(true);
          const torch::Tensor sr = hr + br, yr = naive_rms_norm(sr, wr, 1e-5);
          CHECK(rel_err(fused[0], sr) < 1e-7);
          CHECK(rel_err(fused[1], yr) < tolerance(out_dt));
          torch::Tensor loss = torch::zeros({}, torch::kDouble);
          if (uses != 1) loss = loss + (sr * gs.to(torch::kDouble)).sum();
          if (uses != 2) loss = loss + (yr * gy.to(torch::kDouble)).sum();
          loss.backward();
          CHECK(rel_err(fused[2], hr.grad()) < tolerance(out_dt));
          CHECK(rel_err(fused[3], br.grad()) < tolerance(branch_dt));
          if (uses != 2) CHECK(rel_err(fused[4], wr.grad()) < tolerance(out_dt));
        }
      }
    }
  }
  // Other dtypes: the two ops (fp64 exact), and bad input named.
  const torch::Tensor d = torch::randn({4, 6}, torch::kDouble), e = torch::randn({4, 6}, torch::kDouble),
                      wd = torch::rand({6}, torch::kDouble);
  auto [sd, yd] = ops::residual_add_rms_norm(d, e, wd, 1e-6, torch::kDouble);
  CHECK(torch::equal(sd, d + e));
  CHECK(rel_err(yd, naive_rms_norm(d + e, wd, 1e-6)) < 1e-12);
  CHECK_THROWS_WITH(ops::residual_add_rms_norm(torch::randn({2, 3}), torch::randn({3, 2}), torch::ones({2}), 1e-6,
                                               torch::kFloat),
                    Catch::Contains("share shape"));
  CHECK_THROWS_WITH(ops::residual_add_rms_norm(torch::randn({2, 3}), torch::randn({2, 3}).to(torch::kBFloat16),
                                               torch::ones({4}), 1e-6, torch::kFloat),
                    Catch::Contains("weight must be [3]"));
  CHECK_THROWS_WITH(ops::residual_add_rms_norm(torch::randn({2, 3}), torch::randn({2, 3}), torch::ones({3}), -1,
                                               torch::kFloat),
                    Catch::Contains("eps must be >= 0"));
}

TEST_CASE("cross_entropy matches log_softmax + nll in fp64, with ignored targets and strided logits",
          "[ops][fused]") {
  torch::manual_seed(4);
  const int64_t B = 3, T = 37, V = 1000;
  // Logits of T + 1 positions narrowed to T (the Hugging Face shift): rows are not contiguous.
  const torch::Tensor full = torch::randn({B, T + 1, V}) * 5;
  torch::Tensor targets = torch::randint(0, V, {B, T});
  targets.index_put_({0, torch::indexing::Slice(0, 5)}, -100);
  for (const auto& cap : ops::runnable_fused_cpu_capabilities()) {
    ops::ScopedFusedCpuCapability use(cap);
    for (auto dt : kDtypes) {
      INFO(cap << " " << dt);
      auto [lf, lfr] = leaves(full, dt);
      const torch::Tensor logits = lf.narrow(1, 0, T), logits_r = lfr.narrow(1, 0, T);
      torch::Tensor loss = ops::cross_entropy(logits, targets);
      torch::Tensor loss_r = naive_cross_entropy(logits_r, targets, -100);
      CHECK(loss.scalar_type() == (dt == torch::kDouble ? torch::kDouble : torch::kFloat));
      CHECK(std::abs(loss.item<double>() - loss_r.item<double>()) < (dt == torch::kDouble ? 1e-12 : 1e-5));
      (loss * 3).backward();
      (loss_r * 3).backward();
      CHECK(rel_err(lf.grad(), lfr.grad()) < (dt == torch::kBFloat16 ? 5e-4 : tolerance(dt)));
      // [N, V] with [N] works the same.
      const torch::Tensor flat = full.narrow(1, 0, T).reshape({-1, V}).to(dt);
      CHECK(std::abs(ops::cross_entropy(flat, targets.reshape({-1})).item<double>() - loss.item<double>()) < 1e-6);
    }
  }
}

TEST_CASE("linear of few rows (the decode kernel) matches the fp64 product, in every variant", "[ops][fused][linear]") {
  torch::NoGradGuard no_grad;
  torch::manual_seed(11);
  for (const std::string& variant : ops::runnable_fused_cpu_capabilities()) {
    ops::ScopedFusedCpuCapability scoped(variant);
    for (torch::ScalarType dt : {torch::kDouble, torch::kFloat, torch::kBFloat16, torch::kHalf}) {
      for (int64_t K : {1, 33, 64, 519}) {
        for (int64_t N : {1, 5, 64, 131}) {
          for (bool with_bias : {false, true}) {
            const torch::Tensor w = torch::randn({N, K}, torch::kDouble).to(dt);
            const torch::Tensor b = with_bias ? torch::randn({N}, torch::kDouble).to(dt) : torch::Tensor();
            const torch::Tensor x = torch::randn({2, 5, K}, torch::kDouble).to(dt);  // 10 rows: above the cut
            for (int64_t M : {1, 2, 3, 4, 5, 8}) {
              INFO(variant << " " << dt << " K " << K << " N " << N << " M " << M << " bias " << with_bias);
              const torch::Tensor xm = x.view({-1, K}).narrow(0, 0, M);
              const torch::Tensor got = ops::linear(xm, w, b);
              REQUIRE(got.scalar_type() == dt);
              REQUIRE(got.sizes() == torch::IntArrayRef({M, N}));
              torch::Tensor want = xm.to(torch::kDouble).matmul(w.to(torch::kDouble).t());
              if (with_bias) want = want + b.to(torch::kDouble);
              // Error bound: one rounding of the result plus the accumulation's, relative to sum |x||w|.
              const torch::Tensor magnitude = xm.to(torch::kDouble).abs().matmul(w.to(torch::kDouble).abs().t()) +
                                              (with_bias ? b.to(torch::kDouble).abs() : torch::zeros({N}, torch::kDouble));
              const double unit = dt == torch::kDouble ? 1e-15 : dt == torch::kFloat ? 1e-6 : dt == torch::kHalf ? 1e-3 : 8e-3;
              const torch::Tensor err = (got.to(torch::kDouble) - want).abs() - unit * (magnitude + 1e-30) * 4;
              CHECK(err.max().item<double>() <= 0);
              // In the kernel each row's result is the same bits whatever the other rows: a row of M is the row
              // alone. (Above kSmallLinearRows at::linear takes over.)
              if (M <= lckv::ops::cpu::kSmallLinearRows) {
                CHECK(torch::equal(ops::linear(xm.narrow(0, M - 1, 1), w, b), got.narrow(0, M - 1, 1)));
              }
            }
          }
        }
      }
    }
  }
}

TEST_CASE("linear keeps at::linear's autograd, autocast, shapes and strides outside the decode kernel", "[ops][fused][linear]") {
  torch::manual_seed(12);
  const torch::Tensor w = torch::randn({6, 16}, torch::kDouble).requires_grad_(true);
  const torch::Tensor x = torch::randn({3, 16}, torch::kDouble);
  const torch::Tensor y = ops::linear(x, w);
  REQUIRE(y.requires_grad());  // a grad path goes to at::linear
  y.sum().backward();
  CHECK(rel_err(w.grad(), x.sum(0).expand({6, 16})) < 1e-12);
  {
    torch::NoGradGuard no_grad;
    // A batch [B, T, K] view with strides is read correctly; more rows than the cut take at::linear.
    const torch::Tensor xt = torch::randn({16, 2, 3}, torch::kDouble).permute({1, 2, 0});
    CHECK(rel_err(ops::linear(xt, w), at::linear(xt, w)) < 1e-12);
    const torch::Tensor big = torch::randn({40, 16}, torch::kDouble);
    CHECK(rel_err(ops::linear(big, w), at::linear(big, w)) < 1e-12);
    // Under autocast the product is at::linear's (bf16 result from fp32 operands).
    const torch::Tensor wf = w.detach().to(torch::kFloat), xf = x.to(torch::kFloat);
    at::autocast::set_autocast_enabled(at::kCPU, true);
    const torch::Tensor ya = ops::linear(xf, wf);
    at::autocast::set_autocast_enabled(at::kCPU, false);
    CHECK(ya.scalar_type() == at::autocast::get_autocast_dtype(at::kCPU));
  }
}

TEST_CASE("fused ops reject bad input with a message naming it", "[ops][fused]") {
  const torch::Tensor logits = torch::randn({2, 3, 10});
  CHECK_THROWS_WITH(ops::cross_entropy(logits, torch::tensor({{1, 2, 10}, {0, 0, 0}})),
                    Catch::Contains("target 10 is outside [0, vocab_size = 10)"));
  CHECK_THROWS_WITH(ops::cross_entropy(logits, torch::zeros({2, 4}, torch::kLong)), Catch::Contains("[B, T]"));
  CHECK_THROWS_WITH(ops::rms_norm(torch::randn({4, 8}), torch::ones({7}), 1e-5, torch::kFloat),
                    Catch::Contains("weight must be [8]"));
  CHECK_THROWS_WITH(ops::apply_rotary(torch::randn({1, 2, 3, 7}), torch::ones({1, 1, 3, 7}), torch::ones({1, 1, 3, 7})),
                    Catch::Contains("even D"));
  CHECK_THROWS_WITH(ops::swiglu(torch::randn({4}), torch::randn({5})), Catch::Contains("share shape"));
  CHECK_THROWS_WITH(ops::rms_norm(torch::ones({4}, torch::kLong), torch::ones({4}), 1e-5, torch::kFloat),
                    Catch::Contains("x must be float32"));
}
