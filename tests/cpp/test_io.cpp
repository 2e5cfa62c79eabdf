// safetensors I/O, checkpoint directories (invariant 6), and the conformance vectors: expected
// fp64 logits of an independent implementation of docs/design.md for five tiny checkpoints.
#include <catch2/catch.hpp>
#include <dlfcn.h>

#include "test_files.h"
#include <torch/torch.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>

#include "lckv/data/tokenizer.h"
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

  // a number JSON cannot hold is a parse error too (nlohmann reports it as out_of_range)
  const fs::path overflow = dir / "overflow.safetensors";
  const std::string h = R"({"w":{"dtype":"F32","shape":[1e999],"data_offsets":[0,4]}})";
  write_bytes(overflow, std::string(1, static_cast<char>(h.size())) + std::string(7, '\0') + h + std::string(4, '\0'));
  CHECK_THROWS_WITH(io::load_safetensors(overflow.string()), Catch::Contains("overflow.safetensors") &&
                                                               Catch::Contains("not valid JSON") && Catch::Contains("1e999"));
  // nesting deeper than any header needs is refused before anything recurses over it
  const fs::path deep = dir / "deep.safetensors";
  const std::string nested = "{\"w\":" + std::string(100000, '[') + std::string(100000, ']') + "}";
  std::string len(8, '\0');
  for (int i = 0; i < 8; ++i) len[i] = static_cast<char>((nested.size() >> (8 * i)) & 0xff);
  write_bytes(deep, len + nested);
  CHECK_THROWS_WITH(io::load_safetensors(deep.string()), Catch::Contains("deep.safetensors") && Catch::Contains("nests deeper"));
  CHECK_THROWS_WITH(io::load_safetensors(dir.string()), Catch::Contains("not a regular file"));
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

// ---------------------------------------------------------------------------- hostile weights (issue 12 §3)

namespace {

// A safetensors file from a header and a data section, written byte for byte (no validation).
std::string safetensors_bytes(const nlohmann::json& header, const std::string& data) {
  const std::string h = header.dump();
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((static_cast<uint64_t>(h.size()) >> (8 * i)) & 0xff);
  return out + h + data;
}

// The header and data section of a safetensors file, to edit and write back.
std::pair<nlohmann::json, std::string> split_safetensors(const fs::path& path) {
  const std::string bytes = read_bytes(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  return {nlohmann::json::parse(bytes.substr(8, n)), bytes.substr(8 + n)};
}

std::string float_bytes(std::vector<float> v) { return std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4); }

nlohmann::json tiny_config_json() {
  return {{"vocab_size", 40}, {"hidden_size", 16}, {"intermediate_size", 24}, {"num_hidden_layers", 2},
          {"num_attention_heads", 2}, {"num_key_value_heads", 1}};
}

// A saved tiny checkpoint in `dir`; returns the model.
LCKVForCausalLM saved_tiny_model(const fs::path& dir, nlohmann::json config = tiny_config_json()) {
  LCKVForCausalLM m(LCKVConfig::from_json(config));
  init_weights(m);
  io::save_pretrained(m, dir.string());
  return m;
}

// Rewrites dir's model.safetensors as shards: `assignment(name)` is the shard file of each tensor.
// Returns the index JSON (written as model.safetensors.index.json).
nlohmann::json shard_checkpoint(const fs::path& dir, const std::function<std::string(const std::string&)>& assignment) {
  auto tensors = io::load_safetensors((dir / "model.safetensors").string());
  std::map<std::string, std::vector<std::pair<std::string, torch::Tensor>>> shards;
  nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", nlohmann::json::object()}};
  for (auto& [name, t] : tensors) {
    shards[assignment(name)].emplace_back(name, t);
    index["weight_map"][name] = assignment(name);
  }
  for (auto& [file, ts] : shards) io::save_safetensors((dir / file).string(), ts);
  fs::remove(dir / "model.safetensors");
  std::ofstream(dir / "model.safetensors.index.json") << index.dump(2);
  return index;
}

std::string two_shards(const std::string& name) {
  return name.find("layers.1.") != std::string::npos || name == "lm_head.weight" ? "model-00002-of-00002.safetensors"
                                                                                : "model-00001-of-00002.safetensors";
}

}  // namespace

