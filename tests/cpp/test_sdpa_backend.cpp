// The SDPA backend of condensed attention (ops/sdpa_attention.h) against the naive fp64 reference on
// every mask case, forward and backward, and the backend selection.
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <cstdlib>

#include "lckv/ops/condensed_attention.h"
#include "lckv/ops/cuda_routes.h"
#include "lckv/ops/sdpa_attention.h"
#include "test_reference.h"

using namespace lckv;
using namespace lckv::testing;
using Catch::Matchers::Contains;

namespace {

struct Case {
  const char* name;
  int64_t T, S;
  bool strict;
  int64_t window, q_offset;
  std::vector<int64_t> key_start;
  int64_t Hq = 4, Hkv = 2;
};

const std::vector<Case> kCases = {
    {"causal", 9, 9, false, 0, 0, {}},
    {"strict (shift trick, row 0 empty)", 9, 9, true, 0, 0, {}},
    {"strict T = 1", 1, 1, true, 0, 0, {}},
    {"causal with q_offset (a chunk after a cached past)", 4, 11, false, 0, 7, {}},
    {"strict with q_offset", 4, 11, true, 0, 7, {}},
    {"window", 10, 10, false, 3, 0, {}},
    {"strict window + q_offset, MQA", 5, 12, true, 4, 7, {}, 4, 1},
    {"key_start (left padding), causal", 6, 6, false, 0, 0, {0, 2, 5}},
    {"key_start + strict + window + q_offset", 3, 9, true, 3, 6, {1, 4, 8}},
    {"decode with padding", 1, 8, false, 0, 7, {0, 3}},
};

ops::AttentionParams params(const Case& c, torch::Device device) {
  ops::AttentionParams p;
  p.mask = {c.strict, c.window, c.q_offset, {}};
  if (!c.key_start.empty()) p.mask.key_start = torch::tensor(c.key_start, torch::kLong).to(device);
  return p;
}

struct BackendScope {  // back to the environment's choice at exit
  explicit BackendScope(ops::AttentionBackend b) { ops::set_attention_backend(b); }
  ~BackendScope() { ops::clear_attention_backend(); }
};

}  // namespace

TEST_CASE("SDPA backend equals the naive reference on every mask case, forward and backward", "[ops][sdpa]") {
  BackendScope sdpa(ops::AttentionBackend::kSdpa);
  for (const Case& c : kCases) {
    for (auto dtype : {torch::kDouble, torch::kFloat}) {
      INFO(c.name << " " << dtype);
      const int64_t B = c.key_start.empty() ? 2 : static_cast<int64_t>(c.key_start.size()), D = 16;
      torch::manual_seed(11);
      const auto o = torch::TensorOptions().dtype(torch::kDouble);
      torch::Tensor q = torch::randn({B, c.Hq, c.T, D}, o), k = torch::randn({B, c.Hkv, c.S, D}, o),
                    v = torch::randn({B, c.Hkv, c.S, D}, o), g = torch::randn({B, c.Hq, c.T, D}, o);
      auto run = [&](const torch::Tensor& qq, const torch::Tensor& kk, const torch::Tensor& vv, bool naive) {
        std::vector<torch::Tensor> in = {qq.clone().requires_grad_(true), kk.clone().requires_grad_(true),
                                         vv.clone().requires_grad_(true)};
        const torch::Tensor out = naive ? naive_attention(in[0], in[1], in[2], c.strict, c.window, c.q_offset, c.key_start)
                                        : ops::condensed_attention(in[0], in[1], in[2], params(c, torch::kCPU));
        const auto grads = torch::autograd::grad({out}, in, {g.to(out.scalar_type())}, false, false, true);
        std::vector<torch::Tensor> r = {out};
        for (size_t j = 0; j < grads.size(); ++j) r.push_back(grads[j].defined() ? grads[j] : torch::zeros_like(in[j]));
        return r;
      };
      const auto want = run(q, k, v, true);
      const auto got = run(q.to(dtype), k.to(dtype), v.to(dtype), false);
      const double tol = dtype == torch::kDouble ? 1e-12 : 2e-5;
      for (int i = 0; i < 4; ++i) {
        INFO("output " << i);
        if (i == 1 && c.T == 1 && c.strict) continue;  // no key is seen: dq is zero on both sides
        CHECK(max_diff(got[i].to(torch::kDouble), want[i]) <= tol * std::max(1.0, want[i].abs().max().item<double>()));
      }
      // Keys no query sees may hold NaN/inf: nothing changes, and their dk/dv are exactly zero.
      const torch::Tensor hidden = keys_no_query_sees(B, c.T, c.S, c.strict, c.window, c.q_offset, c.key_start);
      if (hidden.any().item<bool>()) {
        const torch::Tensor nan = torch::full({}, std::nan(""), torch::kDouble);
        const auto dirty = run(q.to(dtype), torch::where(hidden, nan, k).to(dtype),
                               torch::where(hidden, torch::full({}, INFINITY, torch::kDouble), v).to(dtype), false);
        for (int i = 0; i < 2; ++i) CHECK(torch::equal(dirty[i], got[i]));
        CHECK(dirty[2].masked_select(hidden.expand_as(dirty[2])).abs().max().item<double>() == 0);
        CHECK(dirty[3].masked_select(hidden.expand_as(dirty[3])).abs().max().item<double>() == 0);
      }
    }
  }
}

