// The trainer (csrc/lckv/train): schedule, weight-decay groups, learning, exact resume through a
// stop signal, checkpoints, and every bad-input case of the training program.
#include <catch2/catch.hpp>

#include <CLI/CLI.hpp>
#include <sys/resource.h>

#include "test_files.h"
#include <torch/torch.h>

#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "lckv/data/shards.h"
#include "lckv/data/tokenizer.h"
#include "lckv/io/checkpoint.h"
#include "lckv/io/safetensors.h"
#include "lckv/generate/generate.h"
#include "lckv/train/trainer.h"

using namespace lckv;
using train::TrainError;
using train::TrainOptions;
namespace fs = std::filesystem;
using lckv::testing::TempDir;
using lckv::testing::read_bytes;
using lckv::testing::write_bytes;
using Catch::Matchers::Contains;

namespace {

// A prepared-data directory as lckv-prepare writes it (no tokenizer file: training never reads it).
// `shard_vocab` is the vocab_size in the shard headers, `meta_vocab` the tokenizer's.
fs::path make_data(const fs::path& dir, const std::vector<int32_t>& train_tokens, const std::vector<int32_t>& val_tokens,
                   int64_t meta_vocab, int64_t shard_vocab) {
  fs::create_directories(dir);
  data::write_shard((dir / "train_000000.bin").string(), train_tokens, shard_vocab);
  data::write_shard((dir / "val_000000.bin").string(), val_tokens, shard_vocab);
  const nlohmann::json meta = {{"tokenizer", "tokenizer.model"},
                               {"vocab_size", meta_vocab},
                               {"eos_id", 2},
                               {"train_shards", {"train_000000.bin"}},
                               {"val_shards", {"val_000000.bin"}}};
  write_bytes(dir / "meta.json", meta.dump());
  return dir;
}

// `n` tokens repeating `period` ids starting at 3.
std::vector<int32_t> repeating(int64_t n, int period) {
  std::vector<int32_t> t(n);
  for (int64_t i = 0; i < n; ++i) t[i] = static_cast<int32_t>(3 + i % period);
  return t;
}

std::vector<int32_t> random_tokens(int64_t n, int vocab, uint64_t seed) {
  torch::manual_seed(seed);
  const torch::Tensor t = torch::randint(0, vocab, {n}, torch::kInt);
  return {t.data_ptr<int32_t>(), t.data_ptr<int32_t>() + n};
}

// A tiny LCKV model: layers 1 and 2 attend to the top KV layer 2, layer 3 to itself.
fs::path write_model_config(const fs::path& path, int64_t hidden = 32) {
  const nlohmann::json c = {{"vocab_size", 64},        {"hidden_size", hidden},      {"intermediate_size", 2 * hidden},
                            {"num_hidden_layers", 4},  {"num_attention_heads", 4},   {"num_key_value_heads", 2},
                            {"layer_types", "0_2_2_3"}, {"forward_passes", 2},        {"backward_passes", 1},
                            {"max_position_embeddings", 128}};
  write_bytes(path, c.dump());
  return path;
}

TrainOptions tiny_options(const fs::path& root, const fs::path& data, const std::string& out) {
  TrainOptions o;
  o.model_config = write_model_config(root / "model.json").string();
  o.data = data.string();
  o.out = (root / out).string();
  o.seq_len = 16;
  o.batch_size = 4;
  o.max_steps = 8;
  o.lr = 3e-3;
  o.warmup_steps = 2;
  o.eval_every = 3;
  o.save_every = 0;
  o.log_every = 2;
  o.threads = 2;
  return o;
}

std::string latest_name(const std::string& out) {
  std::string s = read_bytes(fs::path(out) / "latest");
  while (!s.empty() && s.back() == '\n') s.pop_back();
  return s;
}

}  // namespace

