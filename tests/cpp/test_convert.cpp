// Conversion of checkpoints (lckv::io::convert, lckv-convert): each K/V initialisation against the
// source tensors combined here in fp64, the identity conversion bitwise, the checkpoint resolver
// (run directories, `latest`), the memory-mapped reader and the streamed writer, and every bad input.
#include <catch2/catch.hpp>

#include <sys/wait.h>

#include "test_files.h"
#include <torch/torch.h>

#include <algorithm>
#include <filesystem>

#include "lckv/io/checkpoint.h"
#include "lckv/io/convert.h"
#include "lckv/io/safetensors.h"

using namespace lckv;
namespace fs = std::filesystem;
using lckv::testing::Run;
using lckv::testing::TempDir;
using lckv::testing::run;
using lckv::testing::read_bytes;
using lckv::testing::write_bytes;
using Catch::Matchers::Contains;

namespace {

// A 4-layer model with attention biases (so biases are converted too), random weights.
LCKVConfig small_config(const std::string& layer_types) {
  const nlohmann::json j = {{"vocab_size", 40},         {"hidden_size", 16},     {"intermediate_size", 24},
                            {"num_hidden_layers", 4},   {"num_attention_heads", 4}, {"num_key_value_heads", 2},
                            {"attention_bias", true},   {"layer_types", layer_types}, {"forward_passes", 3},
                            {"backward_passes", 1},     {"max_position_embeddings", 64}};
  return LCKVConfig::from_json(j);
}

fs::path write_model(const fs::path& dir, const std::string& layer_types, torch::ScalarType dtype, uint64_t seed) {
  torch::manual_seed(seed);
  LCKVForCausalLM m(small_config(layer_types));
  init_weights(m);
  {
    // init_weights zeroes biases; random ones make the bias averages meaningful.
    torch::NoGradGuard no_grad;
    for (auto& item : m->named_parameters()) {
      if (item.key().find("bias") != std::string::npos) item.value().normal_(0, 0.5);
    }
  }
  io::save_pretrained(m, dir.string(), dtype);
  return dir;
}

std::map<std::string, torch::Tensor> tensors_of(const fs::path& dir) { return io::load_directory_tensors(dir.string()); }

std::string kv(int layer, const std::string& part) {
  return "model.layers." + std::to_string(layer) + ".self_attn." + part;
}

const std::vector<std::string> kParts = {"k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias"};

const std::string kConvert = std::string(LCKV_BINARY_DIR) + "/lckv-convert";

}  // namespace

