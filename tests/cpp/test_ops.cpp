// The condensed attention op against the naive masked-softmax reference (fp64, test_reference.h),
// its backward against finite differences, and keys that no query sees (NaN/inf) kept out of every
// output and gradient.
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <cmath>
#include <string>
#include <vector>

#include "lckv/autocast.h"
#include "lckv/ops/condensed_attention.h"
#include "lckv/ops/cpu/condensed_attention_cpu.h"
#include "lckv/ops/fused_ops.h"
#include "test_reference.h"

using lckv::ops::AttentionParams;
using lckv::ops::condensed_attention;
using lckv::testing::max_diff;
using lckv::testing::naive_attention;

namespace {

struct Case {
  int64_t B, Hq, Hkv, T, S, D;
  bool strict;
  int64_t window, q_offset, block;
};

const Case kCases[] = {
    {2, 4, 2, 9, 9, 8, false, 0, 0, 256},   // causal GQA
    {2, 4, 2, 9, 9, 8, true, 0, 0, 256},    // strict: row 0 empty
    {1, 4, 4, 7, 7, 4, true, 3, 0, 2},      // MHA, strict + window, several query blocks
    {1, 8, 2, 5, 12, 8, false, 4, 7, 2},    // query offset (decode of a chunk), window, GQA 4
    {1, 8, 1, 1, 6, 8, true, 0, 5, 256},    // a single decoded token, MQA
    {2, 2, 1, 16, 16, 8, false, 5, 0, 3},   // window smaller than blocks' spans
    {1, 2, 2, 6, 6, 4, true, 1, 0, 4},      // strict with window 1: every row empty
    {1, 2, 2, 4, 9, 8, true, 2, 7, 256},    // keys end before the last query's window: a trailing empty row
    // Longer than a query block, no window: auto's backward is PyTorch's fused one (strict by the shift trick).
    {2, 4, 2, 20, 20, 8, false, 0, 0, 8},   // causal GQA
    {2, 4, 2, 20, 20, 8, true, 0, 0, 8},    // strict GQA
    {1, 4, 2, 300, 300, 64, true, 0, 0, 256},  // strict at the models' D and the default query block
};

}  // namespace

TEST_CASE("condensed attention forward matches the naive reference in fp64", "[ops]") {
  torch::manual_seed(0);
  for (const Case& c : kCases) {
    auto opts = torch::TensorOptions().dtype(torch::kDouble);
    torch::Tensor q = torch::randn({c.B, c.Hq, c.T, c.D}, opts);
    torch::Tensor k = torch::randn({c.B, c.Hkv, c.S, c.D}, opts);
    torch::Tensor v = torch::randn({c.B, c.Hkv, c.S, c.D}, opts);
    AttentionParams p{{c.strict, c.window, c.q_offset}, 0, c.block};
    torch::Tensor out = condensed_attention(q, k, v, p);
    torch::Tensor ref = naive_attention(q, k, v, c.strict, c.window, c.q_offset);
    INFO("case T=" << c.T << " S=" << c.S << " strict=" << c.strict << " window=" << c.window << " offset=" << c.q_offset);
    REQUIRE_FALSE(out.isnan().any().item<bool>());
    CHECK(max_diff(out, ref) < 1e-12);
  }
}

TEST_CASE("strict attention gives exact zeros for a query that sees no key", "[ops]") {
  auto opts = torch::TensorOptions().dtype(torch::kFloat);
  torch::Tensor q = torch::randn({1, 2, 4, 8}, opts), k = torch::randn({1, 1, 4, 8}, opts), v = torch::randn({1, 1, 4, 8}, opts);
  AttentionParams p;
  p.mask.strict = true;
  auto [out, lse] = lckv::ops::condensed_attention_forward(q, k, v, p);
  CHECK(out.select(2, 0).abs().max().item<float>() == 0.0f);
  CHECK(std::isinf(lse[0][0][0].item<float>()));
  // and the backward of an all-empty row is zero, not NaN
  q.requires_grad_(true);
  k.requires_grad_(true);
  condensed_attention(q, k, v, p).sum().backward();
  CHECK_FALSE(q.grad().isnan().any().item<bool>());
  CHECK(q.grad().select(2, 0).abs().max().item<float>() == 0.0f);
}

