// Small random fp64 models shared by the cache and generation tests (test_cache.cpp,
// test_generate.cpp), and the layer_types they are tried on.
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

#include "lckv/model/lckv_model.h"

namespace lckv::testing {

inline LCKVConfig small_config(const std::string& layer_types, int layers, int heads, int kv_heads,
                               int64_t window = 3) {
  nlohmann::json j = {{"vocab_size", 41},        {"hidden_size", 8 * heads}, {"intermediate_size", 24},
                      {"num_hidden_layers", layers}, {"num_attention_heads", heads}, {"num_key_value_heads", kv_heads},
                      {"layer_types", layer_types}, {"sliding_window", window},  {"initializer_range", 0.2},
                      {"rope_theta", 100.0},         {"forward_passes", 2},        {"backward_passes", 1}};
  return LCKVConfig::from_json(j);
}

inline LCKVForCausalLM make_model(const LCKVConfig& c, uint64_t seed = 0) {
  torch::manual_seed(seed);
  LCKVForCausalLM m(c);
  init_weights(m);
  m->to(torch::kDouble);
  return m;
}

inline torch::Tensor row(const std::vector<int64_t>& ids) { return torch::tensor(ids, torch::kLong).unsqueeze(0); }

struct ModelCase {
  std::string layer_types;
  int layers, heads, kv_heads;
};

inline const ModelCase kModelCases[] = {
    {"0_4_4_4_4_5", 6, 4, 2},  // LCKV sandwich w=2, GQA
    {"0_1_2_3", 4, 4, 1},      // Llama identity, MQA
    {"0_0_2_2_4_4", 6, 4, 2},  // CLA
    {"0s_1s_2_2", 4, 4, 2},    // YOCO with a sliding window of 3
    {"0_2_1_3", 4, 4, 2},      // cross targets
    {"0_2_2_2_2_5", 6, 2, 2},  // sandwich-middle, MHA
    {"2_0_3_3", 4, 2, 1},      // two top targets in one segment
    {"0_3s_3_3", 4, 4, 4},     // top attention through a sliding window
};

}  // namespace lckv::testing
