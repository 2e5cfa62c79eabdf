// LCKVConfig: parsing of config.json and layer_types, the errors for bad input, and the derived
// iteration plan. Torch-free.
#include <catch2/catch.hpp>

#include <filesystem>

#include "lckv/config.h"

using namespace lckv;
using nlohmann::json;

namespace {
json base() {
  return {{"vocab_size", 100}, {"hidden_size", 64}, {"intermediate_size", 128}, {"num_hidden_layers", 4},
          {"num_attention_heads", 4}, {"num_key_value_heads", 2}};
}
LCKVConfig with(json patch) {
  json j = base();
  j.merge_patch(patch);
  return LCKVConfig::from_json(j);
}
}  // namespace

TEST_CASE("a plain Llama config loads with Hugging Face defaults", "[config]") {
  LCKVConfig c = LCKVConfig::from_json(base());
  CHECK(c.is_identity());
  CHECK(c.rope_theta == 10000.0);
  CHECK(c.forward_passes == 7);
  CHECK(c.backward_passes == 2);
  CHECK(c.sliding_window == 4096);
  CHECK(c.head_dim == 16);
  CHECK(c.kv_layers() == std::vector<int>{0, 1, 2, 3});
  CHECK(c.iteration_plan().segments.size() == 4);
}

TEST_CASE("layer_types parsing and derived facts", "[config]") {
  LCKVConfig c = with({{"layer_types", "0_3s_3_3"}});
  CHECK(c.layer_types[1] == LayerType{3, true});
  CHECK(c.layer_window(1) == 4096);
  CHECK(c.layer_window(2) == 0);
  CHECK(c.layer_attends_top(1));
  CHECK(c.layer_masks_diagonal(2));
  CHECK_FALSE(c.layer_masks_diagonal(3));
  CHECK_FALSE(c.layer_computes_kv(1));
  CHECK(c.kv_layers() == std::vector<int>{0, 3});
  CHECK(format_layer_types(c.layer_types) == "0_3s_3_3");
}

TEST_CASE("iteration plans of the presets", "[config]") {
  auto plan = [](const std::string& lt, int L) {
    json j = base();
    j["num_hidden_layers"] = L;
    j["layer_types"] = lt;
    return LCKVConfig::from_json(j).iteration_plan();
  };
  auto w2 = plan("0_6_6_6_6_6_6_7", 8);
  REQUIRE(w2.segments.size() == 3);
  CHECK(w2.segments[1].cyclic);
  CHECK(w2.segments[1].first == 1);
  CHECK(w2.segments[1].last == 6);
  CHECK(w2.segments[1].top_targets == std::vector<int>{6});

  auto cross = plan("0_2_1_3", 4);  // layer 2 computes KVs for layer 1 but reads layer 1's
  REQUIRE(cross.segments.size() == 3);
  CHECK(cross.segments[1].first == 1);
  CHECK(cross.segments[1].last == 2);

  auto chained = plan("0_2_4_3_4_5", 6);  // extended: layer 1 -> 2, layer 2 -> 4
  REQUIRE(chained.segments.size() == 3);
  CHECK(chained.segments[1].first == 1);
  CHECK(chained.segments[1].last == 4);
  CHECK(chained.segments[1].top_targets == std::vector<int>{2, 4});
  CHECK(chained.segments[1].last_top_target() == 4);

  for (const auto& s : plan("0_0_2_2", 4).segments) CHECK_FALSE(s.cyclic);  // CLA: no iteration
  for (const auto& s : plan("0s_1s_2_2", 4).segments) CHECK_FALSE(s.cyclic);  // YOCO
  auto middle = plan("0_3_3_3_3_3_3_7", 8);
  REQUIRE(middle.segments.size() == 6);  // 0, [1..3], 4, 5, 6, 7
  CHECK(middle.segments[1].last == 3);
}

TEST_CASE("every preset in configs/ loads", "[config]") {
  int n = 0;
  for (const auto& e : std::filesystem::directory_iterator("configs")) {
    if (e.path().extension() != ".json") continue;
    INFO(e.path());
    LCKVConfig c = LCKVConfig::from_file(e.path().string());
    CHECK(c.model_type == "lckv-llama");
    ++n;
  }
  CHECK(n >= 17);
}

TEST_CASE("config round-trips through JSON", "[config]") {
  LCKVConfig c = with({{"layer_types", "0s_1s_2_2"}, {"sliding_window", 3}, {"force_nodiag", true},
                       {"rope_scaling", {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                                         {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}}}});
  LCKVConfig d = LCKVConfig::from_json(c.to_json());
  CHECK(d.layer_types == c.layer_types);
  CHECK(d.sliding_window == 3);
  CHECK(d.force_nodiag);
  REQUIRE(d.rope_scaling);
  CHECK(d.rope_scaling->factor == 8.0);
  CHECK(d.to_json() == c.to_json());
}