TEST_CASE("safetensors data_offsets must tile the data section in order of offsets", "[io][bad-input]") {
  const TempDir tmp;
  const fs::path file = tmp.path / "w.safetensors";
  const std::string data = float_bytes({1, 2, 3, 4, 5, 6});
  auto entry = [](std::vector<int64_t> shape, uint64_t begin, uint64_t end) {
    return nlohmann::json{{"dtype", "F32"}, {"shape", shape}, {"data_offsets", {begin, end}}};
  };
  auto load = [&](const nlohmann::json& header, const std::string& bytes) {
    write_bytes(file, safetensors_bytes(header, bytes));
    return io::load_safetensors(file.string());
  };

  // the data section's order need not follow the header's: 'a' is stored after 'b'
  auto ok = load({{"a", entry({2}, 16, 24)}, {"b", entry({4}, 0, 16)}}, data);
  CHECK(torch::equal(ok.at("a"), torch::tensor({5.f, 6.f})));
  CHECK(torch::equal(ok.at("b"), torch::tensor({1.f, 2.f, 3.f, 4.f})));

  CHECK_THROWS_WITH(load({{"a", entry({4}, 0, 16)}, {"b", entry({4}, 8, 24)}}, data),
                    Catch::Contains("w.safetensors") && Catch::Contains("'b'") && Catch::Contains("overlap") &&
                        Catch::Contains("'a'"));
  CHECK_THROWS_WITH(load({{"a", entry({2}, 0, 8)}, {"b", entry({2}, 16, 24)}}, data),
                    Catch::Contains("w.safetensors") && Catch::Contains("'b'") && Catch::Contains("[8, 16)") &&
                        Catch::Contains("unused"));
  CHECK_THROWS_WITH(load({{"a", entry({2}, 8, 16)}, {"b", entry({2}, 16, 24)}}, data),
                    Catch::Contains("'a'") && Catch::Contains("[0, 8)") && Catch::Contains("unused"));
  CHECK_THROWS_WITH(load({{"a", entry({4}, 0, 16)}}, data),
                    Catch::Contains("w.safetensors") && Catch::Contains("trailing bytes") && Catch::Contains("cover only 16"));
  CHECK_THROWS_WITH(load({{"a", entry({4}, 16, 0)}, {"b", entry({2}, 16, 24)}}, data),
                    Catch::Contains("'a'") && Catch::Contains("[16,0]") && Catch::Contains("end before they begin"));
  // the same range for two tensors (a zero-size one may share an offset: it covers no byte)
  CHECK_THROWS_WITH(load({{"a", entry({6}, 0, 24)}, {"b", entry({6}, 0, 24)}}, data), Catch::Contains("overlap"));
  CHECK(load({{"a", entry({6}, 0, 24)}, {"empty", entry({0, 3}, 24, 24)}}, data).at("empty").numel() == 0);
}