TEST_CASE("learning rate: linear warmup, then cosine to lr * min_lr_ratio", "[train]") {
  TrainOptions o;
  o.lr = 1e-3;
  o.min_lr_ratio = 0.1;
  o.warmup_steps = 10;
  const int64_t total = 111;  // 101 decay steps: the midpoint is step 60
  CHECK(train::learning_rate(o, 0, total) == Approx(1e-4).epsilon(1e-12));
  CHECK(train::learning_rate(o, 4, total) == Approx(5e-4).epsilon(1e-12));
  CHECK(train::learning_rate(o, 9, total) == Approx(1e-3).epsilon(1e-12));
  CHECK(train::learning_rate(o, 10, total) == Approx(1e-3).epsilon(1e-12));
  CHECK(train::learning_rate(o, 60, total) == Approx(5.5e-4).epsilon(1e-12));
  // A quarter of the way: min + (1 + cos(pi/4)) / 2 * (max - min).
  CHECK(train::learning_rate(o, 35, total) == Approx(1e-4 + 0.5 * (1 + std::sqrt(0.5)) * 9e-4).epsilon(1e-12));
  CHECK(train::learning_rate(o, 110, total) == Approx(1e-4).epsilon(1e-12));
  for (int64_t s = 11; s < total; ++s) CHECK(train::learning_rate(o, s, total) < train::learning_rate(o, s - 1, total));
  o.warmup_steps = 0;
  CHECK(train::learning_rate(o, 0, total) == Approx(1e-3).epsilon(1e-12));
}

TEST_CASE("weight decay applies to the matrices, not to norms", "[train]") {
  const TempDir tmp;
  const fs::path root = tmp.path;
  LCKVForCausalLM model(LCKVConfig::from_file(write_model_config(root / "model.json").string()));
  const train::ParamGroups g = train::weight_decay_groups(model);
  std::set<std::string> decay, no_decay;
  for (const auto& [name, t] : g.decay) decay.insert(name);
  for (const auto& [name, t] : g.no_decay) no_decay.insert(name);
  // Independently by name: this Llama has no biases, so exactly the norm weights are exempt.
  int64_t total = 0;
  for (const auto& item : model->named_parameters()) {
    ++total;
    const bool is_norm = item.key().find("norm") != std::string::npos;
    INFO(item.key());
    CHECK(decay.count(item.key()) == (is_norm ? 0u : 1u));
    CHECK(no_decay.count(item.key()) == (is_norm ? 1u : 0u));
  }
  CHECK(static_cast<int64_t>(decay.size() + no_decay.size()) == total);
  CHECK(decay.count("model.embed_tokens.weight") == 1);
  CHECK(decay.count("lm_head.weight") == 1);
  // Layers 1 and 2 read layer 2's KVs, so layer 1 has no k/v projections.
  CHECK(decay.count("model.layers.1.self_attn.k_proj.weight") == 0);
  CHECK(decay.count("model.layers.2.self_attn.k_proj.weight") == 1);
}

TEST_CASE("training learns a repeating sequence and greedy decoding continues it", "[train]") {
  const TempDir tmp;
  const fs::path root = tmp.path;
  const fs::path data = make_data(root / "data", repeating(4000, 7), repeating(400, 7), 64, 64);
  TrainOptions o = tiny_options(root, data, "out");
  o.max_steps = 40;
  o.lr = 1e-2;
  o.eval_every = 0;
  std::vector<double> losses;
  train::Trainer trainer(o);
  const train::RunResult r = trainer.run([&](const train::StepStats& s) { losses.push_back(s.loss); });
  REQUIRE(losses.size() == 40);
  CHECK(losses.front() > 3.5);  // ~ln 64 at initialisation
  CHECK(losses.back() < 0.2 * losses.front());
  REQUIRE(r.final_eval);
  CHECK(r.final_eval->ppl < 2.0);
  CHECK(r.final_eval->ppl == Approx(std::exp(r.final_eval->loss)));
  // The pattern 3 4 5 6 7 8 9 3 4 ... continues from any prefix.
  GenerationConfig g;
  g.max_new_tokens = 10;
  const auto generated = generate(trainer.model(), {{5, 6, 7, 8}}, g).tokens[0];
  std::vector<int64_t> expected;
  for (int i = 0; i < 10; ++i) expected.push_back(3 + (6 + i) % 7);
  CHECK(generated == expected);
}