TEST_CASE("kv-init average, copy and random against the source tensors combined in fp64", "[convert]") {
  const TempDir tmp;
  const fs::path llama = write_model(tmp.path / "llama", "0_1_2_3", torch::kDouble, 1);
  const auto src = tensors_of(llama);
  const auto convert = [&](const std::string& from, const std::string& layer_types, io::KVInit init,
                           const std::string& out) {
    io::ConvertOptions o;
    o.layer_types = layer_types;
    o.kv_init = init;
    o.seed = 7;
    io::convert_checkpoint(from, (tmp.path / out).string(), o);
    return tensors_of(tmp.path / out);
  };

  SECTION("average: layers 1 and 2 attend to layer 2, which gets the mean of their K/V; layer 1 loses its own") {
    const auto out = convert(llama.string(), "0_2_2_3", io::KVInit::kAverage, "avg");
    for (const std::string& p : kParts) {
      INFO(p);
      const torch::Tensor expected = (src.at(kv(1, p)) + src.at(kv(2, p))) / 2.0;
      CHECK(torch::allclose(out.at(kv(2, p)), expected, 0, 1e-15));
      CHECK(torch::equal(out.at(kv(0, p)), src.at(kv(0, p))));
      CHECK(torch::equal(out.at(kv(3, p)), src.at(kv(3, p))));
      CHECK(out.count(kv(1, p)) == 0);
    }
    for (const auto& [name, t] : out) {
      if (name.find("k_proj") == std::string::npos && name.find("v_proj") == std::string::npos) {
        INFO(name);
        CHECK(torch::equal(t, src.at(name)));
      }
    }
    CHECK(out.size() == src.size() - 4);
    // The converted directory is a complete checkpoint of the new layout.
    LCKVForCausalLM m = io::load_pretrained((tmp.path / "avg").string(), torch::kDouble);
    CHECK(format_layer_types(m->config.layer_types) == "0_2_2_3");
  }
  SECTION("average from an LCKV source: each layer contributes the K/V it used (its source target's)") {
    const fs::path lckv = write_model(tmp.path / "lckv", "0_2_2_3", torch::kDouble, 2);
    const auto s = tensors_of(lckv);
    const auto out = convert(lckv.string(), "0_3_3_3", io::KVInit::kAverage, "avg3");
    for (const std::string& p : kParts) {
      INFO(p);
      // layers 1, 2 used layer 2's K/V in the source, layer 3 its own
      const torch::Tensor expected = (s.at(kv(2, p)) * 2.0 + s.at(kv(3, p))) / 3.0;
      CHECK(torch::allclose(out.at(kv(3, p)), expected, 0, 1e-15));
      CHECK(out.count(kv(2, p)) == 0);
    }
    // Back to a plain Llama: layer 1 starts from the K/V it read (layer 2's), exactly.
    const auto back = convert(lckv.string(), "0_1_2_3", io::KVInit::kAverage, "back");
    for (const std::string& p : kParts) CHECK(torch::equal(back.at(kv(1, p)), s.at(kv(2, p))));
  }
  SECTION("copy: the KV layer's own K/V") {
    const auto out = convert(llama.string(), "0_2_2_3", io::KVInit::kCopy, "copy");
    for (const std::string& p : kParts) CHECK(torch::equal(out.at(kv(2, p)), src.at(kv(2, p))));
    // From an LCKV source, a layer that computed no KV copies the K/V it read.
    const fs::path lckv = write_model(tmp.path / "lckv", "0_2_2_3", torch::kDouble, 3);
    const auto back = convert(lckv.string(), "0_1_2_3", io::KVInit::kCopy, "copy_back");
    for (const std::string& p : kParts) CHECK(torch::equal(back.at(kv(1, p)), tensors_of(lckv).at(kv(2, p))));
  }
  SECTION("random: init_weights' distribution, zero biases, seeded, the rest unchanged") {
    const auto out = convert(llama.string(), "0_2_2_3", io::KVInit::kRandom, "rnd");
    const auto again = convert(llama.string(), "0_2_2_3", io::KVInit::kRandom, "rnd2");
    for (int layer : {0, 2, 3}) {
      for (const std::string& p : kParts) {
        INFO(kv(layer, p));
        const torch::Tensor t = out.at(kv(layer, p));
        CHECK(torch::equal(t, again.at(kv(layer, p))));
        CHECK_FALSE(torch::equal(t, src.at(kv(layer, p))));
        if (p.find("bias") != std::string::npos) {
          CHECK(t.abs().max().item<double>() == 0);
        } else {
          // 128 normal(0, 0.02) draws (fixed seed): sample std and mean near 0.02 and 0
          CHECK(std::abs(t.std().item<double>() - 0.02) < 0.006);
          CHECK(std::abs(t.mean().item<double>()) < 0.006);
        }
      }
    }
    CHECK(torch::equal(out.at("model.layers.1.mlp.up_proj.weight"), src.at("model.layers.1.mlp.up_proj.weight")));
  }
}

TEST_CASE("the identity conversion reproduces the source bitwise", "[convert]") {
  const TempDir tmp;
  for (torch::ScalarType dtype : {torch::kFloat, torch::kBFloat16}) {
    INFO(c10::toString(dtype));
    const fs::path src = write_model(tmp.path / "src", "0_1_2_3", dtype, 4);
    for (io::KVInit init : {io::KVInit::kAverage, io::KVInit::kCopy}) {
      io::ConvertOptions o;
      o.kv_init = init;
      io::convert_checkpoint(src.string(), (tmp.path / "same").string(), o, std::nullopt, /*overwrite=*/true);
      const auto a = tensors_of(src), b = tensors_of(tmp.path / "same");
      REQUIRE(a.size() == b.size());
      for (const auto& [name, t] : a) {
        INFO(name);
        CHECK(t.scalar_type() == b.at(name).scalar_type());
        CHECK(torch::equal(t, b.at(name)));
      }
      LCKVForCausalLM x = io::load_pretrained(src.string()), y = io::load_pretrained((tmp.path / "same").string());
      const torch::Tensor ids = torch::randint(0, 40, {2, 9});
      torch::NoGradGuard no_grad;
      CHECK(torch::equal(x->forward(ids).logits, y->forward(ids).logits));
    }
    fs::remove_all(tmp.path / "src");
  }
}

