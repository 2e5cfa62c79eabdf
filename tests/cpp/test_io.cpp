// safetensors I/O, checkpoint directories (invariant 6), and the conformance vectors: expected
// fp64 logits of an independent implementation of DESIGN.md for five tiny checkpoints.
#include <catch2/catch.hpp>

#include "test_files.h"
#include <torch/torch.h>

#include <filesystem>
#include <fstream>

#include "lckv/io/checkpoint.h"
#include "lckv/io/safetensors.h"

using namespace lckv;
namespace fs = std::filesystem;
using lckv::testing::TempDir;
using lckv::testing::read_bytes;
using lckv::testing::write_bytes;

namespace {

// Greedy continuation by re-running the exact forward on the growing sequence.
std::vector<int64_t> greedy(LCKVForCausalLM& m, std::vector<int64_t> ids, int n) {
  std::vector<int64_t> out;
  for (int i = 0; i < n; ++i) {
    torch::Tensor t = torch::tensor(ids).unsqueeze(0);
    torch::Tensor logits = m->forward(t, {}, IterationOptions{int(ids.size()), 1}).logits;
    const int64_t next = logits[0][-1].argmax().item<int64_t>();
    out.push_back(next);
    ids.push_back(next);
  }
  return out;
}

}  // namespace

TEST_CASE("safetensors round-trips every float dtype", "[io]") {
  const TempDir tmp;
  fs::path dir = tmp.path;
  std::vector<std::pair<std::string, torch::Tensor>> ts = {
      {"a", torch::randn({3, 4}, torch::kDouble)}, {"b", torch::randn({5}, torch::kFloat)},
      {"c", torch::randn({2, 2}).to(torch::kBFloat16)}, {"d", torch::randn({7}).to(torch::kHalf)},
      {"e", torch::arange(6, torch::kLong).view({2, 3})}, {"scalar", torch::tensor(3.5)}};
  io::save_safetensors((dir / "x.safetensors").string(), ts, {{"format", "pt"}});
  auto back = io::load_safetensors((dir / "x.safetensors").string());
  REQUIRE(back.size() == ts.size());
  for (auto& [name, t] : ts) {
    INFO(name);
    CHECK(back.at(name).scalar_type() == t.scalar_type());
    CHECK(torch::equal(back.at(name), t));
  }
}

TEST_CASE("corrupt safetensors files are rejected naming the file and the problem", "[io][bad-input]") {
  const TempDir tmp;
  fs::path dir = tmp.path;
  const fs::path good = dir / "good.safetensors";
  io::save_safetensors(good.string(), {{"w", torch::randn({16, 16})}});
  const std::string bytes = read_bytes(good);

  const fs::path truncated = dir / "truncated.safetensors";
  write_bytes(truncated, bytes.substr(0, bytes.size() - 100));
  CHECK_THROWS_WITH(io::load_safetensors(truncated.string()),
                    Catch::Contains("truncated.safetensors") && Catch::Contains("'w'") && Catch::Contains("outside the data section"));

  const fs::path tiny = dir / "tiny.safetensors";
  write_bytes(tiny, "abc");
  CHECK_THROWS_WITH(io::load_safetensors(tiny.string()), Catch::Contains("too short"));

  const fs::path garbage = dir / "garbage.safetensors";
  write_bytes(garbage, std::string("\x10\x00\x00\x00\x00\x00\x00\x00", 8) + "not json at all!" + std::string(32, 'x'));
  CHECK_THROWS_WITH(io::load_safetensors(garbage.string()), Catch::Contains("not valid JSON"));

  const fs::path huge_header = dir / "huge.safetensors";
  write_bytes(huge_header, std::string("\xff\xff\xff\x00\x00\x00\x00\x00", 8) + "{}");
  CHECK_THROWS_WITH(io::load_safetensors(huge_header.string()), Catch::Contains("exceeds the file size"));

  CHECK_THROWS_WITH(io::load_safetensors((dir / "missing.safetensors").string()), Catch::Contains("cannot open"));
}