TEST_CASE("a run stopped by SIGTERM and resumed gives the uninterrupted run's losses exactly", "[train]") {
  const TempDir tmp;
  const fs::path root = tmp.path;
  const fs::path data = make_data(root / "data", random_tokens(3000, 64, 1), random_tokens(300, 64, 2), 64, 64);
  TrainOptions o = tiny_options(root, data, "whole");
  o.grad_accum = 2;

  std::vector<double> whole;
  train::Trainer uninterrupted(o);
  uninterrupted.run([&](const train::StepStats& s) { whole.push_back(s.loss); });
  REQUIRE(whole.size() == 8);

  o.out = (root / "split").string();
  std::vector<double> split;
  {
    train::install_stop_handlers();
    train::clear_stop_request();
    train::Trainer first(o);
    const train::RunResult r = first.run([&](const train::StepStats& s) {
      split.push_back(s.loss);
      if (s.step == 5) std::raise(SIGTERM);
    });
    train::clear_stop_request();
    CHECK(r.stop_signal == SIGTERM);
    CHECK(r.step == 5);
    CHECK(latest_name(o.out) == "step_000005");
  }
  o.resume = true;
  train::Trainer resumed(o);
  CHECK(resumed.step() == 5);
  resumed.run([&](const train::StepStats& s) { split.push_back(s.loss); });
  REQUIRE(split.size() == whole.size());
  for (std::size_t i = 0; i < whole.size(); ++i) {
    INFO("step " << i + 1);
    CHECK(split[i] == whole[i]);  // bitwise
  }
  // Same final weights, and the checkpoint holds them under HF names.
  const auto a = io::load_safetensors((root / "whole" / "step_000008" / "model.safetensors").string());
  const auto b = io::load_safetensors((root / "split" / "step_000008" / "model.safetensors").string());
  REQUIRE(a.size() == b.size());
  for (const auto& [name, t] : a) {
    INFO(name);
    CHECK(torch::equal(t, b.at(name)));
  }
  LCKVForCausalLM loaded = io::load_pretrained((root / "split" / "step_000008").string());
  for (const auto& item : resumed.model()->named_parameters()) CHECK(torch::equal(item.value(), loaded->named_parameters()[item.key()]));
  // keep_checkpoints = 2: step 5 (from the stop) and step 8 remain.
  CHECK(fs::exists(root / "split" / "step_000005"));
  CHECK(fs::exists(root / "split" / "step_000008"));
  // The metrics file reads as one run: every training record's step once, increasing.
  std::vector<int64_t> steps;
  std::ifstream metrics(root / "split" / "metrics.jsonl");
  for (std::string line; std::getline(metrics, line);) {
    const auto rec = nlohmann::json::parse(line);
    if (rec["type"] == "train") steps.push_back(rec["step"].get<int64_t>());
  }
  CHECK(steps == std::vector<int64_t>{2, 4, 5, 6, 8});
}

TEST_CASE("run files: fields set options, unknown or mistyped fields are rejected by name", "[train]") {
  const TempDir tmp;
  const fs::path root = tmp.path;
  write_bytes(root / "run.json", R"({"seq_len": 64, "lr": 0.002, "dtype": "fp32", "resume": true})");
  const TrainOptions o = TrainOptions::from_file((root / "run.json").string());
  CHECK(o.seq_len == 64);
  CHECK(o.lr == 0.002);
  CHECK(o.dtype == "fp32");
  CHECK(o.resume);
  CHECK(o.batch_size == TrainOptions{}.batch_size);
  CHECK(TrainOptions::from_json(o.to_json()).to_json() == o.to_json());
  write_bytes(root / "bad.json", R"({"seq_lenn": 64})");
  CHECK_THROWS_WITH(TrainOptions::from_file((root / "bad.json").string()), Contains("unknown field 'seq_lenn'"));
  write_bytes(root / "bad.json", R"({"seq_len": "long"})");
  CHECK_THROWS_WITH(TrainOptions::from_file((root / "bad.json").string()), Contains("'seq_len': expected an integer"));
  write_bytes(root / "bad.json", R"({"seq_len": )");
  CHECK_THROWS_WITH(TrainOptions::from_file((root / "bad.json").string()), Contains("invalid JSON") && Contains("bad.json"));
  TrainOptions bad = tiny_options(root, root, "out");
  bad.dtype = "fp8";
  CHECK_THROWS_WITH(bad.validate(), Contains("dtype") && Contains("fp8"));
}