TEST_CASE("safetensors shapes whose element or byte count overflows are refused", "[io][bad-input]") {
  const TempDir tmp;
  const fs::path file = tmp.path / "big.safetensors";
  auto load_shape = [&](const nlohmann::json& shape) {
    write_bytes(file, safetensors_bytes({{"w", {{"dtype", "F32"}, {"shape", shape}, {"data_offsets", {0, 16}}}}},
                                        float_bytes({1, 2, 3, 4})));
    return io::load_safetensors(file.string());
  };
  // 2^62 * 4 elements: 2^64 wraps to 0 in a plain product
  CHECK_THROWS_WITH(load_shape({uint64_t(1) << 62, 4}),
                    Catch::Contains("big.safetensors") && Catch::Contains("'w'") && Catch::Contains("elements"));
  // 2^62 elements fit, 2^64 bytes do not: wraps to 0 in a plain product
  CHECK_THROWS_WITH(load_shape({uint64_t(1) << 62}), Catch::Contains("'w'") && Catch::Contains("bytes than fit"));
  // 2^62 + 4 elements of 4 bytes wrap to 16 bytes, this entry's span: must not pass for a 4-element tensor
  CHECK_THROWS_WITH(load_shape({(uint64_t(1) << 62) + 4}), Catch::Contains("'w'") && Catch::Contains("bytes than fit"));
  CHECK_THROWS_WITH(load_shape({std::numeric_limits<uint64_t>::max()}), Catch::Contains("'w'") && Catch::Contains("dimension"));
  CHECK_THROWS_WITH(load_shape({-4}), Catch::Contains("'w'") && Catch::Contains("dimension -4"));
  CHECK_THROWS_WITH(load_shape({2.5}), Catch::Contains("'w'") && Catch::Contains("dimension 2.5"));
  CHECK_THROWS_WITH(load_shape("4"), Catch::Contains("'w'") && Catch::Contains("'shape'"));
  CHECK(load_shape({2, 2}).at("w").sizes() == torch::IntArrayRef({2, 2}));
}

TEST_CASE("checkpoint weights must be finite float tensors", "[io][bad-input]") {
  const TempDir tmp;
  saved_tiny_model(tmp.path);
  const fs::path file = tmp.path / "model.safetensors";
  auto [header, data] = split_safetensors(file);
  const std::string victim = "model.layers.1.mlp.up_proj.weight";

  SECTION("F32 bytes labelled I32") {
    header[victim]["dtype"] = "I32";  // same element size, so the file itself is well-formed
    write_bytes(file, safetensors_bytes(header, data));
    CHECK(io::load_safetensors(file.string()).at(victim).scalar_type() == torch::kInt);
    CHECK_THROWS_WITH(io::load_pretrained(tmp.path.string()), Catch::Contains("model.safetensors") &&
                                                                  Catch::Contains("'" + victim + "'") &&
                                                                  Catch::Contains("dtype I32") &&
                                                                  Catch::Contains("expected a float dtype"));
  }
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    DYNAMIC_SECTION("a weight holding " << bad) {
      const uint64_t begin = header[victim]["data_offsets"][0].get<uint64_t>();
      std::string edited = data;
      std::memcpy(edited.data() + begin + 5 * 4, &bad, 4);  // flat index 5
      write_bytes(file, safetensors_bytes(header, edited));
      CHECK_THROWS_WITH(io::load_pretrained(tmp.path.string()),
                        Catch::Contains("model.safetensors") && Catch::Contains("'" + victim + "'") &&
                            Catch::Contains("1 non-finite") && Catch::Contains("flat index 5"));
    }
  }
  SECTION("load_state, the trainer's and Python's entry, refuses them too") {
    LCKVForCausalLM m(LCKVConfig::from_json(tiny_config_json()));
    std::map<std::string, torch::Tensor> state;
    for (auto& [name, p] : io::hf_state_dict(m)) state[name] = p.detach().clone();
    state[victim].view(-1)[3] = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH(io::load_state(m, state, "state.safetensors"),
                      Catch::Contains("state.safetensors") && Catch::Contains(victim) && Catch::Contains("flat index 3"));
    state[victim] = torch::ones_like(state[victim], torch::kLong);
    CHECK_THROWS_WITH(io::load_state(m, state, "state.safetensors"), Catch::Contains(victim) && Catch::Contains("dtype I64"));
  }
}