TEST_CASE("condensed attention backward matches the naive reference's autograd", "[ops]") {
  torch::manual_seed(1);
  for (const Case& c : kCases) {
    auto opts = torch::TensorOptions().dtype(torch::kDouble);
    torch::Tensor q = torch::randn({c.B, c.Hq, c.T, c.D}, opts).requires_grad_(true);
    torch::Tensor k = torch::randn({c.B, c.Hkv, c.S, c.D}, opts).requires_grad_(true);
    torch::Tensor v = torch::randn({c.B, c.Hkv, c.S, c.D}, opts).requires_grad_(true);
    torch::Tensor g = torch::randn({c.B, c.Hq, c.T, c.D}, opts);
    AttentionParams p{{c.strict, c.window, c.q_offset}, 0, c.block};
    auto grads = torch::autograd::grad({(condensed_attention(q, k, v, p) * g).sum()}, {q, k, v});
    auto ref = torch::autograd::grad({(naive_attention(q, k, v, c.strict, c.window, c.q_offset) * g).sum()}, {q, k, v});
    for (int i = 0; i < 3; ++i) {
      INFO("input " << i << " T=" << c.T << " strict=" << c.strict << " window=" << c.window);
      CHECK(max_diff(grads[i], ref[i]) < 1e-12);
    }
  }
}

TEST_CASE("condensed attention passes a finite-difference gradcheck", "[ops]") {
  // What torch.autograd.gradcheck does: compare d<out, g>/dx from backward with central
  // differences, element by element, in fp64.
  torch::manual_seed(2);
  const Case cases[] = {{1, 4, 2, 5, 5, 4, true, 0, 0, 2}, {1, 2, 1, 4, 7, 4, false, 3, 3, 256}};
  for (const Case& c : cases) {
    auto opts = torch::TensorOptions().dtype(torch::kDouble);
    std::vector<torch::Tensor> inputs = {torch::randn({c.B, c.Hq, c.T, c.D}, opts), torch::randn({c.B, c.Hkv, c.S, c.D}, opts),
                                         torch::randn({c.B, c.Hkv, c.S, c.D}, opts)};
    torch::Tensor g = torch::randn({c.B, c.Hq, c.T, c.D}, opts);
    AttentionParams p{{c.strict, c.window, c.q_offset}, 0, c.block};
    auto f = [&](const std::vector<torch::Tensor>& x) { return (condensed_attention(x[0], x[1], x[2], p) * g).sum(); };
    std::vector<torch::Tensor> leaves;
    for (auto& t : inputs) leaves.push_back(t.clone().requires_grad_(true));
    auto analytic = torch::autograd::grad({f(leaves)}, leaves);
    const double eps = 1e-6;
    for (size_t i = 0; i < inputs.size(); ++i) {
      auto flat = inputs[i].view({-1});
      for (int64_t e = 0; e < flat.numel(); ++e) {
        const double orig = flat[e].item<double>();
        flat[e] = orig + eps;
        const double up = f(inputs).item<double>();
        flat[e] = orig - eps;
        const double down = f(inputs).item<double>();
        flat[e] = orig;
        const double numeric = (up - down) / (2 * eps);
        const double a = analytic[i].view({-1})[e].item<double>();
        INFO("input " << i << " element " << e);
        REQUIRE(std::abs(numeric - a) < 1e-6 * (1 + std::abs(a)));
      }
    }
  }
}

TEST_CASE("bf16 and fp32 condensed attention agree with fp64 to their precision", "[ops]") {
  torch::manual_seed(3);
  torch::Tensor q = torch::randn({2, 4, 32, 16}, torch::kDouble), k = torch::randn({2, 2, 32, 16}, torch::kDouble),
                v = torch::randn({2, 2, 32, 16}, torch::kDouble);
  AttentionParams p;
  p.mask.strict = true;
  p.query_block = 8;
  torch::Tensor ref = naive_attention(q, k, v, true, 0, 0);
  torch::Tensor f32 = condensed_attention(q.to(torch::kFloat), k.to(torch::kFloat), v.to(torch::kFloat), p);
  torch::Tensor bf16 = condensed_attention(q.to(torch::kBFloat16), k.to(torch::kBFloat16), v.to(torch::kBFloat16), p);
  CHECK(f32.scalar_type() == torch::kFloat);
  CHECK(bf16.scalar_type() == torch::kBFloat16);
  CHECK(max_diff(f32, ref) < 1e-5);
  CHECK(max_diff(bf16, ref) < 5e-2);
}

TEST_CASE("condensed attention runs in the autocast dtype under CPU autocast", "[ops]") {
  torch::Tensor q = torch::randn({1, 2, 8, 16}), k = torch::randn({1, 1, 8, 16}), v = torch::randn({1, 1, 8, 16});
  torch::Tensor out;
  {
    lckv::AutocastScope autocast(at::kCPU, at::kBFloat16);
    out = condensed_attention(q, k, v, AttentionParams{});
  }
  CHECK(out.scalar_type() == torch::kBFloat16);
  CHECK_FALSE(at::autocast::is_autocast_enabled(at::kCPU));
}