TEST_CASE("bad data: missing, truncated, or token ids beyond the model's vocabulary", "[train]") {
  const TempDir tmp;
  const fs::path root = tmp.path;
  TrainOptions o = tiny_options(root, root / "nowhere", "out");
  CHECK_THROWS_WITH(train::Trainer(o), Contains("meta.json") && Contains("nowhere"));

  // Shards whose header allows ids up to 99 while the tokenizer (meta.json) has 64.
  const fs::path wide = make_data(root / "wide", random_tokens(1000, 100, 3), random_tokens(100, 64, 4), 64, 100);
  o.data = wide.string();
  CHECK_THROWS_WITH(train::Trainer(o), Contains("train_000000.bin") && Contains("up to 99") && Contains("vocab_size is 64"));

  const fs::path cut = make_data(root / "cut", random_tokens(1000, 64, 5), random_tokens(100, 64, 6), 64, 64);
  fs::resize_file(cut / "train_000000.bin", fs::file_size(cut / "train_000000.bin") - 7);
  o.data = cut.string();
  CHECK_THROWS_WITH(train::Trainer(o), Contains("train_000000.bin"));
  CHECK_FALSE(fs::exists(root / "out"));  // nothing written for a run that cannot start
}

TEST_CASE("bad checkpoints and outputs: mismatched config, corrupt weights, existing run, unwritable dir", "[train]") {
  const TempDir tmp;
  const fs::path root = tmp.path;
  const fs::path data = make_data(root / "data", random_tokens(2000, 64, 7), random_tokens(200, 64, 8), 64, 64);
  TrainOptions o = tiny_options(root, data, "out");
  o.max_steps = 2;
  train::Trainer(o).run();
  const fs::path ckpt = root / "out" / "step_000002";
  REQUIRE(fs::exists(ckpt / "model.safetensors"));
  const std::string metrics_before = read_bytes(root / "out" / "metrics.jsonl");

  SECTION("a fresh run refuses to overwrite an existing one") {
    CHECK_THROWS_WITH(train::Trainer(o), Contains("--resume"));
  }
  SECTION("resume with another model config") {
    o.resume = true;
    o.max_steps = 4;
    o.model_config = write_model_config(root / "wider.json", 48).string();
    CHECK_THROWS_WITH(train::Trainer(o), Contains("step_000002") && Contains("hidden_size") && Contains("48"));
  }
  SECTION("resume from a truncated model.safetensors") {
    fs::resize_file(ckpt / "model.safetensors", fs::file_size(ckpt / "model.safetensors") / 2);
    o.resume = true;
    o.max_steps = 4;
    CHECK_THROWS_WITH(train::Trainer(o), Contains("cannot resume") && Contains("model.safetensors"));
    CHECK(fs::exists(ckpt / "optimizer.pt"));  // nothing deleted
    CHECK(read_bytes(root / "out" / "metrics.jsonl") == metrics_before);
  }
  SECTION("resume from a model.safetensors of garbage bytes") {
    write_bytes(ckpt / "model.safetensors", std::string(5000, '\x7f'));
    o.resume = true;
    CHECK_THROWS_WITH(train::Trainer(o), Contains("cannot resume") && Contains("model.safetensors"));
  }
  SECTION("resume without a checkpoint") {
    o.resume = true;
    o.out = (root / "empty").string();
    CHECK_THROWS_WITH(train::Trainer(o), Contains("latest") && Contains("no checkpoint"));
  }
  SECTION("an output directory that cannot be created") {
    write_bytes(root / "a_file", "x");
    o.out = (root / "a_file" / "run").string();
    CHECK_THROWS_WITH(train::Trainer(o), Contains("cannot create output directory") && Contains("a_file"));
  }
}

TEST_CASE("a non-finite loss stops the run naming the step and keeps the last good checkpoint", "[train]") {
  const TempDir tmp;
  const fs::path root = tmp.path;
  const fs::path data = make_data(root / "data", random_tokens(2000, 64, 9), random_tokens(200, 64, 10), 64, 64);
  TrainOptions o = tiny_options(root, data, "out");
  o.lr = 1e30;  // one AdamW step moves every weight by ~1e30: the next forward overflows
  o.warmup_steps = 0;
  o.grad_clip = 0;
  o.save_every = 1;
  o.eval_every = 0;
  int64_t last_good = 0;
  train::Trainer trainer(o);
  std::string message;
  try {
    trainer.run([&](const train::StepStats& s) { last_good = s.step; });
  } catch (const TrainError& e) {
    message = e.what();
  }
  REQUIRE(!message.empty());
  REQUIRE(last_good >= 1);
  CHECK_THAT(message, Contains("step " + std::to_string(last_good + 1) + ":"));
  char name[32];
  std::snprintf(name, sizeof name, "step_%06lld", static_cast<long long>(last_good));
  CHECK_THAT(message, Contains(name));
  CHECK(latest_name(o.out) == name);
  CHECK_NOTHROW(io::load_pretrained((fs::path(o.out) / name).string()));
}

