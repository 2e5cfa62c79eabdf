// Bad arguments are refused by name (issue 12 §2, §5): sampling and generation arguments through
// their one validation function, max_new_tokens near 2^63, model sizes checked against an
// independent parameter count, lckv-generate's flags; and OpenMP's passive default in our programs (§4).
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <string>

#include "lckv/generate/generate.h"
#include "test_files.h"

using namespace lckv;
using Catch::Contains;
using lckv::testing::Run;
using lckv::testing::run;

namespace {

LCKVConfig small_config(const std::string& layer_types, int layers, nlohmann::json extra = nlohmann::json::object()) {
  nlohmann::json j = {{"vocab_size", 41},        {"hidden_size", 32},          {"intermediate_size", 24},
                      {"num_hidden_layers", layers}, {"num_attention_heads", 4}, {"num_key_value_heads", 2},
                      {"layer_types", layer_types}, {"forward_passes", 2},      {"backward_passes", 1}};
  j.merge_patch(extra);
  return LCKVConfig::from_json(j);
}

const std::string kGenerate = std::string(LCKV_BINARY_DIR) + "/lckv-generate";

// The value libgomp shows for `name` in its last OMP_DISPLAY_ENV block (a re-executed program shows two).
std::string last_display(const std::string& output, const std::string& name) {
  const std::string key = "  " + name + " = '";
  const size_t at = output.rfind(key);
  if (at == std::string::npos) return "<not shown>";
  const size_t begin = at + key.size();
  return output.substr(begin, output.find('\'', begin) - begin);
}

}  // namespace

