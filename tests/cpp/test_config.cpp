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
  CHECK_THROWS_WITH(with({{"rope_scaling", {{"rope_type", "longrope"}, {"factor", 2.0}}}}),
                    Catch::Contains("rope_type 'longrope'"));
  CHECK_THROWS_WITH(with({{"sliding_window", 0}}), Catch::Contains("'sliding_window' = 0"));
  CHECK_THROWS_WITH(LCKVConfig::from_file("/nonexistent/config.json"), Catch::Contains("cannot open config file '/nonexistent/config.json'"));
}

// ---- Hugging Face configs as transformers 4 and 5 write them (docs/design.md §5.1)

namespace {
// The fields transformers 5.24 LlamaConfig.save_pretrained writes besides the shape (base()).
json hf5(json patch) {
  json j = base();
  j.merge_patch({{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"}, {"attention_dropout", 0.0},
                 {"head_dim", 16}, {"pad_token_id", nullptr}, {"pretraining_tp", 1}, {"use_cache", true},
                 {"rope_parameters", {{"rope_theta", 10000.0}, {"rope_type", "default"}}},
                 {"transformers_version", "5.24.0"}, {"dtype", "float32"}});
  // Top-level fields replaced whole (not merged), null removes one.
  for (auto it = patch.begin(); it != patch.end(); ++it) {
    if (it->is_null()) j.erase(it.key());
    else j[it.key()] = *it;
  }
  return j;
}
LCKVConfig hf5_with(json patch) { return LCKVConfig::from_json(hf5(std::move(patch))); }
json llama3(json patch = json::object()) {
  json r = {{"rope_type", "llama3"}, {"rope_theta", 500000.0}, {"factor", 8.0}, {"low_freq_factor", 1.0},
            {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 64}};
  r.merge_patch(patch);
  return r;
}
}  // namespace

TEST_CASE("transformers 5 configs: rope_parameters, dtype, layer_types of attention kinds", "[config][hf]") {
  LCKVConfig plain = hf5_with({{"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 500000.0}}},
                               {"dtype", "bfloat16"}});
  CHECK(plain.rope_theta == 500000.0);
  CHECK_FALSE(plain.rope_scaling);
  CHECK(plain.torch_dtype == "bfloat16");
  CHECK(plain.model_type == "llama");
  CHECK(plain.is_identity());

  LCKVConfig l3 = hf5_with({{"rope_parameters", llama3()}, {"max_position_embeddings", 256}});
  CHECK(l3.rope_theta == 500000.0);
  REQUIRE(l3.rope_scaling);
  CHECK(l3.rope_scaling->type == "llama3");
  CHECK(l3.rope_scaling->factor == 8.0);
  CHECK(l3.rope_scaling->original_max_position_embeddings == 64);
  // transformers 5 fills a missing original_max_position_embeddings with max_position_embeddings.
  json no_original = llama3();
  no_original.erase("original_max_position_embeddings");
  CHECK(hf5_with({{"rope_parameters", no_original}, {"max_position_embeddings", 256}})
            .rope_scaling->original_max_position_embeddings == 256);

  // A top-level original_max_position_embeddings is not read by transformers 5's Llama: one that disagrees with
  // the value it uses is refused.
  CHECK(hf5_with({{"rope_parameters", llama3()}, {"original_max_position_embeddings", 64}})
            .rope_scaling->original_max_position_embeddings == 64);
  CHECK_THROWS_WITH(hf5_with({{"rope_parameters", llama3()}, {"original_max_position_embeddings", 32}}),
                    Catch::Contains("'original_max_position_embeddings' = 32.0 conflicts with "
                                    "'rope_parameters.original_max_position_embeddings' = 64.0"));
  CHECK_THROWS_WITH(hf5_with({{"rope_parameters", no_original}, {"original_max_position_embeddings", 32},
                              {"max_position_embeddings", 256}}),
                    Catch::Contains("conflicts with the max_position_embeddings = 256.0 that transformers uses"));

  // The list form of layer_types: identity entries, sliding_attention -> the s suffix with sliding_window.
  const json kinds = {"full_attention", "sliding_attention", "full_attention", "sliding_attention"};
  LCKVConfig sw = hf5_with({{"layer_types", kinds}, {"sliding_window", 3}});
  CHECK(format_layer_types(sw.layer_types) == "0_1s_2_3s");
  CHECK(sw.layer_window(1) == 3);
  CHECK(sw.layer_window(2) == 0);
  CHECK(sw.kv_layers() == std::vector<int>{0, 1, 2, 3});
  CHECK(format_layer_types(hf5_with({{"layer_types", std::vector<std::string>(4, "full_attention")}}).layer_types) ==
        "0_1_2_3");
  CHECK(hf5_with({{"layer_types", std::vector<std::string>(4, "full_attention")}}).is_identity());
}

TEST_CASE("transformers 4 configs: rope_theta, rope_scaling with type or rope_type, torch_dtype", "[config][hf]") {
  json hf4 = base();
  hf4.merge_patch({{"model_type", "llama"}, {"torch_dtype", "float16"}, {"rope_theta", 1000000.0},
                   {"rope_scaling", {{"type", "linear"}, {"factor", 4.0}}}, {"transformers_version", "4.44.2"}});
  LCKVConfig c = LCKVConfig::from_json(hf4);
  CHECK(c.rope_theta == 1000000.0);
  REQUIRE(c.rope_scaling);
  CHECK(c.rope_scaling->type == "linear");
  CHECK(c.rope_scaling->factor == 4.0);
  CHECK(c.torch_dtype == "float16");
  hf4["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                         {"original_max_position_embeddings", 8192}};
  CHECK(LCKVConfig::from_json(hf4).rope_scaling->high_freq_factor == 4.0);
  hf4["rope_scaling"] = {{"type", "default"}};
  CHECK_FALSE(LCKVConfig::from_json(hf4).rope_scaling);
  // transformers 5 converting a transformers 4 config writes both names and the theta inside: the same RoPE.
  hf4["rope_scaling"] = {{"type", "linear"}, {"rope_type", "linear"}, {"factor", 4.0}, {"rope_theta", 1000000.0}};
  CHECK(LCKVConfig::from_json(hf4).rope_scaling->factor == 4.0);
  // Both spellings of the dtype, agreeing.
  hf4["dtype"] = "float16";
  CHECK(LCKVConfig::from_json(hf4).torch_dtype == "float16");
}

TEST_CASE("yarn: transformers' defaults for the attention factor and the betas", "[config][hf]") {
  auto yarn = [](json extra) {
    json r = {{"rope_type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 32}};
    r.merge_patch(extra);
    return *hf5_with({{"rope_parameters", r}}).rope_scaling;
  };
  RopeScaling s = yarn(json::object());
  CHECK(s.type == "yarn");
  CHECK(s.attention_factor == Approx(0.1 * std::log(4.0) + 1.0).epsilon(1e-15));
  CHECK(s.beta_fast == 32.0);
  CHECK(s.beta_slow == 1.0);
  CHECK(s.truncate);
  // mscale / mscale_all_dim (DeepSeek's form) and an explicit attention_factor.
  CHECK(yarn({{"mscale", 2.0}, {"mscale_all_dim", 1.0}}).attention_factor ==
        Approx((0.2 * std::log(4.0) + 1.0) / (0.1 * std::log(4.0) + 1.0)).epsilon(1e-15));
  CHECK(yarn({{"mscale", 2.0}}).attention_factor == Approx(0.1 * std::log(4.0) + 1.0).epsilon(1e-15));
  CHECK(yarn({{"attention_factor", 0.5}, {"mscale", 2.0}, {"mscale_all_dim", 1.0}}).attention_factor == 0.5);
  // transformers reads `beta_fast or 32`: 0 is the default.
  CHECK(yarn({{"beta_fast", 0}, {"beta_slow", 0}}).beta_fast == 32.0);
  CHECK(yarn({{"beta_fast", 16}, {"beta_slow", 2}, {"truncate", false}}).beta_slow == 2.0);
  CHECK_FALSE(yarn({{"truncate", false}}).truncate);
  CHECK(yarn({{"factor", 1.0}}).attention_factor == 1.0);
}

TEST_CASE("Hugging Face configs we cannot honour are refused naming the field", "[config][hf][bad-input]") {
  using Catch::Contains;
  // Non-Llama models and fields that would change the model.
  CHECK_THROWS_WITH(hf5_with({{"model_type", "mistral"}}), Contains("'model_type' = 'mistral' is not supported"));
  CHECK_THROWS_WITH(hf5_with({{"model_type", "qwen2"}}), Contains("expected 'llama'"));
  CHECK_THROWS_WITH(hf5_with({{"hidden_act", "gelu"}}), Contains("'hidden_act' = 'gelu' is not supported"));
  CHECK_THROWS_WITH(hf5_with({{"attention_dropout", 0.1}}), Contains("'attention_dropout' = 0.1 is not supported"));
  CHECK_THROWS_WITH(hf5_with({{"partial_rotary_factor", 0.5}}), Contains("'partial_rotary_factor' = 0.5"));
  CHECK_THROWS_WITH(hf5_with({{"rope_parameters", {{"rope_type", "default"}, {"partial_rotary_factor", 0.25}}}}),
                    Contains("'rope_parameters.partial_rotary_factor' = 0.25"));
  CHECK_THROWS_WITH(hf5_with({{"quantization_config", {{"quant_method", "gptq"}}}}), Contains("'quantization_config'"));
  CHECK_THROWS_WITH(hf5_with({{"pretraining_tp", 0}}), Contains("'pretraining_tp' = 0"));
  CHECK_THROWS_WITH(hf5_with({{"torch_dtype", "float32"}, {"dtype", "bfloat16"}}),
                    Contains("'dtype' = 'bfloat16' conflicts with 'torch_dtype' = 'float32'"));

  // Rope types: unsupported ones named, dynamic with the reason.
  auto rope = [](json r) { return hf5_with({{"rope_parameters", r}}); };
  CHECK_THROWS_WITH(rope({{"rope_type", "longrope"}, {"short_factor", {1.0}}, {"long_factor", {1.0}}}),
                    Contains("'rope_parameters' has rope_type 'longrope', which is not supported"));
  CHECK_THROWS_WITH(rope({{"rope_type", "dynamic"}, {"factor", 2.0}}), Contains("rope_type 'dynamic'"));
  CHECK_THROWS_WITH(hf5_with({{"rope_scaling", {{"type", "su"}}}, {"rope_parameters", nullptr}}),
                    Contains("'rope_scaling' has rope_type 'su', which is not supported"));
  CHECK_THROWS_WITH(rope({{"rope_type", "linear"}, {"type", "llama3"}, {"factor", 2.0}}),
                    Contains("rope_type 'linear' and type 'llama3', which disagree"));
  CHECK_THROWS_WITH(rope({{"rope_type", 3}}), Contains("'rope_parameters.rope_type' has value 3, expected a string"));
  CHECK_THROWS_WITH(hf5_with({{"rope_parameters", "default"}}), Contains("'rope_parameters' has value \"default\""));

  // rope_parameters with missing or foreign fields, bad values.
  CHECK_THROWS_WITH(rope({{"rope_type", "linear"}}), Contains("has rope_type 'linear' but no 'factor'"));
  json l3 = llama3();
  l3.erase("low_freq_factor");
  CHECK_THROWS_WITH(rope(l3), Contains("has rope_type 'llama3' but no 'low_freq_factor'"));
  CHECK_THROWS_WITH(rope({{"rope_type", "yarn"}}), Contains("has rope_type 'yarn' but no 'factor'"));
  CHECK_THROWS_WITH(rope({{"rope_type", "linear"}, {"factor", 2.0}, {"finetuned", true}}),
                    Contains("'rope_parameters.finetuned' is not a parameter of rope_type 'linear' (it takes factor)"));
  CHECK_THROWS_WITH(rope({{"rope_type", "default"}, {"factor", 2.0}}),
                    Contains("'rope_parameters.factor' is not a parameter of rope_type 'default'"));
  CHECK_THROWS_WITH(rope({{"rope_type", "linear"}, {"factor", "2"}}),
                    Contains("'rope_parameters.factor' has value \"2\", expected a number"));
  CHECK_THROWS_WITH(rope({{"rope_type", "linear"}, {"factor", 0.0}}), Contains("'rope_scaling.factor' = 0.0"));
  CHECK_THROWS_WITH(rope(llama3({{"high_freq_factor", 1.0}})),
                    Contains("'rope_scaling.high_freq_factor' = 1.0, expected more than low_freq_factor = 1.0"));
  CHECK_THROWS_WITH(rope({{"rope_type", "yarn"}, {"factor", 2.0}, {"beta_fast", 1.0}, {"beta_slow", 4.0}}),
                    Contains("'rope_scaling.beta_fast' = 1.0, expected at least beta_slow = 4.0"));
  CHECK_THROWS_WITH(rope({{"rope_type", "yarn"}, {"factor", 2.0}, {"truncate", nullptr}}),
                    Contains("'rope_parameters.truncate' has value null, expected true or false"));

  // Conflicts between the places a RoPE can be stated.
  CHECK_THROWS_WITH(hf5_with({{"rope_theta", 10000.0},
                              {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 500000.0}}}}),
                    Contains("'rope_parameters.rope_theta' = 500000.0 conflicts with 'rope_theta' = 10000.0"));
  CHECK_THROWS_WITH(hf5_with({{"rope_scaling", {{"type", "linear"}, {"factor", 2.0}}}}),
                    Contains("'rope_scaling' (rope_type 'linear', factor 2.0) and 'rope_parameters' (rope_type "
                             "'default') describe different RoPE scalings"));
  // transformers 5 gives a rope dict without rope_theta the top-level one or 10000.
  CHECK_THROWS_WITH(hf5_with({{"rope_scaling", {{"type", "default"}}},
                              {"rope_parameters", {{"rope_theta", 500000.0}}}}),
                    Contains("'rope_parameters.rope_theta' = 500000.0 conflicts with 'rope_scaling' without "
                             "rope_theta (so the default 10000)"));
  // rope_parameters nested per attention kind: transformers' Llama would ignore the nested dicts.
  CHECK_THROWS_WITH(hf5_with({{"rope_parameters", {{"full_attention", llama3()}, {"sliding_attention", llama3()}}}}),
                    Contains("'rope_parameters' is nested by attention kind (key 'full_attention'), which is not "
                             "supported"));
  CHECK_THROWS_WITH(hf5_with({{"rope_parameters", {{"rope_type", "default"}, {"sliding_attention", llama3()}}}}),
                    Contains("(key 'sliding_attention')"));

  // layer_types lists: length, entries, sliding_window.
  CHECK_THROWS_WITH(hf5_with({{"layer_types", std::vector<std::string>(3, "full_attention")}}),
                    Contains("'layer_types' is a list of 3 attention kinds, expected num_hidden_layers = 4 entries"));
  const json linear = {"full_attention", "full_attention", "linear_attention", "full_attention"};
  CHECK_THROWS_WITH(hf5_with({{"layer_types", linear}}),
                    Contains("'layer_types[2]' = 'linear_attention' is not supported"));
  CHECK_THROWS_WITH(hf5_with({{"layer_types", {"full_attention", 1, "full_attention", "full_attention"}}}),
                    Contains("'layer_types[1]' has value 1, expected a string"));
  const json one_sliding = {"full_attention", "sliding_attention", "full_attention", "full_attention"};
  CHECK_THROWS_WITH(hf5_with({{"layer_types", one_sliding}}),
                    Contains("'layer_types[1]' is \"sliding_attention\" but 'sliding_window' is missing"));
  CHECK_THROWS_WITH(hf5_with({{"layer_types", {{"kind", "full_attention"}}}}),
                    Contains("'layer_types' must be a string"));
}

TEST_CASE("yarn and llama3 scaling survive to_json and from_json in both formats", "[config][hf]") {
  const json yarn = {{"rope_type", "yarn"},   {"factor", 4.0},       {"original_max_position_embeddings", 32},
                     {"mscale", 2.0},         {"mscale_all_dim", 1.0}, {"beta_fast", 16.0},
                     {"beta_slow", 2.0},      {"truncate", false}};
  const json llama3 = {{"rope_type", "llama3"}, {"factor", 8.0},  {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 16}};
  for (const json& rope : {yarn, llama3}) {
    for (const char* layers : {"0_1_2_3", "0_2_2_3"}) {  // a plain Llama and the LCKV format
      INFO(rope.dump() << " " << layers);
      LCKVConfig c = hf5_with({{"rope_parameters", rope}});
      c.layer_types = parse_layer_types(layers, c.num_hidden_layers);
      const LCKVConfig d = LCKVConfig::from_json(c.to_json());
      REQUIRE(d.rope_scaling);
      CHECK(*d.rope_scaling == *c.rope_scaling);
      CHECK(d.rope_scaling->original_max_position_embeddings != static_cast<double>(c.max_position_embeddings));
    }
  }
}

TEST_CASE("our own config.json still reads as to_json writes it", "[config][hf]") {
  LCKVConfig c = with({{"layer_types", "0_2_2_3"}, {"rope_theta", 500000.0},
                       {"rope_scaling", {{"rope_type", "linear"}, {"factor", 2.0}}}});
  json written = c.to_json();
  CHECK(written["model_type"] == "lckv-llama");
  LCKVConfig d = LCKVConfig::from_json(written);
  CHECK(format_layer_types(d.layer_types) == "0_2_2_3");
  CHECK(d.rope_theta == 500000.0);
  REQUIRE(d.rope_scaling);
  CHECK(*d.rope_scaling == *c.rope_scaling);
}