TEST_CASE("the fused AdamW step equals libtorch's AdamW step", "[train]") {
  torch::manual_seed(3);
  auto make = [] {
    std::vector<torch::Tensor> ps = {torch::randn({5, 7}, torch::kDouble), torch::randn({7}, torch::kDouble)};
    for (auto& p : ps) p.requires_grad_(true);
    return ps;
  };
  std::vector<torch::Tensor> a = make(), b;
  for (auto& p : a) b.push_back(p.detach().clone().requires_grad_(true));
  auto opts = torch::optim::AdamWOptions(1e-2).betas({0.9, 0.95}).eps(1e-8).weight_decay(0.1);
  torch::optim::AdamW reference(a, opts), fused(b, opts);
  for (int step = 0; step < 3; ++step) {
    const torch::Tensor g0 = torch::randn({5, 7}, torch::kDouble), g1 = torch::randn({7}, torch::kDouble);
    a[0].mutable_grad() = g0.clone();
    a[1].mutable_grad() = g1.clone();
    b[0].mutable_grad() = g0.clone();
    b[1].mutable_grad() = g1.clone();
    reference.step();
    train::fused_adamw_step(fused);
    for (size_t i = 0; i < a.size(); ++i) CHECK((a[i] - b[i]).abs().max().item<double>() < 1e-12);
  }
  auto& st = static_cast<torch::optim::AdamWParamState&>(*fused.state().at(b[0].unsafeGetTensorImpl()));
  CHECK(st.step() == 3);
}