TEST_CASE("to_json writes a plain Llama as transformers' Llama and the rest in the LCKV format", "[config][hf]") {
  // docs/design.md §5.1.1: the one mapping between our layer_types and transformers'.
  const LCKVConfig plain = with({{"rope_theta", 500000.0}, {"forward_passes", 3}, {"torch_dtype", "bfloat16"}});
  const json p = plain.to_json();
  CHECK(p["model_type"] == "llama");
  CHECK(p["architectures"] == json::array({"LlamaForCausalLM"}));
  for (const char* lckv_only : {"layer_types", "forward_passes", "backward_passes", "sliding_window", "use_sequential",
                                "force_nodiag", "auto_map"}) {
    INFO(lckv_only);
    CHECK_FALSE(p.contains(lckv_only));
  }
  CHECK(p["rope_parameters"] == json({{"rope_type", "default"}, {"rope_theta", 500000.0}}));
  CHECK(p["rope_theta"] == 500000.0);
  CHECK(p["dtype"] == "bfloat16");
  CHECK(p["torch_dtype"] == "bfloat16");
  // read back: the same model; the LCKV fields, meaningless for a plain Llama, take their defaults
  const LCKVConfig back = LCKVConfig::from_json(p);
  CHECK(back.is_identity());
  CHECK(back.rope_theta == 500000.0);
  CHECK(back.forward_passes == 7);
  CHECK(back.to_json() == p);

  const LCKVConfig scaled = with({{"rope_scaling", {{"rope_type", "linear"}, {"factor", 2.0}}}});
  CHECK(scaled.to_json()["rope_parameters"] == json({{"rope_type", "linear"}, {"factor", 2.0}, {"rope_theta", 10000.0}}));
  CHECK(LCKVConfig::from_json(scaled.to_json()).rope_scaling->factor == 2.0);

  // LCKV models, sliding identity layers (transformers' Llama has no sliding window) and force_nodiag
  for (const json& patch : {json{{"layer_types", "0_3_3_3"}}, json{{"layer_types", "0_1s_2_3"}},
                            json{{"force_nodiag", true}}}) {
    INFO(patch.dump());
    const json l = with(patch).to_json();
    CHECK(l["model_type"] == "lckv-llama");
    CHECK(l["architectures"] == json::array({"LCKVLlamaForCausalLM"}));
    CHECK(l["auto_map"] == json({{"AutoConfig", "lckv_hf.LCKVLlamaConfig"},
                                 {"AutoModelForCausalLM", "lckv_hf.LCKVLlamaForCausalLM"}}));
    CHECK(l["layer_types"].is_string());
    CHECK_FALSE(l.contains("rope_parameters"));
    CHECK(LCKVConfig::from_json(l).to_json() == l);
  }
  // kLCKV: the LCKV format for a plain Llama too (lckv.hf.LCKVLlamaConfig's view)
  const json forced = plain.to_json(ConfigFormat::kLCKV);
  CHECK(forced["model_type"] == "lckv-llama");
  CHECK(forced["layer_types"] == "0_1_2_3");
  CHECK(forced["forward_passes"] == 3);
}

TEST_CASE("malformed layer_types are rejected naming the entry", "[config][bad-input]") {
  CHECK_THROWS_WITH(with({{"layer_types", "0_1_2"}}), Catch::Contains("has 3 entries, expected num_hidden_layers = 4"));
  CHECK_THROWS_WITH(with({{"layer_types", "0_1_2_4"}}), Catch::Contains("entry 3 ('4') is out of range [0, 4)"));
  CHECK_THROWS_WITH(with({{"layer_types", "0__2_3"}}), Catch::Contains("entry 1 ('') is empty"));
  CHECK_THROWS_WITH(with({{"layer_types", "0_1_2_"}}), Catch::Contains("entry 3 ('') is empty"));
  CHECK_THROWS_WITH(with({{"layer_types", "0_x_2_3"}}), Catch::Contains("entry 1 ('x') is not an integer"));
  CHECK_THROWS_WITH(with({{"layer_types", "0_-1_2_3"}}), Catch::Contains("entry 1 ('-1') is not an integer"));
  CHECK_THROWS_WITH(with({{"layer_types", "0_1t_2_3"}}), Catch::Contains("entry 1 ('1t') has unknown suffix 't'"));
  CHECK_THROWS_WITH(with({{"layer_types", "0_1_2_99999999999"}}), Catch::Contains("entry 3"));
  CHECK_THROWS_WITH(with({{"layer_types", 3}}), Catch::Contains("'layer_types' must be a string"));
}

TEST_CASE("bad config fields are rejected naming the field and value", "[config][bad-input]") {
  json j = base();
  j.erase("hidden_size");
  CHECK_THROWS_WITH(LCKVConfig::from_json(j), Catch::Contains("'hidden_size' is missing"));
  j = base();
  j.erase("vocab_size");
  CHECK_THROWS_WITH(LCKVConfig::from_json(j), Catch::Contains("'vocab_size' is missing"));
  CHECK_THROWS_WITH(with({{"num_key_value_heads", 3}}),
                    Catch::Contains("num_attention_heads = 4 is not divisible by num_key_value_heads = 3"));
  CHECK_THROWS_WITH(with({{"hidden_size", 66}}), Catch::Contains("hidden_size = 66 is not divisible by num_attention_heads = 4"));
  CHECK_THROWS_WITH(with({{"forward_passes", -1}}), Catch::Contains("'forward_passes' = -1, expected >= 0"));
  CHECK_THROWS_WITH(with({{"backward_passes", 0}}), Catch::Contains("'backward_passes' = 0, expected >= 1"));
  CHECK_THROWS_WITH(with({{"num_hidden_layers", 0}}), Catch::Contains("'num_hidden_layers' = 0"));
  CHECK_THROWS_WITH(with({{"vocab_size", "big"}}), Catch::Contains("'vocab_size' has value \"big\", expected an integer"));
  CHECK_THROWS_WITH(with({{"hidden_act", "gelu"}}), Catch::Contains("'hidden_act' = 'gelu' is not supported"));
  CHECK_THROWS_WITH(with({{"rope_scaling", {{"rope_type", "yarn"}, {"factor", 2.0}}}}), Catch::Contains("rope_type 'yarn'"));
  CHECK_THROWS_WITH(with({{"sliding_window", 0}}), Catch::Contains("'sliding_window' = 0"));
  CHECK_THROWS_WITH(LCKVConfig::from_file("/nonexistent/config.json"), Catch::Contains("cannot open config file '/nonexistent/config.json'"));
}