TEST_CASE("a saved and loaded checkpoint gives bit-identical logits (invariant 6)", "[io]") {
  const TempDir tmp;
  fs::path dir = tmp.path;
  for (auto dtype : {torch::kFloat, torch::kDouble}) {
    nlohmann::json j = {{"vocab_size", 50}, {"hidden_size", 32}, {"intermediate_size", 48}, {"num_hidden_layers", 4},
                        {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"layer_types", "0_3_3_3"}};
    LCKVForCausalLM m(LCKVConfig::from_json(j));
    init_weights(m);
    m->to(dtype);
    io::save_pretrained(m, dir.string(), dtype);
    auto loaded = io::load_pretrained(dir.string(), dtype);
    torch::Tensor ids = torch::randint(0, 50, {2, 9});
    torch::NoGradGuard g;
    CHECK(torch::equal(m->forward(ids).logits, loaded->forward(ids).logits));
    CHECK(loaded->config.to_json()["layer_types"] == "0_3_3_3");
  }
}

TEST_CASE("loading a checkpoint that does not match its config fails naming the tensor", "[io][bad-input]") {
  const TempDir tmp;
  fs::path dir = tmp.path;
  nlohmann::json j = {{"vocab_size", 50}, {"hidden_size", 32}, {"intermediate_size", 48}, {"num_hidden_layers", 2},
                      {"num_attention_heads", 4}, {"num_key_value_heads", 2}};
  LCKVForCausalLM m(LCKVConfig::from_json(j));
  io::save_pretrained(m, dir.string());
  // a config whose layer 1 has no KV: the checkpoint's k_proj of layer 1 is not a parameter
  j["layer_types"] = "0_0";
  LCKVConfig::from_json(j).save((dir / "config.json").string());
  CHECK_THROWS_WITH(io::load_pretrained(dir.string()), Catch::Contains("model.layers.1.self_attn.k_proj.weight") &&
                                                           Catch::Contains("not a parameter"));
  // a config with a different hidden size: shapes differ
  j["layer_types"] = "0_1";
  j["intermediate_size"] = 64;
  LCKVConfig::from_json(j).save((dir / "config.json").string());
  CHECK_THROWS_WITH(io::load_pretrained(dir.string()), Catch::Contains("mlp.gate_proj.weight' has shape [48, 32], expected [64, 32]"));
  CHECK_THROWS_WITH(io::load_pretrained((dir / "nothing").string()), Catch::Contains("not a checkpoint directory"));
}

TEST_CASE("conformance vectors: exact and m=2,b=1 logits and greedy continuations", "[io][conformance]") {
  const char* cases[] = {"lckv_w2", "yoco_window", "cross_targets", "llama_tied", "force_nodiag"};
  for (const char* name : cases) {
    INFO("conformance case " << name);
    const fs::path dir = fs::path("tests/data/conformance") / name;
    auto m = io::load_pretrained(dir.string(), torch::kDouble);
    std::ifstream in(dir / "case.json");
    const nlohmann::json c = nlohmann::json::parse(in);
    const auto ids = c["input_ids"].get<std::vector<int64_t>>();
    auto expected = io::load_safetensors((dir / "expected.safetensors").string());
    torch::Tensor input = torch::tensor(ids).unsqueeze(0);
    torch::NoGradGuard g;
    const int T = static_cast<int>(ids.size());
    torch::Tensor exact = m->forward(input, {}, IterationOptions{T, 1}).logits[0];
    CHECK((exact - expected.at("logits_exact")).abs().max().item<double>() <= 1e-9);
    CHECK((exact - m->forward_sequential(input).logits[0]).abs().max().item<double>() <= 1e-9);
    torch::Tensor m2b1 = m->forward(input, {}, IterationOptions{2, 1}).logits[0];
    CHECK((m2b1 - expected.at("logits_m2_b1")).abs().max().item<double>() <= 1e-9);
    CHECK(greedy(m, ids, 6) == c["greedy_next_6"].get<std::vector<int64_t>>());
  }
}