TEST_CASE("condensed attention rejects bad inputs with a message naming the argument", "[ops]") {
  torch::Tensor q = torch::randn({1, 4, 3, 8}), k = torch::randn({1, 2, 3, 8}), v = torch::randn({1, 2, 3, 8});
  AttentionParams p;
  CHECK_THROWS_WITH(condensed_attention(q.to(torch::kDouble), k, v, p), Catch::Contains("must share a dtype"));
  CHECK_THROWS_WITH(condensed_attention(q, torch::randn({1, 3, 3, 8}), torch::randn({1, 3, 3, 8}), p),
                    Catch::Contains("multiple of KV heads"));
  CHECK_THROWS_WITH(condensed_attention(q, k, torch::randn({1, 2, 4, 8}), p), Catch::Contains("v must have k's shape"));
  CHECK_THROWS_WITH(condensed_attention(q.view({4, 3, 8}), k, v, p), Catch::Contains("q must be [B, Hq, T, D]"));
  CHECK_THROWS_WITH(condensed_attention(q, torch::randn({1, 2, 3, 4}), torch::randn({1, 2, 3, 4}), p),
                    Catch::Contains("head_dim"));
  CHECK_THROWS_WITH(condensed_attention(q.to(torch::kInt), k.to(torch::kInt), v.to(torch::kInt), p),
                    Catch::Contains("dtype must be"));
  p.mask.q_offset = -1;
  CHECK_THROWS_WITH(condensed_attention(q, k, v, p), Catch::Contains("q_offset"));
  // The backward's own inputs.
  p.mask.q_offset = 0;
  auto [out, lse] = lckv::ops::condensed_attention_forward(q, k, v, p);
  using lckv::ops::condensed_attention_backward;
  CHECK_THROWS_WITH(condensed_attention_backward(out.narrow(2, 0, 2), q, k, v, out, lse, p),
                    Catch::Contains("grad_out must be [1, 4, 3, 8]"));
  CHECK_THROWS_WITH(condensed_attention_backward(out, q, k, v, out, lse.narrow(2, 0, 2), p),
                    Catch::Contains("lse [1, 4, 3]"));
  CHECK_THROWS_WITH(condensed_attention_backward(out, q, k, v, out.to(torch::kLong), lse, p),
                    Catch::Contains("must be floating point"));
}

TEST_CASE("the fp32 op matches the fp64 naive reference to fp32 precision, forward and backward", "[ops]") {
  // The fp32 paths on every mask case as auto picks them: through the op (PyTorch's fused CPU
  // attention's forward for chunks of more than 4 queries, the decode kernel for fewer; the blocked
  // backward) and the raw forward/backward.
  torch::manual_seed(4);
  for (const Case& c : kCases) {
    auto opts = torch::TensorOptions().dtype(torch::kDouble);
    torch::Tensor q = torch::randn({c.B, c.Hq, c.T, c.D}, opts), k = torch::randn({c.B, c.Hkv, c.S, c.D}, opts),
                  v = torch::randn({c.B, c.Hkv, c.S, c.D}, opts), g = torch::randn({c.B, c.Hq, c.T, c.D}, opts);
    std::vector<torch::Tensor> f32 = {q.to(torch::kFloat).requires_grad_(true), k.to(torch::kFloat).requires_grad_(true),
                                      v.to(torch::kFloat).requires_grad_(true)};
    std::vector<torch::Tensor> f64 = {q.clone().requires_grad_(true), k.clone().requires_grad_(true), v.clone().requires_grad_(true)};
    AttentionParams p{{c.strict, c.window, c.q_offset}, 0, c.block};
    torch::Tensor out = condensed_attention(f32[0], f32[1], f32[2], p);
    torch::Tensor ref = naive_attention(f64[0], f64[1], f64[2], c.strict, c.window, c.q_offset);
    INFO("case T=" << c.T << " S=" << c.S << " strict=" << c.strict << " window=" << c.window << " offset=" << c.q_offset);
    REQUIRE_FALSE(out.isnan().any().item<bool>());
    CHECK(max_diff(out, ref) < 1e-5);
    auto grads = torch::autograd::grad({(out * g.to(torch::kFloat)).sum()}, f32);
    auto ref_grads = torch::autograd::grad({(ref * g).sum()}, f64);
    for (int i = 0; i < 3; ++i) {
      INFO("input " << i);
      CHECK(max_diff(grads[i], ref_grads[i]) < 1e-4);
    }
    auto [bout, blse] = lckv::ops::condensed_attention_forward(f32[0], f32[1], f32[2], p);
    CHECK(max_diff(bout, ref) < 1e-5);
    auto [bdq, bdk, bdv] =
        lckv::ops::condensed_attention_backward(g.to(torch::kFloat), f32[0], f32[1], f32[2], bout, blse, p);
    const torch::Tensor blocked[] = {bdq, bdk, bdv};
    for (int i = 0; i < 3; ++i) {
      INFO("blocked, input " << i);
      CHECK(max_diff(blocked[i], ref_grads[i]) < 1e-4);
    }
  }
}

