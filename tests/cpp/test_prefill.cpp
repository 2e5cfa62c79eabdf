// Exact prefill by convergence: the no-grad iterations of a cyclic segment stop once the top
// targets' KVs stop changing; the result still equals the sequential definition (fp64).
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include "lckv/generate/generate.h"
#include "lckv/model/lckv_model.h"

using namespace lckv;

namespace {

// A small LCKV model in fp64 whose weights are `gain` times Llama's initialisation: larger gains
// make the layers more nonlinear and the iteration slower to converge.
LCKVForCausalLM model_with_gain(const std::string& layer_types, int layers, double gain, uint64_t seed) {
  const nlohmann::json j = {{"vocab_size", 53},          {"hidden_size", 32},           {"intermediate_size", 48},
                            {"num_hidden_layers", layers}, {"num_attention_heads", 4},  {"num_key_value_heads", 2},
                            {"layer_types", layer_types},  {"initializer_range", 0.02 * gain}, {"rope_theta", 500.0}};
  torch::manual_seed(seed);
  LCKVForCausalLM m(LCKVConfig::from_json(j));
  init_weights(m);
  m->to(torch::kDouble);
  return m;
}

struct Run {
  torch::Tensor logits;
  int iterations = 0;  // of the (single) cyclic segment
};

Run iterate(LCKVForCausalLM& m, const torch::Tensor& ids, double tolerance) {
  torch::NoGradGuard no_grad;
  Run r;
  IterationOptions it{static_cast<int>(ids.size(1)), 1, {}, tolerance};
  int seen = -1;
  it.observer = [&](int, int iteration, int, const torch::Tensor&, const torch::Tensor&) {
    if (iteration != seen) ++r.iterations, seen = iteration;
  };
  r.logits = m->lm_logits(m->model->forward(ids, it));
  return r;
}

double max_diff(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

}  // namespace

TEST_CASE("exact prefill by convergence equals the sequential definition in fewer iterations", "[prefill]") {
  for (double gain : {1.0, 30.0}) {  // Llama-like and strongly nonlinear (slow to converge)
    for (const char* layer_types : {"0_4_4_4_4_5", "0_2_1_3_3"}) {
      INFO("gain " << gain << ", layer_types " << layer_types);
      LCKVForCausalLM m = model_with_gain(layer_types, std::string(layer_types).size() / 2 + 1, gain, 3);
      const int64_t T = gain == 1.0 ? 64 : 32;
      const torch::Tensor ids = torch::randint(0, 53, {2, T}, torch::kLong);
      const torch::Tensor sequential = m->forward_sequential(ids).logits;
      const Run converged = iterate(m, ids, convergence_tolerance(torch::kDouble));
      const Run full = iterate(m, ids, 0);
      CHECK(full.iterations == T);  // tolerance 0: every iteration runs (the theorem's bound)
      CHECK(max_diff(full.logits, sequential) < 1e-10);
      CHECK(max_diff(converged.logits, sequential) < 1e-9);
      CHECK(converged.iterations <= T);
      if (gain == 1.0) CHECK(converged.iterations < T / 2);  // Llama-scale weights converge long before T
      UNSCOPED_INFO("iterations " << converged.iterations << " of " << T);
    }
  }
}

TEST_CASE("a loose tolerance stops early and is measurably inexact, training is untouched by it", "[prefill]") {
  LCKVForCausalLM m = model_with_gain("0_4_4_4_4_5", 6, 1.0, 5);
  const torch::Tensor ids = torch::randint(0, 53, {1, 40}, torch::kLong);
  const torch::Tensor sequential = m->forward_sequential(ids).logits;
  const Run loose = iterate(m, ids, 1e-3);
  const Run tight = iterate(m, ids, convergence_tolerance(torch::kDouble));
  CHECK(loose.iterations < tight.iterations);
  CHECK(max_diff(loose.logits, sequential) > 1e-6);  // the test above could not pass by accident
  // With autograd, a tolerance only skips no-grad iterations: the b grad iterations always run.
  IterationOptions it{30, 2, {}, 1e-13};
  int grad_iterations = 0;
  it.observer = [&](int, int, int, const torch::Tensor& k, const torch::Tensor&) { grad_iterations += k.requires_grad(); };
  m->model->forward(ids, it).sum().backward();
  CHECK(grad_iterations == 2);
}

TEST_CASE("generate with exact prefill: logits of every step equal the sequential definition", "[prefill][cache]") {
  LCKVForCausalLM m = model_with_gain("0_4_4_4_4_5", 6, 10.0, 7);
  const std::vector<int64_t> prompt = {5, 9, 2, 44, 17, 3, 3, 8, 30, 12, 1, 6, 50, 21, 7, 7, 40, 33};
  GenerationConfig g;
  g.max_new_tokens = 6;
  g.prefill = PrefillMode::kExact;
  g.return_logits = true;
  const GenerationResult r = generate(m, {prompt}, g);
  std::vector<int64_t> all = prompt;
  all.insert(all.end(), r.tokens[0].begin(), r.tokens[0].end());
  const torch::Tensor seq = m->forward_sequential(torch::tensor(all).view({1, -1})).logits[0];
  const int64_t P = static_cast<int64_t>(prompt.size());
  for (int64_t s = 0; s < g.max_new_tokens; ++s) {
    INFO("step " << s);
    CHECK(max_diff(r.logits[0][s], seq[P - 1 + s]) < 1e-9);
  }
}