TEST_CASE("a sharded checkpoint's weight_map is honoured exactly", "[io][bad-input]") {
  const TempDir tmp;
  const fs::path dir = tmp.path / "ckpt";
  LCKVForCausalLM m = saved_tiny_model(dir);
  nlohmann::json index = shard_checkpoint(dir, two_shards);
  const fs::path index_path = dir / "model.safetensors.index.json";
  const std::string shard1 = "model-00001-of-00002.safetensors", shard2 = "model-00002-of-00002.safetensors";
  auto write_index = [&](const nlohmann::json& j) { std::ofstream(index_path) << j.dump(2); };
  auto load = [&] { return io::load_pretrained(dir.string()); };

  {
    auto loaded = load();
    torch::Tensor ids = torch::randint(0, 40, {1, 7});
    torch::NoGradGuard g;
    CHECK(torch::equal(m->forward(ids).logits, loaded->forward(ids).logits));
  }
  const std::string moved = "model.layers.1.self_attn.o_proj.weight";  // in shard 2
  REQUIRE(index["weight_map"][moved] == shard2);

  SECTION("a tensor in a shard that the map assigns elsewhere") {
    nlohmann::json j = index;
    j["weight_map"][moved] = shard1;
    write_index(j);
    CHECK_THROWS_WITH(load(), Catch::Contains(shard2) && Catch::Contains("'" + moved + "'") &&
                                  Catch::Contains("assigns it to shard '" + shard1 + "'"));
  }
  SECTION("a tensor the map names that its shard lacks") {
    nlohmann::json j = index;
    j["weight_map"]["model.layers.0.extra.weight"] = shard1;
    write_index(j);
    CHECK_THROWS_WITH(load(), Catch::Contains("model.safetensors.index.json") &&
                                  Catch::Contains("'model.layers.0.extra.weight'") && Catch::Contains("does not hold it"));
  }
  SECTION("a tensor in a shard but not in the map") {
    nlohmann::json j = index;
    j["weight_map"].erase(moved);
    write_index(j);
    CHECK_THROWS_WITH(load(), Catch::Contains(shard2) && Catch::Contains("'" + moved + "'") &&
                                  Catch::Contains("not in the weight_map"));
  }
  SECTION("the same tensor in two shards") {
    auto extra = io::load_safetensors((dir / shard2).string());
    std::vector<std::pair<std::string, torch::Tensor>> ts(extra.begin(), extra.end());
    ts.emplace_back("model.embed_tokens.weight", torch::zeros({40, 16}));  // the map puts it in shard 1
    io::save_safetensors((dir / shard2).string(), ts);
    CHECK_THROWS_WITH(load(), Catch::Contains("'model.embed_tokens.weight'") && Catch::Contains("also in shard") &&
                                  Catch::Contains(shard1) && Catch::Contains(shard2));
  }
  SECTION("an index that is not valid JSON or has no weight_map") {
    std::ofstream(index_path) << R"({"metadata": {"total_size": 1e999}, "weight_map": {}})";
    CHECK_THROWS_WITH(load(), Catch::Contains("model.safetensors.index.json") && Catch::Contains("not valid JSON"));
    std::ofstream(index_path) << R"({"weight_map": ["a.safetensors"]})";
    CHECK_THROWS_WITH(load(), Catch::Contains("model.safetensors.index.json") && Catch::Contains("'weight_map'"));
  }
  SECTION("a weight_map entry that is not a file name") {
    nlohmann::json j = index;
    j["weight_map"][moved] = 7;
    write_index(j);
    CHECK_THROWS_WITH(load(), Catch::Contains("model.safetensors.index.json") && Catch::Contains("'" + moved + "'"));
  }
}