namespace {

// Cases with keys that no query sees, each mask kind (D = 8).
struct HiddenCase {
  const char* what;
  int64_t B, Hq, Hkv, T, S;
  bool strict;
  int64_t window, q_offset;
  std::vector<int64_t> key_start;  // empty: no left padding
};

const HiddenCase kHiddenCases[] = {
    {"causal, unwritten slots after the chunk", 2, 4, 2, 6, 10, false, 0, 0, {}},
    {"strict: row 0 empty, the last key seen by none", 2, 4, 2, 7, 7, true, 0, 0, {}},
    {"strict window 1: every key hidden", 1, 2, 2, 5, 5, true, 1, 0, {}},
    {"window before the chunk at q_offset, slots after, GQA 4", 1, 8, 2, 4, 14, false, 3, 6, {}},
    {"chunk at q_offset, slots after, MQA", 2, 4, 1, 3, 10, false, 0, 4, {}},
    {"key_start left padding, slots after", 3, 4, 2, 6, 8, false, 0, 0, {0, 3, 5}},
    {"key_start, strict, window, q_offset", 3, 8, 2, 3, 10, true, 4, 5, {2, 0, 6}},
    {"decode with left padding, slots after", 3, 8, 2, 1, 9, false, 0, 5, {1, 4, 0}},
    {"decode through a strict window, slots after", 1, 4, 2, 1, 12, true, 3, 7, {}},
    // Blocks' key ranges widened to multiples of 16 take in keys no row of the block sees, at both ends.
    {"strict over 40 keys: widened blocks", 1, 4, 2, 40, 40, true, 0, 0, {}},
    {"window 9 over 37 keys, slots after: widened blocks", 1, 4, 2, 30, 37, false, 9, 0, {}},
};

}  // namespace

TEST_CASE("keys and values that no query sees never reach an output or gradient, even as NaN/inf", "[ops]") {
  // Every CPU forward path (auto, and rows, blocked in blocks of 2 rows, flash forced), through the op
  // and through the raw forward and the blocked backward, on fp64, fp32 and bf16: with NaN, +inf
  // or -inf planted in every hidden key and value, out, dq, dk, dv equal the clean run's bit for bit,
  // and the hidden keys' dk, dv are exactly zero.
  torch::manual_seed(6);
  const int64_t D = 8;
  for (const HiddenCase& c : kHiddenCases) {
    for (auto [dt, path] : {std::pair{torch::kDouble, lckv::ops::CpuAttentionPath::kAuto},
                            std::pair{torch::kFloat, lckv::ops::CpuAttentionPath::kAuto},
                            std::pair{torch::kBFloat16, lckv::ops::CpuAttentionPath::kAuto},
                            std::pair{torch::kDouble, lckv::ops::CpuAttentionPath::kRows},
                            std::pair{torch::kBFloat16, lckv::ops::CpuAttentionPath::kRows},
                            std::pair{torch::kFloat, lckv::ops::CpuAttentionPath::kBlocked},
                            std::pair{torch::kBFloat16, lckv::ops::CpuAttentionPath::kBlocked},
                            std::pair{torch::kFloat, lckv::ops::CpuAttentionPath::kFlash},
                            std::pair{torch::kBFloat16, lckv::ops::CpuAttentionPath::kFlash},
                            std::pair{torch::kFloat, lckv::ops::CpuAttentionPath::kTiled},
                            std::pair{torch::kBFloat16, lckv::ops::CpuAttentionPath::kTiled}}) {
      if (path == lckv::ops::CpuAttentionPath::kFlash && !c.key_start.empty()) continue;
      if (path == lckv::ops::CpuAttentionPath::kTiled &&
          !lckv::ops::cpu::tiled_attention_applies(torch::empty({1, 1, 1, D}, dt))) {
        WARN("tiled attention does not run " << dt << " on this CPU: not tested here");
        continue;
      }
      const torch::Tensor q = torch::randn({c.B, c.Hq, c.T, D}).to(dt), k = torch::randn({c.B, c.Hkv, c.S, D}).to(dt),
                          v = torch::randn({c.B, c.Hkv, c.S, D}).to(dt), g = torch::randn({c.B, c.Hq, c.T, D}).to(dt);
      for (int64_t block : {2, 256}) {  // many blocks, and one (the backward's single-block path)
        AttentionParams p{{c.strict, c.window, c.q_offset}, 0, block, path};
        if (!c.key_start.empty()) p.mask.key_start = torch::tensor(c.key_start, torch::kLong);
        const torch::Tensor hidden =
            lckv::testing::keys_no_query_sees(c.B, c.T, c.S, c.strict, c.window, c.q_offset, c.key_start);
        INFO(c.what << ", dtype " << dt << ", path " << int(path) << ", query block " << block);
        REQUIRE(hidden.any().item<bool>());
        // out, dq, dk, dv through the differentiable op, then through the blocked path directly.
        auto run = [&](const torch::Tensor& kk, const torch::Tensor& vv) {
          std::vector<torch::Tensor> leaves = {q.clone().requires_grad_(true), kk.clone().requires_grad_(true),
                                               vv.clone().requires_grad_(true)};
          const torch::Tensor out = condensed_attention(leaves[0], leaves[1], leaves[2], p);
          std::vector<torch::Tensor> r = {out.detach()};
          for (const torch::Tensor& grad : torch::autograd::grad({(out * g).sum()}, leaves)) r.push_back(grad);
          auto [bout, blse] = lckv::ops::condensed_attention_forward(q, kk, vv, p);
          auto [bdq, bdk, bdv] = lckv::ops::condensed_attention_backward(g, q, kk, vv, bout, blse, p);
          for (const torch::Tensor& t : {bout, blse, bdq, bdk, bdv}) r.push_back(t);
          return r;
        };
        const std::vector<torch::Tensor> clean = run(k, v);
        const char* names[] = {"out", "dq", "dk", "dv", "blocked out", "blocked lse", "blocked dq", "blocked dk",
                               "blocked dv"};
        for (double poison : {double(NAN), double(INFINITY), -double(INFINITY)}) {
          INFO("hidden keys and values hold " << poison);
          const std::vector<torch::Tensor> got = run(k.masked_fill(hidden, poison), v.masked_fill(hidden, -poison));
          for (size_t i = 0; i < got.size(); ++i) {
            INFO(names[i]);
            CHECK(torch::equal(got[i], clean[i]));
          }
          for (size_t i : {2, 3, 7, 8}) {
            INFO(names[i]);
            CHECK(got[i].masked_select(hidden.expand_as(got[i])).eq(0).all().item<bool>());
          }
        }
      }
    }
  }
}