TEST_CASE("a converted checkpoint is complete: config, dtype, m/b/window, tokenizer files", "[convert]") {
  const TempDir tmp;
  const fs::path src = write_model(tmp.path / "src", "0_1_2_3", torch::kFloat, 5);
  // A minimal byte-level BPE tokenizer.json (copy_tokenizer checks that the file loads).
  const std::string tokenizer_json =
      R"({"version": "1.0", "added_tokens": [], "normalizer": null, "post_processor": null,)"
      R"( "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},)"
      R"( "decoder": {"type": "ByteLevel"}, "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2},)"
      R"( "merges": ["a b"]}})";
  write_bytes(src / "tokenizer.json", tokenizer_json);
  io::ConvertOptions o;
  o.layer_types = "0_2_2s_3";
  o.forward_passes = 5;
  o.backward_passes = 2;
  o.sliding_window = 6;
  io::convert_checkpoint(src.string(), (tmp.path / "out").string(), o, torch::kBFloat16);
  const LCKVConfig c = LCKVConfig::from_file((tmp.path / "out" / "config.json").string());
  CHECK(format_layer_types(c.layer_types) == "0_2_2s_3");
  CHECK(c.forward_passes == 5);
  CHECK(c.backward_passes == 2);
  CHECK(c.sliding_window == 6);
  CHECK(c.torch_dtype == "bfloat16");
  CHECK(tensors_of(tmp.path / "out").at("model.norm.weight").scalar_type() == torch::kBFloat16);
  CHECK(read_bytes(tmp.path / "out" / "tokenizer.json") == tokenizer_json);
  // No temporary is left next to the output.
  for (const auto& e : fs::directory_iterator(tmp.path)) CHECK(e.path().filename().string().rfind(".tmp", 0) != 0);
  // In memory (from_pretrained(layer_types=...)): the same tensors as the directory.
  LCKVForCausalLM m = io::load_converted(src.string(), o, torch::kBFloat16);
  LCKVForCausalLM d = io::load_pretrained((tmp.path / "out").string(), torch::kBFloat16);
  for (const auto& item : m->named_parameters()) {
    INFO(item.key());
    CHECK(torch::equal(item.value(), d->named_parameters()[item.key()]));
  }
}

TEST_CASE("conversion refuses bad input with messages naming it", "[convert]") {
  const TempDir tmp;
  const fs::path src = write_model(tmp.path / "src", "0_1_2_3", torch::kFloat, 6);
  io::ConvertOptions o;
  o.layer_types = "0_0_1";
  CHECK_THROWS_WITH(io::convert_checkpoint(src.string(), (tmp.path / "o").string(), o),
                    Contains("layer_types \"0_0_1\" has 3 entries") && Contains("has 4 layers") &&
                        Contains(src.string()));
  CHECK_THROWS_AS(io::parse_kv_init("mean"), ConfigError);
  CHECK_THROWS_WITH(io::parse_kv_init("mean"), Contains("\"mean\"") && Contains("average, copy or random"));
  o.layer_types = "0_2_2_3";
  CHECK_THROWS_WITH(io::convert_checkpoint((tmp.path / "nowhere").string(), (tmp.path / "o").string(), o),
                    Contains("nowhere") && Contains("does not exist"));
  fs::create_directories(tmp.path / "exists");
  CHECK_THROWS_WITH(io::convert_checkpoint(src.string(), (tmp.path / "exists").string(), o),
                    Contains("exists") && Contains("already exists") && Contains("--overwrite"));
  io::convert_checkpoint(src.string(), (tmp.path / "exists").string(), o, std::nullopt, /*overwrite=*/true);
  CHECK(fs::exists(tmp.path / "exists" / "model.safetensors"));

  // Source tensors that do not match the source's config.json.
  auto tensors = tensors_of(src);
  std::vector<std::pair<std::string, torch::Tensor>> list(tensors.begin(), tensors.end());
  const LCKVConfig lckv_config = small_config("0_2_2_3");
  fs::create_directories(tmp.path / "bad");
  lckv_config.save((tmp.path / "bad" / "config.json").string());  // says layer 1 computes no KV, but it has k/v
  io::save_safetensors((tmp.path / "bad" / "model.safetensors").string(), list);
  CHECK_THROWS_WITH(io::convert_checkpoint((tmp.path / "bad").string(), (tmp.path / "o").string(), o),
                    Contains("model.layers.1.self_attn.k_proj.bias") && Contains("computes no KV"));
  list.erase(std::remove_if(list.begin(), list.end(), [](const auto& p) { return p.first.find(".1.self_attn.k") != std::string::npos || p.first.find(".1.self_attn.v") != std::string::npos || p.first == "model.layers.3.self_attn.v_proj.weight"; }), list.end());
  io::save_safetensors((tmp.path / "bad" / "model.safetensors").string(), list);
  CHECK_THROWS_WITH(io::convert_checkpoint((tmp.path / "bad").string(), (tmp.path / "o").string(), o),
                    Contains("'model.layers.3.self_attn.v_proj.weight' is missing"));
  CHECK_FALSE(fs::exists(tmp.path / "o"));

  // The program: same errors, exit status 1.
  Run r = run(kConvert + " " + src.string() + " " + (tmp.path / "o").string() + " --kv-init mean");
  CHECK(r.status == 1);
  CHECK_THAT(r.output, Contains("lckv-convert: kv_init: unknown initialisation \"mean\""));
  r = run(kConvert + " " + src.string() + " " + (tmp.path / "o").string() + " --layer-types 0_1");
  CHECK(r.status == 1);
  CHECK_THAT(r.output, Contains("has 2 entries") && Contains("has 4 layers"));
  r = run(kConvert + " " + src.string() + " " + (tmp.path / "o").string() + " --layer-types 0_2_2_3 --kv-init copy");
  CHECK(r.status == 0);
  CHECK_THAT(r.output, Contains("3 of 4 layers compute KV"));
}

