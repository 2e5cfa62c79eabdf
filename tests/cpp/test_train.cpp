// The trainer (csrc/lckv/train): schedule, weight-decay groups, learning, exact resume through a
// stop signal, checkpoints, every bad-input case of the training program, and data parallelism
// (ranks launched as lckv-train processes).
#include <catch2/catch.hpp>

#include <CLI/CLI.hpp>
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "test_files.h"
#include <torch/torch.h>

#include <cmath>
#include <csignal>
#include <filesystem>
#include <chrono>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include "lckv/autocast.h"
#include "lckv/data/shards.h"
#include "lckv/data/tokenizer.h"
#include "lckv/io/checkpoint.h"
#include "lckv/io/convert.h"
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

namespace {

// Whether /proc/cpuinfo's flags list `flag` (the kernel's reading of CPUID, independent of torch's cpuinfo).
std::optional<bool> proc_cpu_flag(const std::string& flag) {
  std::ifstream in("/proc/cpuinfo");
  if (!in) return std::nullopt;
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("flags", 0) != 0) continue;
    std::istringstream words(line.substr(line.find(':') + 1));
    for (std::string w; words >> w;) {
      if (w == flag) return true;
    }
    return false;
  }
  return std::nullopt;
}

}  // namespace

TEST_CASE("dtype auto: bf16 exactly where the CPU computes it natively, a resumed run keeps its checkpoint's",
          "[train]") {
  const auto avx512_bf16 = proc_cpu_flag("avx512_bf16"), amx_bf16 = proc_cpu_flag("amx_bf16");
  if (!avx512_bf16 || !amx_bf16) {
    WARN("no flags line in /proc/cpuinfo: nothing to compare dtype auto with");
    return;
  }
  const bool native = *avx512_bf16 || *amx_bf16;
  const std::string chosen = native ? "bf16" : "fp32", other = native ? "fp32" : "bf16";
  CHECK(native_bf16(torch::kCPU) == native);
  CHECK(resolve_compute_dtype("auto", torch::kCPU) == chosen);
  CHECK(resolve_compute_dtype("fp32", torch::kCPU) == "fp32");
  CHECK_THROWS_WITH(resolve_compute_dtype("fp16", torch::kCPU, "--dtype"), Contains("--dtype") && Contains("fp16"));

  const TempDir tmp;
  const fs::path root = tmp.path;
  const fs::path data = make_data(root / "data", random_tokens(2000, 64, 11), random_tokens(200, 64, 12), 64, 64);
  TrainOptions o = tiny_options(root, data, "auto");
  o.max_steps = 2;
  REQUIRE(o.dtype == "auto");  // the default
  {
    train::Trainer t(o);
    CHECK(t.options().dtype == chosen);
    t.run();
  }
  CHECK(nlohmann::json::parse(read_bytes(root / "auto" / "train.json"))["dtype"] == chosen);

  // A run trained in the other dtype (a checkpoint from another machine, say) resumes in it under auto.
  TrainOptions e = tiny_options(root, data, "other");
  e.max_steps = 2;
  e.dtype = other;
  train::Trainer(e).run();
  e.resume = true;
  e.max_steps = 3;
  e.allow_changes = {"max_steps"};
  SECTION("auto continues in the checkpoint's dtype, and says so") {
    e.dtype = "auto";
    std::ostringstream log;
    train::Trainer t(e, &log);
    CHECK(t.options().dtype == other);
    CHECK_THAT(log.str(), Contains("dtype auto: resuming in the checkpoint's " + other));
    CHECK(t.run().step == 3);
    CHECK(nlohmann::json::parse(read_bytes(root / "other" / "train.json"))["dtype"] == other);
  }
  SECTION("an explicit other dtype is a result-changing change, refused unless allowed") {
    e.dtype = chosen;
    CHECK_THROWS_WITH(train::Trainer(e), Contains("dtype: \"" + other + "\" -> \"" + chosen + "\""));
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
  // A tokenizer the data names is read at start, prompt or not (checkpoints carry it).
  write_bytes(data / "tokenizer.model", "not a sentencepiece model");
  o.prompt.clear();
  CHECK_THROWS_WITH(train::Trainer(o), Contains("the data's tokenizer") && Contains("tokenizer.model") &&
                                           Contains("not a valid SentencePiece model"));
  CHECK_FALSE(fs::exists(root / "out"));
}

TEST_CASE("checkpoints carry the data's tokenizer, and one larger than the model's vocabulary is refused", "[train]") {
  const TempDir tmp;
  const fs::path root = tmp.path;
  std::vector<std::string> lines;
  for (int i = 0; i < 200; ++i) lines.push_back("in the beginning was the word and the word was " + std::to_string(i));
  std::vector<std::string_view> views(lines.begin(), lines.end());
  data::TokenizerTrainOptions to;
  to.vocab_size = 300;
  // The data's meta.json says 64 (the shards fit), but its tokenizer has 300 pieces.
  const fs::path data = make_data(root / "data", random_tokens(2000, 64, 23), random_tokens(200, 64, 24), 64, 64);
  data::train_tokenizer_from_lines(views, (data / "tokenizer").string(), to);
  TrainOptions o = tiny_options(root, data, "out");
  o.max_steps = 2;
  CHECK_THROWS_WITH(train::Trainer(o), Contains((data / "tokenizer.model").string() + " has 300 tokens") &&
                                           Contains("vocab_size is 64"));
  CHECK_FALSE(fs::exists(root / "out"));

  const fs::path data2 = make_data(root / "data2", random_tokens(2000, 300, 25), random_tokens(200, 300, 26), 300, 300);
  fs::copy_file(data / "tokenizer.model", data2 / "tokenizer.model");
  o.data = data2.string();
  const train::RunResult r = train::Trainer(o).run();
  const fs::path copy = fs::path(r.last_checkpoint) / "tokenizer.model";
  REQUIRE(fs::exists(copy));
  CHECK(read_bytes(copy) == read_bytes(data2 / "tokenizer.model"));
  CHECK(data::find_tokenizer(r.last_checkpoint) == copy.string());
  CHECK(data::Tokenizer::load(r.last_checkpoint).encode("in the beginning") ==
        data::Tokenizer::load((data2 / "tokenizer.model").string()).encode("in the beginning"));
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

// ---------------------------------------------------------------------------------------------
// Data parallelism: ranks are lckv-train processes launched as torchrun would (the variables by
// hand), with Gloo over 127.0.0.1.

namespace {

// A TCP port on 127.0.0.1 that was free a moment ago.
int free_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

// lckv-train, built next to this test binary.
std::string train_binary() { return (fs::read_symlink("/proc/self/exe").parent_path() / "lckv-train").string(); }

struct RankRun {
  int status = -1;      // exit code, or 128 + signal
  std::string stderr_text;
  double seconds = 0;   // from launch to exit
};

// Runs lckv-train with run file `run_file` as ranks 0..world-1 (`env` per rank replaces or adds
// variables; launch_vars false: no launch variables), each with `extra[r]` flags. `during(pids)`
// runs while they live. Every rank still alive after `timeout_s`, or `linger_s` after the first
// rank ended, is killed (status -1 then).
std::vector<RankRun> launch(const fs::path& run_file, const fs::path& logs, int world,
                            const std::vector<std::vector<std::string>>& extra = {},
                            const std::vector<std::map<std::string, std::string>>& env = {},
                            const std::function<void(const std::vector<pid_t>&)>& during = {}, double timeout_s = 120,
                            bool launch_vars = true, double linger_s = 60) {
  const int port = free_port();
  std::vector<pid_t> pids;
  fs::create_directories(logs);
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < world; ++r) {
    std::map<std::string, std::string> vars;
    for (char** e = environ; *e; ++e) {
      const std::string kv = *e;
      const auto eq = kv.find('=');
      vars[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
    for (const char* name : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"}) {
      vars.erase(name);
    }
    if (launch_vars) {
      vars["RANK"] = vars["LOCAL_RANK"] = std::to_string(r);
      vars["WORLD_SIZE"] = std::to_string(world);
      vars["MASTER_ADDR"] = "127.0.0.1";
      vars["MASTER_PORT"] = std::to_string(port);
    }
    if (r < static_cast<int>(env.size())) {
      for (const auto& [k, v] : env[r]) {
        if (v.empty()) vars.erase(k);
        else vars[k] = v;
      }
    }
    std::vector<std::string> args = {train_binary(), "--config", run_file.string()};
    if (r < static_cast<int>(extra.size())) args.insert(args.end(), extra[r].begin(), extra[r].end());
    std::vector<std::string> envs;
    for (const auto& [k, v] : vars) envs.push_back(k + "=" + v);
    std::vector<char*> argv, envp;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    for (auto& e : envs) envp.push_back(e.data());
    envp.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    const std::string err = (logs / ("rank" + std::to_string(r) + ".err")).string();
    posix_spawn_file_actions_addopen(&fa, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    pid_t pid = 0;
    REQUIRE(posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), envp.data()) == 0);
    posix_spawn_file_actions_destroy(&fa);
    pids.push_back(pid);
  }
  if (during) during(pids);
  std::vector<RankRun> runs(static_cast<size_t>(world));
  std::vector<bool> done(static_cast<size_t>(world), false);
  double first_exit = -1;
  for (int left = world; left > 0;) {
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (int r = 0; r < world; ++r) {
      int status = 0;
      if (done[r] || waitpid(pids[r], &status, WNOHANG) != pids[r]) continue;
      done[r] = true;
      --left;
      runs[r].status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      runs[r].seconds = elapsed;
      if (first_exit < 0) first_exit = elapsed;
    }
    // Past the timeout, or `linger_s` after the first rank ended, the rest are killed (stopped ones too).
    if (left > 0 && (elapsed > timeout_s || (first_exit >= 0 && elapsed - first_exit > linger_s))) {
      for (int r = 0; r < world; ++r) {
        if (done[r]) continue;
        kill(pids[r], SIGKILL);
        waitpid(pids[r], nullptr, 0);
        done[r] = true;
        --left;
        runs[r].seconds = elapsed;  // status stays -1
      }
    }
    if (left > 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (int r = 0; r < world; ++r) runs[r].stderr_text = read_bytes(logs / ("rank" + std::to_string(r) + ".err"));
  return runs;
}

fs::path write_run_file(const fs::path& path, const TrainOptions& o) {
  write_bytes(path, o.to_json().dump(2));
  return path;
}

// max over tensors of ||a - b|| / ||b||.
// Weights after a few steps on 1 rank and on 2 (or resumed across them) differ by fp32 rounding of the reduction
// orders (two ranks' partial sums vs one batch, and the matmuls' blocking at other row counts): 1.0e-6-1.1e-6
// relative seen (an AVX2-only CPU's MKL; the tiled attention on AVX-512). A wrong average or a lost shard moves
// the weights by >= 1e-3 (an Adam step is lr = 3e-3 per element).
constexpr double kRankOrderTolerance = 1e-5;

double max_relative_difference(const fs::path& a_dir, const fs::path& b_dir) {
  const auto a = io::load_safetensors((a_dir / "model.safetensors").string());
  const auto b = io::load_safetensors((b_dir / "model.safetensors").string());
  REQUIRE(a.size() == b.size());
  double worst = 0;
  for (const auto& [name, t] : a) {
    const torch::Tensor u = t.to(torch::kDouble), v = b.at(name).to(torch::kDouble);
    worst = std::max(worst, (u - v).norm().item<double>() / std::max(v.norm().item<double>(), 1e-30));
  }
  return worst;
}

std::vector<nlohmann::json> records(const fs::path& metrics, const std::string& type) {
  std::vector<nlohmann::json> out;
  std::ifstream in(metrics);
  for (std::string line; std::getline(in, line);) {
    const auto rec = nlohmann::json::parse(line);
    if (rec["type"] == type) out.push_back(rec);
  }
  return out;
}

TrainOptions parallel_options(const fs::path& root, const fs::path& data, const std::string& out) {
  TrainOptions o = tiny_options(root, data, out);
  o.dtype = "fp32";
  o.threads = 1;
  o.grad_accum = 2;
  o.max_steps = 5;
  o.eval_every = 0;
  o.log_every = 1;
  o.dist_timeout_s = 30;
  o.bucket_mb = 0.01;  // several buckets for the tiny model: exercises their ordering and overlap
  return o;
}

}  // namespace

TEST_CASE("launch variables: all five or none, and bad values are named", "[train][distributed]") {
  using Env = std::map<std::string, std::string>;
  auto read = [](const Env& env) {
    return train::read_launch_env([&](const std::string& k) -> std::optional<std::string> {
      const auto it = env.find(k);
      if (it == env.end()) return std::nullopt;
      return it->second;
    });
  };
  CHECK(!read({}));
  const Env good = {{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "127.0.0.1"},
                    {"MASTER_PORT", "29555"}};
  const auto e = read(good);
  REQUIRE(e);
  CHECK((e->rank == 1 && e->world_size == 2 && e->local_rank == 1 && e->master_port == 29555 && !e->agent_store));
  Env agent = good;
  agent["TORCHELASTIC_USE_AGENT_STORE"] = "True";
  CHECK(read(agent)->agent_store);
  CHECK_THROWS_WITH(read({{"RANK", "0"}}), Contains("RANK set but WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not"));
  auto with = [&](const std::string& k, const std::string& v) {
    Env env = good;
    env[k] = v;
    return env;
  };
  CHECK_THROWS_WITH(read(with("RANK", "2")), Contains("RANK 2 is not below WORLD_SIZE 2"));
  CHECK_THROWS_WITH(read(with("WORLD_SIZE", "two")), Contains("WORLD_SIZE='two'"));
  CHECK_THROWS_WITH(read(with("MASTER_PORT", "70000")), Contains("MASTER_PORT='70000'"));
  CHECK_THROWS_WITH(read(with("RANK", "-1")), Contains("RANK='-1'"));
  CHECK_THROWS_WITH(read(with("LOCAL_RANK", "3")), Contains("LOCAL_RANK 3 exceeds RANK 1"));
  CHECK_THROWS_WITH(read(with("MASTER_ADDR", "")), Contains("MASTER_ADDR is empty"));
}

TEST_CASE("data parallel: 2 ranks end where 1 rank with the whole batch ends, with and without --shard-optimizer",
          "[train][distributed]") {
  const TempDir tmp;
  const fs::path root = tmp.path;
  const fs::path data = make_data(root / "data", random_tokens(3000, 64, 21), random_tokens(400, 64, 22), 64, 64);
  TrainOptions o = parallel_options(root, data, "one");
  const fs::path run = write_run_file(root / "run.json", o);
  REQUIRE(launch(run, root / "logs1", 1, {}, {}, {}, 120, /*launch_vars=*/false)[0].status == 0);
  for (const bool shard : {false, true}) {
    INFO("shard_optimizer " << shard);
    const std::string out = shard ? "two_sharded" : "two";
    std::vector<std::string> flags = {"--out", (root / out).string()};
    if (shard) flags.push_back("--shard-optimizer");
    const auto runs = launch(run, root / ("logs_" + out), 2, {flags, flags});
    INFO(runs[0].stderr_text << "\n---\n" << runs[1].stderr_text);
    REQUIRE(runs[0].status == 0);
    REQUIRE(runs[1].status == 0);
    CHECK(runs[1].stderr_text.empty());  // rank 0 alone logs
    CHECK(fs::exists(root / out / "step_000005" / "optimizer.pt"));
    const double diff = max_relative_difference(root / "one" / "step_000005", root / out / "step_000005");
    INFO("max relative difference " << diff);
    CHECK(diff <= kRankOrderTolerance);
    CHECK(diff > 0);  // two processes really summed their halves (not one rank computing everything)
    // The same losses and validation, each step recorded once.
    const auto a = records(root / "one" / "metrics.jsonl", "train"), b = records(root / out / "metrics.jsonl", "train");
    REQUIRE(a.size() == 5);
    REQUIRE(b.size() == 5);
    for (size_t i = 0; i < a.size(); ++i) {
      CHECK(b[i]["step"] == a[i]["step"]);
      CHECK(b[i]["loss"].get<double>() == Approx(a[i]["loss"].get<double>()).epsilon(1e-6));
      CHECK(b[i]["grad_norm"].get<double>() == Approx(a[i]["grad_norm"].get<double>()).epsilon(1e-5));
      CHECK(b[i]["world_size"] == 2);
    }
    const auto ea = records(root / "one" / "metrics.jsonl", "eval"), eb = records(root / out / "metrics.jsonl", "eval");
    REQUIRE((ea.size() == 1 && eb.size() == 1));
    CHECK(eb[0]["val_loss"].get<double>() == Approx(ea[0]["val_loss"].get<double>()).epsilon(1e-6));
    // All gradients cross once per step, whatever m and b; sharding halves the optimizer state.
    int64_t param_bytes = 0;
    for (const auto& [name, t] : io::load_safetensors((root / "one" / "step_000005" / "model.safetensors").string())) {
      param_bytes += t.numel() * 4;
    }
    const int64_t reduced = b.back()["bytes_reduced_per_step"].get<int64_t>();
    CHECK(reduced >= param_bytes);
    CHECK(reduced < param_bytes + 2 * 4 * 64);  // the padding of the buckets to even sizes only
    // The reduction overlaps the backward: buckets start as soon as their gradients are complete.
    CHECK(b.back()["buckets"].get<int64_t>() > 4);
    CHECK(b.back()["buckets_reduced_during_backward"].get<int64_t>() > 0);
    const double state = static_cast<double>(b.back()["optimizer_state_bytes"].get<int64_t>());
    if (shard) CHECK(state == Approx(param_bytes).epsilon(0.01));  // half of 2 fp32 moments
    else CHECK(state == 2.0 * param_bytes);
  }
}

TEST_CASE("data parallel: a 2-rank checkpoint resumes on 1 rank and a 1-rank checkpoint on 2 ranks",
          "[train][distributed]") {
  const TempDir tmp;
  const fs::path root = tmp.path;
  const fs::path data = make_data(root / "data", random_tokens(3000, 64, 23), random_tokens(300, 64, 24), 64, 64);
  TrainOptions o = parallel_options(root, data, "one");
  o.max_steps = 6;
  o.save_every = 3;
  const fs::path run = write_run_file(root / "run.json", o);
  // The references: 6 uninterrupted steps on 1 and on 2 sharded ranks, checkpoints at 3 and 6.
  REQUIRE(launch(run, root / "logs1", 1, {}, {}, {}, 120, false)[0].status == 0);
  const std::vector<std::string> two = {"--out", (root / "two").string(), "--shard-optimizer"};
  auto r2 = launch(run, root / "logs2", 2, {two, two});
  INFO(r2[0].stderr_text);
  REQUIRE((r2[0].status == 0 && r2[1].status == 0));
  // Keep only step 3 of each, then finish the 1-rank run on 2 ranks and the 2-rank run on 1.
  for (const char* out : {"one", "two"}) {
    fs::remove_all(root / out / "step_000006");
    write_bytes(root / out / "latest", "step_000003\n");
  }
  const std::vector<std::string> resume_one = {"--resume"};
  auto a = launch(run, root / "logs3", 2, {resume_one, resume_one});
  INFO(a[0].stderr_text);
  REQUIRE((a[0].status == 0 && a[1].status == 0));
  auto b = launch(run, root / "logs4", 1, {{"--resume", "--out", (root / "two").string()}}, {}, {}, 120, false);
  INFO(b[0].stderr_text);
  REQUIRE(b[0].status == 0);
  // Either way the weights are those of the uninterrupted run (the loader position and the AdamW state crossed).
  TrainOptions ref = o;
  ref.out = (root / "ref").string();
  REQUIRE(launch(write_run_file(root / "ref.json", ref), root / "logs5", 1, {}, {}, {}, 120, false)[0].status == 0);
  CHECK(max_relative_difference(root / "one" / "step_000006", root / "ref" / "step_000006") <= kRankOrderTolerance);
  CHECK(max_relative_difference(root / "two" / "step_000006", root / "ref" / "step_000006") <= kRankOrderTolerance);
}

TEST_CASE("data parallel: a killed or hung rank makes the other exit with a clear message, and the checkpoint stays",
          "[train][distributed]") {
  const TempDir tmp;
  const fs::path root = tmp.path;
  const fs::path data = make_data(root / "data", random_tokens(3000, 64, 25), random_tokens(300, 64, 26), 64, 64);
  TrainOptions o = parallel_options(root, data, "out");
  o.max_steps = 100000;
  o.save_every = 2;
  o.dist_timeout_s = 8;
  const fs::path run = write_run_file(root / "run.json", o);
  for (const int sig : {SIGKILL, SIGSTOP}) {
    INFO("signal " << sig);
    const fs::path out = root / ("out" + std::to_string(sig));
    const std::vector<std::string> flags = {"--out", out.string()};
    double signalled_at = 0;
    const auto t0 = std::chrono::steady_clock::now();
    const auto runs = launch(run, root / ("logs" + std::to_string(sig)), 2, {flags, flags}, {},
                             [&](const std::vector<pid_t>& pids) {
                               // Wait for the first checkpoint, then take rank 1 out in mid-run.
                               for (int i = 0; i < 600 && !fs::exists(out / "latest"); ++i) {
                                 std::this_thread::sleep_for(std::chrono::milliseconds(100));
                               }
                               std::this_thread::sleep_for(std::chrono::milliseconds(300));
                               kill(pids[1], sig);
                               signalled_at = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
                             },
                             /*timeout_s=*/90, /*launch_vars=*/true, /*linger_s=*/2);
    INFO(runs[0].stderr_text);
    CHECK(runs[0].status == 1);
    CHECK(runs[0].seconds - signalled_at < (sig == SIGKILL ? 20.0 : 8.0 + 20.0));
    CHECK_THAT(runs[0].stderr_text, Contains("rank 0:"));
    CHECK_THAT(runs[0].stderr_text, Contains("another rank died, hung past the timeout"));
    // The last checkpoint is complete and loads.
    const std::string latest = latest_name(out.string());
    for (const char* f : {"config.json", "model.safetensors", "optimizer.pt", "trainer_state.json"}) {
      CHECK(fs::exists(out / latest / f));
    }
    CHECK_NOTHROW(io::load_pretrained((out / latest).string()));
  }
}

TEST_CASE("data parallel: bad launches are refused by name, without hanging", "[train][distributed]") {
  const TempDir tmp;
  const fs::path root = tmp.path;
  const fs::path data = make_data(root / "data", random_tokens(3000, 64, 27), random_tokens(300, 64, 28), 64, 64);
  TrainOptions o = parallel_options(root, data, "out");
  o.dist_timeout_s = 5;
  const fs::path run = write_run_file(root / "run.json", o);
  SECTION("ranks with different options or model configs") {
    auto r = launch(run, root / "l1", 2, {{}, {"--lr", "0.002"}});
    for (const auto& x : r) {
      CHECK(x.status == 1);
      CHECK_THAT(x.stderr_text, Contains("rank 1's run options differs from rank 0's: field 'lr' is 0.002 (rank 0: 0.003)"));
    }
    const fs::path other = write_model_config(root / "other.json", 48);
    r = launch(run, root / "l2", 2, {{}, {"--model-config", other.string()}});
    for (const auto& x : r) {
      CHECK(x.status == 1);
      CHECK_THAT(x.stderr_text, Contains("rank 1's model config differs from rank 0's: field 'head_dim' is 12 (rank 0: 8), "
                                         "field 'hidden_size' is 48 (rank 0: 32)"));
    }
  }
  SECTION("a rank that fails to start is named by the others") {
    auto r = launch(run, root / "l3", 2, {{}, {"--data", (root / "nowhere").string()}});
    CHECK(r[0].status == 1);
    CHECK_THAT(r[0].stderr_text, Contains("rank 1 failed to start:"));
    CHECK_THAT(r[0].stderr_text, Contains("nowhere"));
    CHECK(r[1].status == 1);
  }
  SECTION("a world size that does not divide the global batch") {
    auto r = launch(run, root / "l4", 3, {});
    for (const auto& x : r) {
      CHECK(x.status == 1);
      CHECK_THAT(x.stderr_text, Contains("batch_size 4 (the global micro-batch) is not divisible by WORLD_SIZE 3"));
    }
  }
  SECTION("partial launch variables") {
    auto r = launch(run, root / "l5", 1, {}, {{{"RANK", "0"}}}, {}, 60, /*launch_vars=*/false);
    CHECK(r[0].status == 1);
    CHECK_THAT(r[0].stderr_text, Contains("launch variables: RANK set but WORLD_SIZE"));
  }
  SECTION("a port in use") {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    REQUIRE(listen(fd, 4) == 0);
    socklen_t len = sizeof a;
    getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    const std::string port = std::to_string(ntohs(a.sin_port));
    auto r = launch(run, root / "l6", 2, {}, {{{"MASTER_PORT", port}}, {{"MASTER_PORT", port}}}, {}, 60);
    close(fd);
    CHECK(r[0].status == 1);
    CHECK_THAT(r[0].stderr_text, Contains("the port is in use"));
    CHECK(r[1].status == 1);  // it reached our socket, which never answers: the timeout ends it
    CHECK(r[1].seconds < 30);
  }
}

TEST_CASE("init_from starts from a checkpoint's weights at step 0 with a fresh optimizer, and such a run resumes exactly",
          "[train][init_from]") {
  const TempDir tmp;
  const fs::path root = tmp.path;
  const fs::path data = make_data(root / "data", random_tokens(3000, 64, 1), random_tokens(300, 64, 2), 64, 64);
  TrainOptions pre = tiny_options(root, data, "pre");
  pre.max_steps = 4;
  train::Trainer(pre).run();
  // A plain-Llama conversion of the pretrained LCKV run (its run directory names the checkpoint).
  io::ConvertOptions convert;
  convert.layer_types = "0_1_2_3";
  convert.kv_init = io::KVInit::kCopy;
  io::convert_checkpoint((root / "pre").string(), (root / "llama").string(), convert);

  TrainOptions o = tiny_options(root, data, "whole");
  o.model_config.clear();
  o.init_from = (root / "llama").string();
  std::vector<double> whole;
  {
    train::Trainer t(o);
    CHECK(t.step() == 0);
    LCKVForCausalLM start = io::load_pretrained((root / "llama").string());
    CHECK(format_layer_types(t.model()->config.layer_types) == "0_1_2_3");
    for (const auto& item : start->named_parameters()) {
      INFO(item.key());
      CHECK(torch::equal(item.value(), t.model()->named_parameters()[item.key()]));
    }
    t.run([&](const train::StepStats& s) { whole.push_back(s.loss); });
  }
  REQUIRE(whole.size() == 8);

  o.out = (root / "split").string();
  std::vector<double> split;
  {
    train::install_stop_handlers();
    train::clear_stop_request();
    train::Trainer first(o);
    first.run([&](const train::StepStats& s) {
      split.push_back(s.loss);
      if (s.step == 3) std::raise(SIGTERM);
    });
    train::clear_stop_request();
  }
  o.resume = true;
  train::Trainer resumed(o);
  CHECK(resumed.step() == 3);
  resumed.run([&](const train::StepStats& s) { split.push_back(s.loss); });
  REQUIRE(split.size() == whole.size());
  for (std::size_t i = 0; i < whole.size(); ++i) CHECK(split[i] == whole[i]);

  // A model_config given too must equal the checkpoint's.
  TrainOptions both = tiny_options(root, data, "both");
  both.init_from = (root / "llama").string();
  CHECK_THROWS_WITH(train::Trainer(both), Contains("differs from the init_from checkpoint's") &&
                                              Contains("layer_types \"0_2_2_3\" vs \"0_1_2_3\""));
  both.init_from = (root / "pre").string();  // the run directory: the same model as model.json
  CHECK(train::Trainer(both).step() == 0);
  both.out = (root / "none").string();
  both.init_from = (root / "nowhere").string();
  CHECK_THROWS_WITH(train::Trainer(both), Contains("option init_from") && Contains("nowhere"));
}