namespace {

// The row log-sum-exp of the naive reference's scaled, masked scores (-inf for a row that sees no key).
torch::Tensor naive_lse(const torch::Tensor& q, const torch::Tensor& k, bool strict, int64_t window, int64_t q_offset,
                        const std::vector<int64_t>& key_start) {
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), S = k.size(2);
  const torch::Tensor kr = k.to(torch::kDouble).repeat_interleave(Hq / k.size(1), 1);
  const torch::Tensor scores = torch::matmul(q.to(torch::kDouble), kr.transpose(-1, -2)) / std::sqrt(double(D));
  const torch::Tensor visible = lckv::testing::naive_visible(B, T, S, strict, window, q_offset, key_start);
  return scores.masked_fill(visible.logical_not(), -INFINITY).logsumexp(-1);
}

struct PathCase {
  Case c;
  std::vector<int64_t> key_start;
};

std::vector<PathCase> path_cases() {
  std::vector<PathCase> cases;
  for (const Case& c : kCases) cases.push_back({c, {}});
  cases.push_back({{3, 4, 2, 1, 9, 8, false, 0, 8, 256}, {0, 3, 6}});  // decode with left padding
  cases.push_back({{3, 8, 2, 3, 10, 8, true, 4, 7, 2}, {2, 0, 6}});    // a chunk, key_start, strict, window
  cases.push_back({{2, 6, 2, 2, 12, 16, true, 5, 10, 256}, {}});       // two decoded rows, strict window, GQA 3
  cases.push_back({{1, 4, 2, 4, 40, 64, false, 0, 36, 256}, {}});       // D = 64 as in the models
  return cases;
}

}  // namespace