TEST_CASE("shard paths must stay inside the checkpoint directory", "[io][bad-input]") {
  const TempDir tmp;
  const fs::path dir = tmp.path / "ckpt";
  saved_tiny_model(dir);
  nlohmann::json index = shard_checkpoint(dir, two_shards);
  const std::string shard2 = "model-00002-of-00002.safetensors";
  // an outside copy of shard 2, reachable by '..', by an absolute path and through a symlink
  fs::copy_file(dir / shard2, tmp.path / "outside.safetensors");
  fs::create_symlink(tmp.path / "outside.safetensors", dir / "link.safetensors");
  fs::create_directory(dir / "sub");
  fs::rename(dir / shard2, dir / "sub" / shard2);
  auto with_shard2 = [&](const std::string& path) {
    nlohmann::json j = index;
    for (auto& v : j["weight_map"]) {
      if (v == shard2) v = path;
    }
    std::ofstream(dir / "model.safetensors.index.json") << j.dump(2);
    return [&] { return io::load_pretrained(dir.string()); };
  };
  CHECK_THROWS_WITH(with_shard2("../outside.safetensors")(),
                    Catch::Contains("model.safetensors.index.json") && Catch::Contains("'../outside.safetensors'") &&
                        Catch::Contains("'..'"));
  CHECK_THROWS_WITH(with_shard2((tmp.path / "outside.safetensors").string())(),
                    Catch::Contains("absolute path") && Catch::Contains("outside.safetensors"));
  CHECK_THROWS_WITH(with_shard2("/etc/passwd")(), Catch::Contains("'/etc/passwd'") && Catch::Contains("absolute path"));
  CHECK_THROWS_WITH(with_shard2("link.safetensors")(),
                    Catch::Contains("'link.safetensors'") && Catch::Contains("outside the checkpoint directory"));
  CHECK_THROWS_WITH(with_shard2("missing.safetensors")(),
                    Catch::Contains("'missing.safetensors'") && Catch::Contains("cannot be opened"));
  CHECK_THROWS_WITH(with_shard2("sub")(), Catch::Contains("'sub'") && Catch::Contains("not a regular file"));
  // a subdirectory inside is fine
  CHECK_NOTHROW(with_shard2("sub/" + shard2)());
}

TEST_CASE("tie_word_embeddings must match whether the checkpoint has lm_head.weight", "[io][bad-input]") {
  const TempDir tmp;
  nlohmann::json untied = tiny_config_json();
  untied["tie_word_embeddings"] = false;
  nlohmann::json tied = tiny_config_json();
  tied["tie_word_embeddings"] = true;

  const fs::path with_head = tmp.path / "with_head";
  saved_tiny_model(with_head, untied);
  LCKVConfig::from_json(tied).save((with_head / "config.json").string());
  CHECK_THROWS_WITH(io::load_pretrained(with_head.string()),
                    Catch::Contains("model.safetensors") && Catch::Contains("'lm_head.weight'") &&
                        Catch::Contains("tie_word_embeddings: true"));

  const fs::path without_head = tmp.path / "without_head";
  saved_tiny_model(without_head, tied);
  LCKVConfig::from_json(untied).save((without_head / "config.json").string());
  CHECK_THROWS_WITH(io::load_pretrained(without_head.string()),
                    Catch::Contains("model.safetensors") && Catch::Contains("'lm_head.weight' is missing") &&
                        Catch::Contains("tie_word_embeddings: false"));
  // matching configs load
  LCKVConfig::from_json(tied).save((without_head / "config.json").string());
  CHECK_NOTHROW(io::load_pretrained(without_head.string()));
}

