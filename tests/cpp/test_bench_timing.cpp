// The benchmarks' attention timer (tools/bench_timing.h, used by lckv-bench-train-step): each attention region
// on intra-op thread 0 counts once, forward calls and backward nodes, although the autograd engine records every
// node twice, nested.
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <chrono>

#include "../../tools/bench_timing.h"
#include "test_models.h"

namespace {

// Spans and seconds the timer counts over one forward + backward of a batch of one sequence (one sequence: the
// model slices no iteration by batch, so every attention call runs on the calling thread).
std::pair<int64_t, double> timed_step(lckv::LCKVForCausalLM& model, double* wall_seconds) {
  const torch::Tensor ids = torch::randint(0, model->config.vocab_size, {1, 9});
  const lckv::bench::AttentionTimer timer;
  const auto t0 = std::chrono::steady_clock::now();
  model->forward(ids, ids).loss.backward();
  *wall_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return {timer.spans(), timer.seconds()};
}

}  // namespace

TEST_CASE("the benchmarks' attention timer counts each forward call and backward node once", "[bench]") {
  using lckv::testing::make_model;
  using lckv::testing::small_config;
  double wall = 0;
  // Llama (identity layer_types): one attention call per layer forward, one node per layer backward.
  auto llama = make_model(small_config("0_1_2_3", 4, 4, 2));
  auto [spans, seconds] = timed_step(llama, &wall);
  CHECK(spans == 2 * 4);  // counting the engine's wrapper and the node inside it gave 3 * 4
  CHECK(seconds > 0);
  CHECK(seconds <= wall);  // disjoint regions of one thread
  // LCKV sandwich w=2 (0_4_4_4_4_5), 2 forward passes and 1 backward pass: layer 0 and layer 5 once each; in the
  // cyclic segment 1-4, the two iterations without autograd run layers 1-3 (layer 4 only writes its KVs) and the
  // last runs 1-4. Forward calls 1 + 2 * 3 + 4 + 1 = 12; backward nodes for the calls under autograd: 1 + 4 + 1.
  auto lckv_model = make_model(small_config("0_4_4_4_4_5", 6, 4, 2));
  std::tie(spans, seconds) = timed_step(lckv_model, &wall);
  CHECK(spans == 12 + 6);
  CHECK(seconds <= wall);
  // A new timer starts from zero, and none counts once destroyed.
  {
    const lckv::bench::AttentionTimer idle;
    CHECK(idle.spans() == 0);
    CHECK(idle.seconds() == 0);
  }
  CHECK(lckv::bench::AttentionTimer::is_attention("lckv::condensed_attention"));
  CHECK(lckv::bench::AttentionTimer::is_attention(
      "autograd::engine::evaluate_function: torch::autograd::CppNode<CondensedAttentionFunction>"));
  CHECK_FALSE(lckv::bench::AttentionTimer::is_attention("aten::mm"));
}