TEST_CASE("every CPU forward path matches the fp64 reference, and the blocked backward from its lse", "[ops]") {
  // rows (the decode kernel), blocked, flash (PyTorch's fused kernel; no key_start) and tiled (fp32 where it
  // applies; its own backward), forced one at a time: out and lse against the naive reference, then the
  // backward from that path's out and lse against the reference's autograd. fp64 to 1e-12 (rows, blocked),
  // fp32 to fp32 precision.
  using lckv::ops::CpuAttentionPath;
  torch::manual_seed(12);
  for (const PathCase& pc : path_cases()) {
    const Case& c = pc.c;
    auto opts = torch::TensorOptions().dtype(torch::kDouble);
    const torch::Tensor q = torch::randn({c.B, c.Hq, c.T, c.D}, opts), k = torch::randn({c.B, c.Hkv, c.S, c.D}, opts),
                        v = torch::randn({c.B, c.Hkv, c.S, c.D}, opts), g = torch::randn({c.B, c.Hq, c.T, c.D}, opts);
    std::vector<torch::Tensor> leaves = {q.clone().requires_grad_(true), k.clone().requires_grad_(true),
                                         v.clone().requires_grad_(true)};
    const torch::Tensor ref = naive_attention(leaves[0], leaves[1], leaves[2], c.strict, c.window, c.q_offset, pc.key_start);
    const auto ref_grads = torch::autograd::grad({(ref * g).sum()}, leaves);
    const torch::Tensor ref_lse = naive_lse(q, k, c.strict, c.window, c.q_offset, pc.key_start);
    for (CpuAttentionPath path : {CpuAttentionPath::kRows, CpuAttentionPath::kBlocked, CpuAttentionPath::kFlash,
                                  CpuAttentionPath::kTiled}) {
      if (path == CpuAttentionPath::kFlash && !pc.key_start.empty()) continue;
      for (torch::ScalarType dt : {torch::kDouble, torch::kFloat}) {
        if (path == CpuAttentionPath::kFlash && dt == torch::kDouble) continue;  // the fused kernel is fp32/bf16
        if (path == CpuAttentionPath::kTiled && !lckv::ops::cpu::tiled_attention_applies(q.to(dt))) continue;
        AttentionParams p{{c.strict, c.window, c.q_offset}, 0, c.block, path};
        if (!pc.key_start.empty()) p.mask.key_start = torch::tensor(pc.key_start, torch::kLong);
        INFO("path " << int(path) << ", " << dt << ", B=" << c.B << " Hq=" << c.Hq << " Hkv=" << c.Hkv << " T=" << c.T
                     << " S=" << c.S << " strict=" << c.strict << " window=" << c.window << " offset=" << c.q_offset
                     << " key_start " << pc.key_start.size());
        const double tol = dt == torch::kDouble ? 1e-12 : 2e-5;
        const torch::Tensor qd = q.to(dt), kd = k.to(dt), vd = v.to(dt), gd = g.to(dt);
        auto [out, lse] = lckv::ops::condensed_attention_forward(qd, kd, vd, p);
        lckv::testing::check_close(out, ref.detach(), tol, "out");
        lckv::testing::check_close(lse, ref_lse, tol, "lse");
        auto [dq, dk, dv] = lckv::ops::condensed_attention_backward(gd, qd, kd, vd, out, lse, p);
        lckv::testing::check_close(dq, ref_grads[0], 10 * tol, "dq");
        lckv::testing::check_close(dk, ref_grads[1], 10 * tol, "dk");
        lckv::testing::check_close(dv, ref_grads[2], 10 * tol, "dv");
        // and through the differentiable op with this path
        std::vector<torch::Tensor> xs = {qd.clone().requires_grad_(true), kd.clone().requires_grad_(true),
                                         vd.clone().requires_grad_(true)};
        const torch::Tensor op_out = condensed_attention(xs[0], xs[1], xs[2], p);
        lckv::testing::check_close(op_out, ref.detach(), tol, "op out");
        const auto op_grads = torch::autograd::grad({(op_out * gd).sum()}, xs);
        for (int i = 0; i < 3; ++i) lckv::testing::check_close(op_grads[i], ref_grads[i], 10 * tol, "op grad");
      }
    }
  }
}