TEST_CASE("save_pretrained writes lckv_hf.py for an LCKV model only", "[io][hf]") {
  const TempDir tmp;
  for (const std::string layer_types : {"0_1_2_3", "0_3_3_3"}) {
    const fs::path dir = tmp.path / layer_types;
    nlohmann::json j = {{"vocab_size", 50}, {"hidden_size", 32}, {"intermediate_size", 48}, {"num_hidden_layers", 4},
                        {"num_attention_heads", 4}, {"layer_types", layer_types}};
    LCKVForCausalLM m(LCKVConfig::from_json(j));
    io::save_pretrained(m, dir.string());
    const bool lckv = layer_types != "0_1_2_3";
    CHECK(fs::exists(dir / io::kHfRemoteCodeFile) == lckv);
    CHECK_FALSE(fs::exists(dir / "tokenizer_config.json"));  // no tokenizer.model in dir
    const auto config = nlohmann::json::parse(std::ifstream(dir / "config.json"));
    CHECK(config["model_type"] == (lckv ? "lckv-llama" : "llama"));
    if (lckv) {
      std::ifstream in(dir / io::kHfRemoteCodeFile);
      const std::string code((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      CHECK(code == io::kHfRemoteCode);
    }
  }
  const fs::path bad = tmp.path / "bad_tokenizer";
  fs::create_directories(bad);
  std::ofstream(bad / "tokenizer.model") << "not a sentencepiece model";
  LCKVForCausalLM m(LCKVConfig::from_json(tiny_config_json()));
  CHECK_THROWS_WITH(io::save_pretrained(m, bad.string()), Catch::Contains("tokenizer.model: not a SentencePiece model"));
}

TEST_CASE("save_pretrained refuses a non-float dtype", "[io][bad-input]") {
  const TempDir tmp;
  LCKVForCausalLM m(LCKVConfig::from_json(tiny_config_json()));
  for (auto dtype : {torch::kInt8, torch::kInt32, torch::kLong, torch::kBool, torch::kUInt8}) {
    INFO(dtype);
    CHECK_THROWS_WITH(io::save_pretrained(m, (tmp.path / "out").string(), dtype),
                      Catch::Contains("out") && Catch::Contains("torch." + c10::getDtypeNames(dtype).first) &&
                          Catch::Contains("not a weight dtype"));
    CHECK_FALSE(fs::exists(tmp.path / "out" / "model.safetensors"));
  }
  for (auto dtype : {torch::kHalf, torch::kBFloat16}) {
    io::save_pretrained(m, (tmp.path / "ok").string(), dtype);
    CHECK(io::load_safetensors((tmp.path / "ok" / "model.safetensors").string()).at("lm_head.weight").scalar_type() == dtype);
  }
}

// ---------------------------------------------------------------------------- symbol isolation (issue 12 §1)

namespace {

// libc10's own flag objects, looked up in libc10.so: within this program the name FLAGS_minloglevel
// also denotes SentencePiece's (hidden) flag, which the static link resolves first.
template <class T>
const T& c10_flag(const char* name) {
  void* c10 = dlopen("libc10.so", RTLD_NOW | RTLD_NOLOAD);
  REQUIRE(c10 != nullptr);
  void* flag = dlsym(c10, name);
  REQUIRE(flag != nullptr);
  return *static_cast<const T*>(flag);
}

}  // namespace

TEST_CASE("the tokenizer library leaves torch's flags alone: a failed torch check throws", "[io][isolation]") {
  // SentencePiece's own flags (its minloglevel among them) once bound to libc10's: its constructors
  // overwrote libc10's FLAGS_minloglevel and FLAGS_caffe2_use_fatal_for_enforce at load time, and its
  // trainer's minloglevel option then wrote torch's log level.
  const TempDir tmp;
  const char* words[] = {"ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "ba", "gu", "fe"};
  std::string text;
  for (int i = 0; i < 2000; ++i) text += std::string(words[i % 12]) + words[i * 7 % 11] + (i % 9 ? " " : ".\n");
  write_bytes(tmp.path / "text.txt", text);
  data::TokenizerTrainOptions o;
  o.vocab_size = 300;  // byte fallback alone takes 256 pieces
  data::train_tokenizer({(tmp.path / "text.txt").string()}, (tmp.path / "tok").string(), o);  // sets minloglevel 1
  const auto tok = data::Tokenizer::load((tmp.path / "tok.model").string());
  CHECK(tok.decode(tok.encode("kalo mine suta, 12")) == "kalo mine suta, 12");

  // libc10's defaults (c10/util/Logging.cpp)
  CHECK(c10_flag<bool>("FLAGS_caffe2_use_fatal_for_enforce") == false);
  CHECK(&c10_flag<bool>("FLAGS_caffe2_use_fatal_for_enforce") == &FLAGS_caffe2_use_fatal_for_enforce);
  CHECK(c10_flag<int>("FLAGS_minloglevel") == 0);
  // 2^50 floats (4 PiB) cannot be allocated: torch's enforce must throw, not abort the process
  CHECK_THROWS_AS(torch::empty({int64_t(1) << 50}), c10::Error);
  CHECK_THROWS_WITH(torch::empty({int64_t(1) << 50}), Catch::Contains("can't allocate memory"));
}