TEST_CASE("sampling arguments: one validation, each bad value refused by name", "[generate][errors]") {
  struct Case {
    const char* what;
    SamplingConfig s;
    const char* message;
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const std::vector<Case> cases = {
      {"negative temperature", {true, -0.5, 0, 1.0, 1.0}, "temperature = -0.5 is invalid"},
      {"negative temperature, greedy", {false, -1, 0, 1.0, 1.0}, "temperature = -1 is invalid"},
      {"NaN temperature", {true, nan, 0, 1.0, 1.0}, "temperature = nan is invalid"},
      {"temperature 0 with do_sample", {true, 0, 0, 1.0, 1.0}, "temperature = 0 is invalid: expected > 0 with do_sample"},
      {"negative top_k", {true, 1, -1, 1.0, 1.0}, "top_k = -1 is invalid"},
      {"top_p 0", {true, 1, 0, 0.0, 1.0}, "top_p = 0 is invalid: expected a value in (0, 1]"},
      {"top_p above 1", {true, 1, 0, 1.5, 1.0}, "top_p = 1.5 is invalid"},
      {"NaN top_p", {true, 1, 0, nan, 1.0}, "top_p = nan is invalid"},
      {"repetition_penalty 0", {false, 1, 0, 1.0, 0.0}, "repetition_penalty = 0 is invalid"},
      {"negative repetition_penalty", {false, 1, 0, 1.0, -2.0}, "repetition_penalty = -2 is invalid"},
      {"NaN repetition_penalty", {false, 1, 0, 1.0, nan}, "repetition_penalty = nan is invalid"},
  };
  torch::manual_seed(0);
  LCKVForCausalLM m(small_config("0_2_2_3", 4));
  for (const Case& c : cases) {
    INFO(c.what);
    CHECK_THROWS_WITH(c.s.validate(), Contains(c.message));
    GenerationConfig g;
    g.max_new_tokens = 2;
    g.sampling = c.s;
    CHECK_THROWS_AS(generate(m, {{1, 2}}, g), std::invalid_argument);  // generate() validates
    CHECK_THROWS_WITH(generate(m, {{1, 2}}, g), Contains(c.message));
  }
  // Greedy ignores a temperature of 0: same tokens as with the default temperature.
  GenerationConfig g;
  g.max_new_tokens = 5;
  const auto greedy = generate(m, {{1, 2, 3}}, g).tokens;
  g.sampling.temperature = 0;
  CHECK(generate(m, {{1, 2, 3}}, g).tokens == greedy);

  g = {};
  g.max_new_tokens = -3;
  CHECK_THROWS_WITH(generate(m, {{1}}, g), Contains("max_new_tokens must be >= 1, got -3"));
}

TEST_CASE("max_new_tokens near 2^63 is refused, not overflowed", "[generate][errors]") {
  torch::manual_seed(0);
  const LCKVConfig c = small_config("0_2_2_3", 4);  // KV layers 0, 2, 3; 2 KV heads of dim 8
  LCKVForCausalLM m(c);
  GenerationConfig g;
  g.max_new_tokens = std::numeric_limits<int64_t>::max();
  CHECK_THROWS_WITH(generate(m, {{1, 2, 3}}, g),
                    Contains("max_new_tokens (9223372036854775807) plus the longest prompt (3 tokens) overflows int64"));
  g.max_new_tokens = std::numeric_limits<int64_t>::max() - 3;  // prompt + new tokens fits int64; the cache does not
  CHECK_THROWS_WITH(generate(m, {{1, 2, 3}}, g), Contains("would hold more than 2^63 elements"));
  g.max_new_tokens = int64_t{1} << 36;
  const int64_t slots = (int64_t{1} << 36) + 3, elements = 2 * 3 * 2 * slots * 2 * 8;
  CHECK_THROWS_WITH(generate(m, {{1, 2, 3}, {4}}, g),
                    Contains("a KV cache of " + std::to_string(slots) + " slots for 2 sequences would hold " +
                             std::to_string(elements) + " elements (" + std::to_string(4 * elements) +
                             " bytes in Float)") &&
                        Contains("limit of 2^40"));
  g.cache_capacity = 16;  // a cache that cannot hold them all, without StreamingLLM
  CHECK_THROWS_WITH(generate(m, {{1, 2, 3}}, g), Contains("the cache of 16 slots cannot hold"));
  // With StreamingLLM the same request runs in a bounded cache (stopped after 3 tokens by the callback).
  g.streaming = StreamingOptions{1, 1};
  const auto r = generate(m, {{1, 2, 3}}, g, [](const torch::Tensor&, const std::vector<bool>&) { return false; });
  CHECK(r.tokens[0].size() == 1);
}

TEST_CASE("parameter_count equals the model's parameters, oversized models are refused before allocating",
          "[generate][config]") {
  const std::vector<std::pair<std::string, nlohmann::json>> configs = {
      {"0_1_2_3", nlohmann::json::object()},
      {"0_2_2_3", {{"tie_word_embeddings", true}}},
      {"0_3s_3_3", {{"attention_bias", true}, {"mlp_bias", true}}},
      {"3_3_3_3", {{"head_dim", 6}, {"num_key_value_heads", 1}}},
  };
  for (const auto& [layer_types, extra] : configs) {
    INFO(layer_types << " " << extra.dump());
    const LCKVConfig c = small_config(layer_types, 4, extra);
    LCKVForCausalLM m(c);
    int64_t numel = 0;
    for (const auto& p : m->parameters()) numel += p.numel();
    CHECK(c.parameter_count() == numel);
  }
  LCKVConfig big = small_config("0_1_2_3", 4);
  big.vocab_size = int64_t{1} << 40;
  CHECK_THROWS_WITH(LCKVForCausalLM(big), Contains("parameters") && Contains("bytes in float32") &&
                                             Contains("limit of 2^40"));
  big = small_config("0_1_2_3", 4);
  big.forward_passes = 1'000'000'000;
  CHECK_THROWS_WITH(LCKVForCausalLM(big), Contains("'forward_passes' = 1000000000"));
}

TEST_CASE("lckv-generate refuses bad sampling flags by name before loading a model", "[generate][errors][cli]") {
  const testing::TempDir dir;  // not a checkpoint: the flags are checked first
  // OMP_WAIT_POLICY set: no re-exec, which would load torch twice per run.
  const std::string base = "OMP_WAIT_POLICY=PASSIVE " + kGenerate + " --model " + dir.path.string() + " hello";
  struct Case {
    const char* flags;
    const char* message;
  };
  for (const Case& c : std::vector<Case>{{"--temperature=-1", "temperature = -1 is invalid"},
                                         {"--temperature=nan", "temperature = nan is invalid"},
                                         {"--temperature 1 --top-p 1.5", "top_p = 1.5 is invalid"},
                                         {"--temperature 1 --top-p 0", "top_p = 0 is invalid"},
                                         {"--top-k=-2", "top_k = -2 is invalid"},
                                         {"--repetition-penalty 0", "repetition_penalty = 0 is invalid"},
                                         {"--max-new-tokens=-5", "max_new_tokens must be >= 1, got -5"},
                                         {"--threads 0", "--threads 0: expected >= 1"}}) {
    INFO(c.flags);
    const Run r = run(base + " " + c.flags);
    CHECK(r.status == 1);
    CHECK_THAT(r.output, Contains("lckv-generate: ") && Contains(c.message));
  }
  // CLI11 itself refuses what does not fit the flag's type (it would wrap -1 into a uint64 seed).
  for (const char* flags : {"--seed=-1", "--max-new-tokens=8.5", "--threads=4294967298"}) {
    INFO(flags);
    const Run r = run(base + " " + flags);
    CHECK(r.status != 0);
    CHECK_THAT(r.output, Contains(std::string(flags).substr(0, std::string(flags).find('='))));
  }
  // --temperature 0 is greedy: the flags pass and the missing checkpoint is what fails.
  const Run greedy = run(base + " --temperature 0");
  CHECK(greedy.status == 1);
  CHECK_THAT(greedy.output, Contains(dir.path.string()) && !Contains("temperature"));
}

TEST_CASE("our programs run OpenMP with a passive wait policy unless the user sets one", "[openmp][cli]") {
  // libgomp shows its settings at start-up with OMP_DISPLAY_ENV; GOMP_SPINCOUNT tells the three
  // policies apart (unset: 300000 spins, PASSIVE: 0, ACTIVE: 3e10).
  const std::string probe = " OMP_DISPLAY_ENV=VERBOSE " + kGenerate + " --help";
  const Run unset = run("env -u OMP_WAIT_POLICY" + probe);
  REQUIRE(unset.status == 0);
  CHECK(last_display(unset.output, "OMP_WAIT_POLICY") == "PASSIVE");
  CHECK(last_display(unset.output, "GOMP_SPINCOUNT") == "0");
  const Run active = run("env OMP_WAIT_POLICY=ACTIVE" + probe);
  REQUIRE(active.status == 0);
  CHECK(last_display(active.output, "OMP_WAIT_POLICY") == "ACTIVE");
  CHECK(last_display(active.output, "GOMP_SPINCOUNT") == "30000000000");
  // Started once with the user's value: one display block, no re-exec.
  CHECK(active.output.find("OPENMP DISPLAY ENVIRONMENT BEGIN") == active.output.rfind("OPENMP DISPLAY ENVIRONMENT BEGIN"));
}