TEST_CASE("attention backend: auto, lckv and sdpa agree, and bad names are refused", "[ops][sdpa]") {
  torch::manual_seed(3);
  const auto q = torch::randn({2, 4, 6, 16}), k = torch::randn({2, 2, 6, 16}), v = torch::randn({2, 2, 6, 16});
  ops::AttentionParams p;
  p.mask.strict = true;
  torch::Tensor outs[3];
  int i = 0;
  for (auto b : {ops::AttentionBackend::kAuto, ops::AttentionBackend::kLckv, ops::AttentionBackend::kSdpa}) {
    BackendScope scope(b);
    CHECK(ops::attention_backend() == b);
    outs[i++] = ops::condensed_attention(q, k, v, p);
  }
  CHECK(max_diff(outs[0], outs[2]) < 1e-5);
  CHECK(max_diff(outs[1], outs[2]) < 1e-5);
  CHECK(ops::parse_attention_backend("sdpa") == ops::AttentionBackend::kSdpa);
  CHECK_THROWS_WITH(ops::parse_attention_backend("flash"), Contains("\"flash\"") && Contains("auto, lckv or sdpa"));
  setenv("LCKV_ATTENTION_BACKEND", "cudnn", 1);
  CHECK_THROWS_WITH(ops::attention_backend(), Contains("LCKV_ATTENTION_BACKEND") && Contains("cudnn"));
  setenv("LCKV_ATTENTION_BACKEND", "sdpa", 1);
  CHECK(ops::attention_backend() == ops::AttentionBackend::kSdpa);
  unsetenv("LCKV_ATTENTION_BACKEND");
  CHECK(ops::attention_backend() == ops::AttentionBackend::kAuto);
}

TEST_CASE("a device query position (q_position) gives the naive reference on every mask case, on every backend",
          "[ops][sdpa][static]") {
  // A static decode step attends over the whole cache with its position in a device tensor: the
  // keys past the position are hidden by the mask alone, so they are filled with large finite garbage.
  for (const Case& c : kCases) {
    for (auto backend : {ops::AttentionBackend::kAuto, ops::AttentionBackend::kLckv, ops::AttentionBackend::kSdpa}) {
      BackendScope scope(backend);
      INFO(c.name << " backend " << ops::to_string(backend));
      const int64_t B = c.key_start.empty() ? 2 : static_cast<int64_t>(c.key_start.size()), D = 16, extra = 5;
      torch::manual_seed(12);
      const auto o = torch::TensorOptions().dtype(torch::kDouble);
      torch::Tensor q = torch::randn({B, c.Hq, c.T, D}, o), k = torch::randn({B, c.Hkv, c.S, D}, o),
                    v = torch::randn({B, c.Hkv, c.S, D}, o);
      const torch::Tensor want = naive_attention(q, k, v, c.strict, c.window, c.q_offset, c.key_start);
      // Keys and values at slots no query reaches (the rest of a static cache).
      const torch::Tensor k_all = torch::cat({k, torch::full({B, c.Hkv, extra, D}, 1e3, o)}, 2);
      const torch::Tensor v_all = torch::cat({v, torch::full({B, c.Hkv, extra, D}, -1e3, o)}, 2);
      ops::AttentionParams p = params(c, torch::kCPU);
      p.mask.q_offset = 0;
      p.mask.q_position = torch::full({1}, c.q_offset, torch::kLong);
      for (bool finite : {false, true}) {
        p.keys_finite = finite;
        INFO("keys_finite " << finite);
        CHECK(max_diff(ops::condensed_attention(q, k_all, v_all, p), want) < 1e-12);
      }
    }
  }
}