TEST_CASE("the option table: JSON fields, flags and help come from one list, integers are exact", "[train][options]") {
  const nlohmann::json defaults = TrainOptions{}.to_json();
  std::set<std::string> names;
  for (const auto& f : train::option_fields()) {
    INFO(f.name);
    CHECK(names.insert(f.name).second);  // no field twice
    CHECK(defaults.contains(f.name));
    CHECK(std::string(f.help).size() > 10);
  }
  CHECK(names.size() == defaults.size());
  // Every field is a flag of lckv-train, and flags set the same member as the run-file field.
  CLI::App app;
  TrainOptions o;
  train::add_cli_options(app, o);
  for (const auto& f : train::option_fields()) CHECK(app.get_option_no_throw(train::flag_name(f)) != nullptr);
  std::vector<std::string> args = {"--seq-len", "64", "--lr", "0.25", "--no-resume", "--allow-changes", "lr,seed",
                                   "--dtype", "fp32"};
  std::vector<const char*> argv = {"lckv-train"};
  for (const auto& a : args) argv.push_back(a.c_str());
  app.parse(static_cast<int>(argv.size()), argv.data());
  CHECK(o.seq_len == 64);
  CHECK(o.lr == 0.25);
  CHECK(o.allow_changes == std::vector<std::string>{"lr", "seed"});
  CHECK(TrainOptions::from_json(o.to_json()).to_json() == o.to_json());

  // Integers are taken as they are, or refused naming the field and value.
  auto refused = [](const std::string& text) {
    try {
      TrainOptions::from_json(nlohmann::json::parse(text), "run.json");
    } catch (const TrainError& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  CHECK_THAT(refused(R"({"grad_accum": 8.9})"), Contains("run.json") && Contains("'grad_accum'") && Contains("8.9"));
  CHECK_THAT(refused(R"({"grad_accum": 4294967304})"), Contains("'grad_accum'") && Contains("4294967304") &&
                                                           Contains("2^31 - 1"));
  CHECK_THAT(refused(R"({"seed": -1})"), Contains("'seed'") && Contains("-1"));
  CHECK_THAT(refused(R"({"seq_len": true})"), Contains("'seq_len'") && Contains("integer"));
  CHECK_THAT(refused(R"({"lr": "fast"})"), Contains("'lr'") && Contains("number"));
  CHECK_THAT(refused(R"({"allow_changes": [1]})"), Contains("'allow_changes'"));
  CHECK_THAT(refused(R"({"max_steps": 1e300})"), Contains("'max_steps'"));
  CHECK(refused(R"({"seq_len": 64, "seed": 18446744073709551615})").empty());
  // CLI11 refuses a fraction or an out-of-range value for an integer flag.
  for (const char* bad : {"8.9", "4294967304"}) {
    CLI::App app2;
    TrainOptions o2;
    train::add_cli_options(app2, o2);
    const char* argv2[] = {"lckv-train", "--grad-accum", bad};
    CHECK_THROWS_AS(app2.parse(3, argv2), CLI::ParseError);
  }
  TrainOptions bad = TrainOptions{};
  bad.model_config = bad.data = bad.out = "x";
  bad.allow_changes = {"threads"};
  CHECK_THROWS_WITH(bad.validate(), Contains("allow_changes") && Contains("threads"));
}

TEST_CASE("resume: changed options are listed, those that change the result need allow_changes", "[train]") {
  const TempDir tmp;
  const fs::path root = tmp.path;
  const fs::path data = make_data(root / "data", random_tokens(2000, 64, 11), random_tokens(200, 64, 12), 64, 64);
  TrainOptions o = tiny_options(root, data, "out");
  o.max_steps = 2;
  train::Trainer(o).run();
  o.resume = true;

  SECTION("every refused change is named, with both values") {
    o.lr = 1e-2;
    o.seed = 99;
    o.batch_size = 2;
    o.max_steps = 4;
    try {
      train::Trainer t(o);
      FAIL("resume with changed options was accepted");
    } catch (const TrainError& e) {
      const std::string m = e.what();
      CHECK_THAT(m, Contains("lr: 0.003 -> 0.01") && Contains("seed: 1234 -> 99") && Contains("batch_size: 4 -> 2") &&
                        Contains("max_steps: 2 -> 4") && Contains("--allow-changes"));
    }
  }
  SECTION("allowed changes are used and recorded in train.json; others are reported") {
    o.max_steps = 4;
    o.lr = 1e-2;
    o.allow_changes = {"max_steps", "lr"};
    o.log_every = 1;  // not a result-changing option: allowed, noted
    std::ostringstream log;
    train::Trainer t(o, &log);
    CHECK_THAT(log.str(), Contains("changed option: log_every: 2 -> 1"));
    const train::RunResult r = t.run();
    CHECK(r.step == 4);
    const auto recorded = nlohmann::json::parse(read_bytes(root / "out" / "train.json"));
    CHECK(recorded["lr"] == 1e-2);
    CHECK(recorded["max_steps"] == 4);
    bool saw_lr = false;
    std::ifstream metrics(root / "out" / "metrics.jsonl");
    for (std::string line; std::getline(metrics, line);) {
      const auto rec = nlohmann::json::parse(line);
      if (rec["type"] == "train" && rec["step"] == 3) saw_lr = rec["lr"].get<double>() > 3e-3;
    }
    CHECK(saw_lr);  // the run really uses the new peak lr
  }
  SECTION("max_steps at or below the checkpoint's step says so") {
    try {
      train::Trainer t(o);
      FAIL("resuming a finished run was accepted");
    } catch (const TrainError& e) {
      CHECK_THAT(std::string(e.what()), Contains("nothing to train") && Contains("step 2") && Contains("--max-steps"));
    }
  }
}

TEST_CASE("one run per output directory: a second trainer on the same out is refused at once", "[train]") {
  const TempDir tmp;
  const fs::path root = tmp.path;
  const fs::path data = make_data(root / "data", random_tokens(2000, 64, 13), random_tokens(200, 64, 14), 64, 64);
  TrainOptions o = tiny_options(root, data, "out");
  train::Trainer first(o);
  CHECK_THROWS_WITH(train::Trainer(o), Contains("in use by another process") && Contains(".lock"));
  o.resume = true;
  CHECK_THROWS_WITH(train::Trainer(o), Contains("in use by another process"));
}

TEST_CASE("checkpoint saves that fail keep the last good checkpoint and leave no temporary", "[train]") {
  const TempDir tmp;
  const fs::path root = tmp.path;
  const fs::path data = make_data(root / "data", random_tokens(2000, 64, 15), random_tokens(200, 64, 16), 64, 64);
  TrainOptions o = tiny_options(root, data, "out");
  o.max_steps = 3;
  train::Trainer t(o);
  t.train_step();
  const std::string good = t.save_checkpoint();
  t.train_step();
  // A full disk: files may not grow beyond 64 KiB (EFBIG, as ENOSPC would be), far less than the weights.
  struct rlimit old {};
  getrlimit(RLIMIT_FSIZE, &old);
  struct rlimit small = old;
  small.rlim_cur = 64 * 1024;
  auto* previous_handler = std::signal(SIGXFSZ, SIG_IGN);
  setrlimit(RLIMIT_FSIZE, &small);
  std::string message;
  try {
    t.save_checkpoint();
  } catch (const TrainError& e) {
    message = e.what();
  }
  setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, previous_handler);
  CHECK_THAT(message, Contains("cannot save checkpoint") && Contains("step_000002") && Contains(good));
  CHECK(latest_name(o.out) == "step_000001");
  for (const auto& e : fs::directory_iterator(o.out)) {
    INFO(e.path());
    CHECK(e.path().filename().string().rfind(".tmp", 0) != 0);
  }
  CHECK_NOTHROW(io::load_pretrained(good));
  CHECK(t.save_checkpoint() == (fs::path(o.out) / "step_000002").string());  // space again: it saves
}

TEST_CASE("pruning renames old checkpoints away first, a killed run's leftovers are cleaned on start", "[train]") {
  const TempDir tmp;
  const fs::path root = tmp.path;
  const fs::path data = make_data(root / "data", random_tokens(2000, 64, 17), random_tokens(200, 64, 18), 64, 64);
  TrainOptions o = tiny_options(root, data, "out");
  o.max_steps = 4;
  o.save_every = 1;
  o.keep_checkpoints = 2;
  train::Trainer(o).run();
  CHECK(lckv::testing::entries(o.out) == std::vector<std::string>{".lock", "latest", "metrics.jsonl", "step_000003", "step_000004", "train.json"});
  // What a kill in the middle of a save or a prune leaves behind.
  fs::create_directories(fs::path(o.out) / ".tmp_step_000005");
  fs::create_directories(fs::path(o.out) / ".trash_step_000001.tmp.1.0");
  o.resume = true;
  o.max_steps = 5;
  o.allow_changes = {"max_steps"};
  train::Trainer resumed(o);
  CHECK_FALSE(fs::exists(fs::path(o.out) / ".tmp_step_000005"));
  CHECK_FALSE(fs::exists(fs::path(o.out) / ".trash_step_000001.tmp.1.0"));
}

TEST_CASE("a prompt needs the data's tokenizer, checked before training", "[train]") {
  const TempDir tmp;
  const fs::path root = tmp.path;
  const fs::path data = make_data(root / "data", random_tokens(2000, 64, 19), random_tokens(200, 64, 20), 64, 64);
  TrainOptions o = tiny_options(root, data, "out");
  o.prompt = "In the beginning";
  CHECK_THROWS_WITH(train::Trainer(o), Contains("option prompt") && Contains("tokenizer.model"));
  CHECK_FALSE(fs::exists(root / "out"));
  write_bytes(data / "tokenizer.model", "not a sentencepiece model");
  CHECK_THROWS_WITH(train::Trainer(o), Contains("option prompt") && Contains("tokenizer.model"));
}

TEST_CASE("the sample after training: the prompt's continuation, cut short by a stop signal", "[train]") {
  const TempDir tmp;
  const fs::path root = tmp.path;
  std::vector<std::string> lines;
  for (int i = 0; i < 200; ++i) lines.push_back("in the beginning was the word and the word was " + std::to_string(i));
  std::vector<std::string_view> views(lines.begin(), lines.end());
  data::TokenizerTrainOptions to;
  to.vocab_size = 300;
  const fs::path data = make_data(root / "data", random_tokens(2000, 300, 21), random_tokens(200, 300, 22), 300, 300);
  data::train_tokenizer_from_lines(views, (data / "tokenizer").string(), to);
  TrainOptions o = tiny_options(root, data, "out");
  o.max_steps = 1;
  o.prompt = "in the beginning";
  o.generate_tokens = 5;
  train::Trainer t(o);
  const train::RunResult r = t.run();
  CHECK(r.sample.rfind("in the beginning", 0) == 0);
  CHECK(r.sample.size() > o.prompt.size());
  train::install_stop_handlers();
  train::clear_stop_request();
  std::raise(SIGTERM);
  CHECK(t.generate_sample(o.prompt, 50).empty());
  train::clear_stop_request();
}