TEST_CASE("the decode kernel and the blocked path read strided cache views, in every fused CPU variant and dtype",
          "[ops]") {
  // K/V as the cache hands them out: views of the first S slots of [B, Hkv, capacity, D] buffers
  // whose later slots hold NaN; q as the model makes it: a transposed view of [B, T, Hq, D]. A decoded
  // token (the rows kernel) and a chunk of 6 (the blocked path's fused softmax, forward and backward).
  torch::manual_seed(13);
  const int64_t B = 2, Hq = 8, Hkv = 4, D = 64, capacity = 20, S = 13;
  const torch::Tensor kbuf = torch::full({B, Hkv, capacity, D}, NAN, torch::kDouble),
                      vbuf = torch::full({B, Hkv, capacity, D}, NAN, torch::kDouble);
  kbuf.narrow(2, 0, S).normal_();
  vbuf.narrow(2, 0, S).normal_();
  const torch::Tensor q = torch::randn({B, 1, Hq, D}, torch::kDouble).transpose(1, 2);
  const torch::Tensor k = kbuf.narrow(2, 0, S), v = vbuf.narrow(2, 0, S);
  AttentionParams p;
  p.mask.q_offset = S - 1;  // the new token sees the cached ones and itself
  p.mask.key_start = torch::tensor({int64_t(0), int64_t(4)}, torch::kLong);
  const torch::Tensor ref = naive_attention(q, k, v, false, 0, S - 1, {0, 4});
  const torch::Tensor chunk = torch::randn({B, 6, Hq, D}, torch::kDouble).transpose(1, 2), g = torch::randn({B, Hq, 6, D}, torch::kDouble);
  std::vector<torch::Tensor> leaves = {chunk.clone().requires_grad_(true), k.clone().requires_grad_(true),
                                       v.clone().requires_grad_(true)};
  const torch::Tensor chunk_ref = naive_attention(leaves[0], leaves[1], leaves[2], true, 0, S - 6, {0, 4});
  const auto chunk_grads = torch::autograd::grad({(chunk_ref * g).sum()}, leaves);
  for (const std::string& cap : lckv::ops::runnable_fused_cpu_capabilities()) {
    lckv::ops::ScopedFusedCpuCapability scoped(cap);
    for (torch::ScalarType dt : {torch::kDouble, torch::kFloat, torch::kBFloat16, torch::kHalf}) {
      INFO(cap << ", " << dt);
      const double tol = dt == torch::kDouble ? 1e-12 : dt == torch::kFloat ? 1e-5 : 2e-2;
      const torch::Tensor kd = kbuf.to(dt).narrow(2, 0, S), vd = vbuf.to(dt).narrow(2, 0, S);
      const torch::Tensor out = condensed_attention(q.to(dt), kd, vd, p);
      CHECK(out.scalar_type() == dt);
      lckv::testing::check_close(out, ref, tol, "out");
      AttentionParams pb = p;
      pb.mask.q_offset = S - 6;
      pb.mask.strict = true;
      pb.cpu_path = lckv::ops::CpuAttentionPath::kBlocked;
      auto [bout, blse] = lckv::ops::condensed_attention_forward(chunk.to(dt), kd, vd, pb);
      lckv::testing::check_close(bout, chunk_ref, tol, "blocked out");
      auto [dq, dk, dv] = lckv::ops::condensed_attention_backward(g.to(dt), chunk.to(dt), kd, vd, bout, blse, pb);
      lckv::testing::check_close(dq, chunk_grads[0], 10 * tol, "blocked dq");
      lckv::testing::check_close(dk, chunk_grads[1].narrow(2, 0, S), 10 * tol, "blocked dk");
      lckv::testing::check_close(dv, chunk_grads[2].narrow(2, 0, S), 10 * tol, "blocked dv");
    }
  }
}

namespace {

// Shapes for the tiled path beyond one key tile (256 keys) and one chunk of rows (512): several tiles, odd key
// counts (strict: the last key is seen by no row), windows that start inside a tile, key_start, a query offset
// (a prefill chunk after cached keys), head dims that are not 64 and GQA 1/2/4.
struct TiledCase {
  const char* what;
  int64_t B, Hq, Hkv, T, S, D;
  bool strict;
  int64_t window, q_offset;
  std::vector<int64_t> key_start;
};

const TiledCase kTiledCases[] = {
    {"causal, 2 key tiles, GQA 2", 2, 4, 2, 300, 300, 64, false, 0, 0, {}},
    {"strict, 600 rows: 2 row chunks, 3 key tiles", 1, 2, 1, 600, 600, 32, true, 0, 0, {}},
    {"strict window 200 inside tiles, GQA 4", 1, 8, 2, 530, 530, 16, true, 200, 0, {}},
    {"a chunk after 700 cached keys, window 300", 2, 4, 4, 97, 797, 80, false, 300, 700, {}},
    {"key_start, causal, odd T", 3, 4, 2, 77, 77, 64, false, 0, 0, {0, 5, 40}},
    {"key_start with a query offset, strict window", 2, 2, 1, 70, 330, 48, true, 100, 260, {10, 280}},
};

}  // namespace

