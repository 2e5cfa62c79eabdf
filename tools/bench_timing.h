// Timing helpers shared by the CPU benchmarks (lckv-bench-train-step, lckv-bench-attention-cpu,
// lckv-bench-throughput): one definition of a median and of how the in-run matmul rate is timed, so their
// ratios stay comparable, and of the run settings recorded next to them.
#pragma once

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <vector>

namespace lckv::bench {

// How idle OpenMP workers wait in this run (null: unset). Results depend on it: on a VM whose idle cores wake
// slowly, each parallel region of a passive pool paid ~80 us to wake its worker (docs/design.md §7).
inline nlohmann::json openmp_wait_settings() {
  nlohmann::json j;
  for (const char* name : {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"}) {
    const char* value = std::getenv(name);
    j[name] = value != nullptr ? nlohmann::json(value) : nlohmann::json();
  }
  return j;
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median milliseconds of `reps` calls of fn, after one warm-up call.
template <typename F>
double median_ms(F&& fn, int reps) {
  fn();
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return median(ms);
}

// Calls the matmul rate is timed over at least. Right after other work its first calls run up to 2x
// slower (an AVX2 Zen 3 in fp32: a median of 5 calls gave 46 GFLOP/s, of 20 gave 92, a Python loop 90),
// which overstated every fraction_of_matmul_rate about 2x.
constexpr int kMatmulCalls = 20;

// The matmul rate of y = x w^T (at::linear, as the model's layers), GFLOP/s: median of kMatmulCalls calls.
inline double linear_gflop_per_s(const at::Tensor& x, const at::Tensor& w) {
  const double flops = 2.0 * x.size(0) * x.size(1) * w.size(0);
  return flops / median_ms([&] { at::linear(x, w); }, kMatmulCalls) / 1e6;
}

}  // namespace lckv::bench