TEST_CASE("q_position is checked and refused by the raw kernels", "[ops][static][bad-input]") {
  const auto o = torch::TensorOptions().dtype(torch::kFloat);
  torch::Tensor q = torch::randn({1, 2, 1, 8}, o), k = torch::randn({1, 2, 4, 8}, o);
  ops::AttentionParams p;
  p.mask.q_position = torch::full({1}, 2, torch::kLong);
  CHECK_THROWS_WITH(ops::condensed_attention_forward(q, k, k, p), Contains("read only by the SDPA backend"));
  p.mask.q_offset = 3;
  CHECK_THROWS_WITH(ops::condensed_attention(q, k, k, p), Contains("q_offset (3) must be 0"));
  p.mask.q_offset = 0;
  p.mask.q_position = torch::full({2}, 2, torch::kLong);
  CHECK_THROWS_WITH(ops::condensed_attention(q, k, k, p), Contains("q_position must be an int64 tensor of one element"));
  p.mask.q_position = torch::full({1}, 2, torch::kInt);
  CHECK_THROWS_WITH(ops::condensed_attention(q, k, k, p), Contains("q_position must be an int64 tensor of one element"));
}

TEST_CASE("CUDA routes: auto takes our kernels only inside measured ranges where the bracketing points say so",
          "[ops][routes]") {
  using ops::CudaRouteKind;
  // scripts/make_cuda_routes.py's output for tests/data/cuda_routes/bench_attention_kernels.json (made-up
  // numbers; tests/python/test_cuda_routes.py checks the script still writes exactly this file).
  const std::vector<ops::CudaRoutePoint> points = {
#include "../data/cuda_routes/routes.inc"
  };
  REQUIRE(points.size() == 10);
  const auto bf16 = c10::ScalarType::BFloat16;
  auto ours = [&](CudaRouteKind kind, int64_t D, int64_t size, int sm = 90, c10::ScalarType dt = c10::ScalarType::BFloat16) {
    return ops::cuda_route_prefers_ours(points, kind, sm, dt, D, size);
  };
  CHECK_FALSE(ours(CudaRouteKind::kForward, 64, 1024));   // measured slower
  CHECK(ours(CudaRouteKind::kForward, 64, 4096));         // measured faster
  CHECK_FALSE(ours(CudaRouteKind::kForward, 64, 2048));   // between a slower and a faster point
  CHECK(ours(CudaRouteKind::kForward, 64, 8192));         // between two faster points
  CHECK(ours(CudaRouteKind::kForward, 64, 16384));
  CHECK_FALSE(ours(CudaRouteKind::kForward, 64, 32768));  // beyond the measured range
  CHECK_FALSE(ours(CudaRouteKind::kForward, 64, 512));    // below it
  CHECK(ours(CudaRouteKind::kBackward, 64, 2048));
  CHECK_FALSE(ours(CudaRouteKind::kBackward, 64, 8192));  // the 16k backward lost
  CHECK_FALSE(ours(CudaRouteKind::kForward, 128, 4096));  // faster but not the same result: max_diff too large
  CHECK_FALSE(ours(CudaRouteKind::kDecode, 64, 1024));    // lost at one batch of that context
  CHECK(ours(CudaRouteKind::kDecode, 64, 8192));
  CHECK_FALSE(ours(CudaRouteKind::kDecode, 64, 4096));
  CHECK_FALSE(ours(CudaRouteKind::kForward, 64, 4096, 80));                           // another card
  CHECK_FALSE(ours(CudaRouteKind::kForward, 64, 4096, 90, c10::ScalarType::Half));  // another dtype
  CHECK_FALSE(ours(CudaRouteKind::kForward, 64, 4096, 90, c10::ScalarType::Float));
  CHECK_FALSE(ops::cuda_route_prefers_ours({}, CudaRouteKind::kForward, 90, bf16, 64, 4096));  // nothing measured
  // The checked-in table is well formed: our kernels' head dims and positive sizes.
  for (const auto& pt : ops::measured_cuda_routes()) {
    CHECK((pt.head_dim == 64 || pt.head_dim == 128));
    CHECK(pt.size > 0);
  }
}