TEST_CASE("the tiled CPU path matches the fp64 reference beyond one tile, in fp32 and bf16, in every fused variant",
          "[ops]") {
  // Forced tiled forward and backward against the naive reference's autograd: fp32 to fp32 precision; bf16
  // within twice the blocked path's own bf16 error (plus a bf16 rounding step). Every fused CPU variant runs
  // the kernel (the AVX512 one with its packing and bf16-rounding instructions, the others the portable code),
  // each call with its reused scratch buffers poisoned with NaN first.
  using lckv::ops::CpuAttentionPath;
  torch::manual_seed(21);
  for (const TiledCase& c : kTiledCases) {
    const auto opts = torch::TensorOptions().dtype(torch::kDouble);
    // q in the model's layout; k a view with an odd row stride and offset (the kernel moves bf16 pairs as words).
    const torch::Tensor q = torch::randn({c.B, c.T, c.Hq, c.D}, opts).transpose(1, 2),
                        k_wide = torch::randn({c.B, c.Hkv, c.S, c.D + 1}, opts), k = k_wide.narrow(3, 1, c.D),
                        v = torch::randn({c.B, c.Hkv, c.S, c.D}, opts), g = torch::randn({c.B, c.Hq, c.T, c.D}, opts);
    std::vector<torch::Tensor> leaves = {q.clone().requires_grad_(true), k.clone().requires_grad_(true),
                                         v.clone().requires_grad_(true)};
    const torch::Tensor ref = naive_attention(leaves[0], leaves[1], leaves[2], c.strict, c.window, c.q_offset, c.key_start);
    const auto ref_grads = torch::autograd::grad({(ref * g).sum()}, leaves);
    const torch::Tensor ref_lse = naive_lse(q, k, c.strict, c.window, c.q_offset, c.key_start);
    for (const std::string& cap : lckv::ops::runnable_fused_cpu_capabilities()) {
      lckv::ops::ScopedFusedCpuCapability scoped(cap);
      for (torch::ScalarType dt : {torch::kFloat, torch::kBFloat16}) {
        INFO(c.what << ", " << cap << ", " << dt);
        const torch::Tensor qd = q.to(dt), kd = k_wide.to(dt).narrow(3, 1, c.D), vd = v.to(dt), gd = g.to(dt);
        REQUIRE(kd.stride(2) % 2 == 1);
        if (!lckv::ops::cpu::tiled_attention_applies(qd)) {
          WARN("tiled attention does not run " << dt << " on this CPU: not tested here");
          continue;
        }
        AttentionParams p{{c.strict, c.window, c.q_offset}, 0, 256, CpuAttentionPath::kTiled};
        if (!c.key_start.empty()) p.mask.key_start = torch::tensor(c.key_start, torch::kLong);
        lckv::ops::cpu::poison_tiled_attention_scratch();  // an unwritten scratch element read shows as NaN
        auto [out, lse] = lckv::ops::condensed_attention_forward(qd, kd, vd, p);
        auto [dq, dk, dv] = lckv::ops::condensed_attention_backward(gd, qd, kd, vd, out, lse, p);
        const std::vector<torch::Tensor> got = {out, dq, dk, dv}, want = {ref.detach(), ref_grads[0], ref_grads[1],
                                                                          ref_grads[2]};
        const char* names[] = {"out", "dq", "dk", "dv"};
        if (dt == torch::kFloat) {
          lckv::testing::check_close(lse, ref_lse, 2e-5, "lse");
          for (int i = 0; i < 4; ++i) lckv::testing::check_close(got[i], want[i], i == 0 ? 2e-5 : 2e-4, names[i]);
          continue;
        }
        AttentionParams pb = p;
        pb.cpu_path = CpuAttentionPath::kBlocked;
        auto [bout, blse] = lckv::ops::condensed_attention_forward(qd, kd, vd, pb);
        auto [bdq, bdk, bdv] = lckv::ops::condensed_attention_backward(gd, qd, kd, vd, bout, blse, pb);
        const std::vector<torch::Tensor> blocked = {bout, bdq, bdk, bdv};
        for (int i = 0; i < 4; ++i) {
          INFO(names[i]);
          REQUIRE_FALSE(got[i].isnan().any().item<bool>());
          const double err = lckv::testing::rel_err(got[i], want[i]), blocked_err = lckv::testing::rel_err(blocked[i], want[i]);
          INFO("tiled error " << err << ", blocked error " << blocked_err);
          CHECK(err <= 2 * blocked_err + 4e-3);
        }
      }
    }
  }
}

TEST_CASE("the tiled CPU path refuses what it does not compute, by name", "[ops]") {
  using lckv::ops::CpuAttentionPath;
  AttentionParams p{{false, 0, 0}, 0, 256, CpuAttentionPath::kTiled};
  for (torch::ScalarType dt : {torch::kDouble, torch::kHalf}) {
    const torch::Tensor x = torch::randn({1, 2, 8, 16}).to(dt);
    CHECK_FALSE(lckv::ops::cpu::tiled_attention_applies(x));
    CHECK_THROWS_WITH(lckv::ops::condensed_attention_forward(x, x, x, p), Catch::Contains("tiled CPU path") &&
                                                                               Catch::Contains(c10::toString(dt)));
  }
  const torch::Tensor odd = torch::randn({1, 2, 8, 15});  // head dim 15: not pairs
  CHECK_FALSE(lckv::ops::cpu::tiled_attention_applies(odd));
  CHECK_THROWS_WITH(lckv::ops::condensed_attention_forward(odd, odd, odd, p), Catch::Contains("head dim 15"));
  // auto routes what tiled does not take to the other paths, which compute it.
  AttentionParams pa{{true, 0, 0}, 0, 256, CpuAttentionPath::kAuto};
  const torch::Tensor h = torch::randn({1, 2, 8, 16}, torch::kDouble);
  const torch::Tensor ref = naive_attention(h, h, h, true, 0, 0);
  CHECK(max_diff(std::get<0>(lckv::ops::condensed_attention_forward(h.to(torch::kHalf), h.to(torch::kHalf),
                                                                    h.to(torch::kHalf), pa)),
                 ref) < 2e-2);
}