TEST_CASE("a run directory or its latest is accepted wherever a checkpoint directory is", "[convert][io]") {
  const TempDir tmp;
  const fs::path run_dir = tmp.path / "run";
  write_model(run_dir / "step_000004", "0_1_2_3", torch::kFloat, 8);
  write_bytes(run_dir / "latest", "step_000004\n");
  const std::string step = (run_dir / "step_000004").string();
  CHECK(io::resolve_checkpoint_dir(step) == step);
  CHECK(io::resolve_checkpoint_dir(run_dir.string()) == step);
  CHECK(io::resolve_checkpoint_dir((run_dir / "latest").string()) == step);
  LCKVForCausalLM m = io::load_pretrained(run_dir.string());
  CHECK(m->config.num_hidden_layers == 4);
  io::ConvertOptions o;
  o.layer_types = "0_2_2_3";
  io::convert_checkpoint((run_dir / "latest").string(), (tmp.path / "conv").string(), o);
  CHECK(fs::exists(tmp.path / "conv" / "config.json"));
  // a symlink `latest`
  fs::create_directories(tmp.path / "linked");
  fs::create_directory_symlink(fs::absolute(run_dir / "step_000004"), tmp.path / "linked" / "latest");
  CHECK(io::resolve_checkpoint_dir((tmp.path / "linked").string()) == (tmp.path / "linked" / "latest").string());

  write_bytes(run_dir / "latest", "../elsewhere\n");
  CHECK_THROWS_WITH(io::resolve_checkpoint_dir(run_dir.string()),
                    Contains("names '../elsewhere'") && Contains("inside"));
  write_bytes(run_dir / "latest", "step_000009\n");
  CHECK_THROWS_WITH(io::load_pretrained(run_dir.string()), Contains("step_000009") && Contains("no config.json"));
  fs::create_directories(tmp.path / "empty");
  CHECK_THROWS_WITH(io::resolve_checkpoint_dir((tmp.path / "empty").string()),
                    Contains("has no config.json") && Contains((tmp.path / "empty" / "latest").string()));
}

TEST_CASE("safetensors files are memory-mapped copy-on-write, and unaligned data is copied", "[convert][io]") {
  const TempDir tmp;
  const fs::path file = tmp.path / "x.safetensors";
  const torch::Tensor w = torch::randn({64, 32});
  io::save_safetensors(file.string(), {{"w", w}});
  {
    auto loaded = io::load_safetensors(file.string());
    CHECK(torch::equal(loaded.at("w"), w));
    loaded.at("w").add_(1.0);  // changes this process's copy only
  }
  CHECK(torch::equal(io::load_safetensors(file.string()).at("w"), w));
  // A header of odd length (not padded as ours are) leaves the data unaligned for F32.
  const std::string header = R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})";
  REQUIRE(header.size() % 4 != 0);
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  const torch::Tensor v = torch::arange(6, torch::kFloat).reshape({2, 3});
  bytes += header + std::string(static_cast<const char*>(v.data_ptr()), 24);
  write_bytes(tmp.path / "odd.safetensors", bytes);
  CHECK(torch::equal(io::load_safetensors((tmp.path / "odd.safetensors").string()).at("w"), v));
}

TEST_CASE("the streamed safetensors writer checks what each tensor produces", "[convert][io]") {
  const TempDir tmp;
  const fs::path file = tmp.path / "s.safetensors";
  std::vector<io::TensorToWrite> specs = {{"a", torch::kFloat, {2, 2}, [] { return torch::ones({2, 2}); }},
                                          {"b", torch::kFloat, {3}, [] { return torch::ones({4}); }}};
  CHECK_THROWS_WITH(io::save_safetensors(file.string(), specs),
                    Contains("tensor 'b' was declared F32 [3] but produced F32 [4]"));
  CHECK_FALSE(fs::exists(file));
  specs[1].produce = [] { return torch::full({3}, 2.0); };
  io::save_safetensors(file.string(), specs);
  const auto back = io::load_safetensors(file.string());
  CHECK(torch::equal(back.at("a"), torch::ones({2, 2})));
  CHECK(torch::equal(back.at("b"), torch::full({3}, 2.0)));
}
