// Timing helpers shared by the CPU benchmarks (lckv-bench-train-step, lckv-bench-attention-cpu,
// lckv-bench-throughput): one definition of a median and of how the in-run matmul rate is timed, so their
// ratios stay comparable, and of the run settings recorded next to them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
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

// Wall time inside condensed attention while an AttentionTimer lives: the op's forward (RECORD_FUNCTION'd by its
// front, "lckv::condensed_attention") and its autograd node in the backward, counted on intra-op thread 0 only
// (the model's batch-sliced iterations call attention on every thread at once, so the other threads' calls overlap
// thread 0's in wall time). Each outermost attention region counts once: the autograd engine records a node's call
// twice, nested ("autograd::engine::evaluate_function: CppNode<...CondensedAttentionFunction>" around
// "CppNode<...CondensedAttentionFunction>"), and matching both names double-counted every backward (an LCKV w=2
// step at T=512 showed attention 27-28% of it instead of ~20%). One timer at a time (the counters are global).
class AttentionTimer {
 public:
  AttentionTimer() {
    seconds_total() = 0;
    spans_total() = 0;
    handle_ = at::addGlobalCallback(
        at::RecordFunctionCallback(
            [](const at::RecordFunction& fn) -> std::unique_ptr<at::ObserverContext> {
              if (!is_attention(fn.name()) || at::get_thread_num() != 0) return nullptr;
              auto span = std::make_unique<Span>();
              span->outermost = depth()++ == 0;
              return span;
            },
            [](const at::RecordFunction&, at::ObserverContext* ctx) {
              if (ctx == nullptr) return;
              --depth();
              const auto* span = static_cast<const Span*>(ctx);
              if (!span->outermost) return;
              const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - span->t0).count();
              // atomic<double>::fetch_add is C++20; one writer (thread 0) at a time anyway.
              double seen = seconds_total().load();
              while (!seconds_total().compare_exchange_weak(seen, seen + s)) {
              }
              ++spans_total();
            })
            .needsInputs(false)
            .scopes({at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION, at::RecordScope::USER_SCOPE}));
  }
  ~AttentionTimer() { at::removeCallback(handle_); }
  AttentionTimer(const AttentionTimer&) = delete;
  AttentionTimer& operator=(const AttentionTimer&) = delete;

  double seconds() const { return seconds_total().load(); }
  // Outermost attention regions timed (forward calls plus backward nodes on thread 0).
  int64_t spans() const { return spans_total().load(); }

  static bool is_attention(const char* name) {
    return std::strcmp(name, "lckv::condensed_attention") == 0 ||
           std::strstr(name, "CondensedAttentionFunction") != nullptr;
  }

 private:
  struct Span : at::ObserverContext {
    std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
    bool outermost = true;
  };
  static std::atomic<double>& seconds_total() {
    static std::atomic<double> s{0};
    return s;
  }
  static std::atomic<int64_t>& spans_total() {
    static std::atomic<int64_t> n{0};
    return n;
  }
  static int& depth() {
    thread_local int d = 0;
    return d;
  }
  at::CallbackHandle handle_;
};

}  // namespace lckv::bench
