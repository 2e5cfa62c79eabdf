// lckv-bench-throughput: generation throughput under a fixed KV-cache memory budget (the paper's
// Figure 4 and throughput table, scaled to this machine). For every config (same shape, different
// layer_types) and every prompt+generation scenario it binary-searches the largest batch whose
// condensed cache fits the budget, then measures tokens/s = batch x generated tokens / wall time
// (prefill included). It also sweeps the batch size for the first scenario (Figure 4), measures
// per-token decode latency at batch 1, and latency and memory against the cache size with
// StreamingLLM (Figure 5). Random weights: speed does not depend on them. Writes JSON.
#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <iostream>

#include "lckv/dtype.h"
#include "lckv/files.h"
#include "lckv/generate/generate.h"
#include "lckv/openmp_policy.h"
#include "bench_timing.h"

namespace {

struct Scenario {
  int64_t prompt = 0, generate = 0;
};

Scenario parse_scenario(const std::string& s) {
  const auto plus = s.find('+');
  if (plus == std::string::npos) throw std::invalid_argument("scenario '" + s + "' must look like PROMPT+GENERATED, e.g. 5+251");
  Scenario sc{std::stoll(s.substr(0, plus)), std::stoll(s.substr(plus + 1))};
  if (sc.prompt < 1 || sc.generate < 2) throw std::invalid_argument("scenario '" + s + "' needs prompt >= 1 and generated >= 2");
  return sc;
}

struct Model {
  std::string path;
  lckv::LCKVConfig config;
  lckv::LCKVForCausalLM model{nullptr};
};

struct Measurement {
  int64_t batch = 0, cache_bytes = 0, new_tokens = 0;
  double prefill_s = 0, decode_s = 0;
  double total_s() const { return prefill_s + decode_s; }
  double throughput() const { return new_tokens / total_s(); }
  nlohmann::json json(int64_t generated) const {
    return {{"batch", batch},
            {"cache_bytes", cache_bytes},
            {"prefill_s", prefill_s},
            {"decode_s", decode_s},
            {"tokens_per_s", throughput()},
            {"decode_tokens_per_s", new_tokens / decode_s},
            // decode steps after the first token: generated - 1 forward passes of one token
            {"decode_ms_per_step", 1e3 * decode_s / (generated - 1)}};
  }
};

Measurement run(Model& m, int64_t batch, const Scenario& sc, const lckv::GenerationConfig& base,
                std::optional<lckv::StreamingOptions> streaming = std::nullopt, int64_t capacity = 0) {
  std::vector<std::vector<int64_t>> prompts(batch);
  for (auto& p : prompts) {
    torch::Tensor ids = torch::randint(0, m.config.vocab_size, {sc.prompt}, torch::kLong);
    p.assign(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + sc.prompt);
  }
  lckv::GenerationConfig g = base;
  g.max_new_tokens = sc.generate;
  g.streaming = streaming;
  g.cache_capacity = capacity;
  lckv::GenerationResult r = lckv::generate(m.model, prompts, g);
  if (r.stats.steps != sc.generate) throw std::runtime_error("generation stopped early");
  return {batch, r.stats.cache_bytes, r.stats.new_tokens, r.stats.prefill_seconds, r.stats.decode_seconds};
}

}  // namespace

int main(int argc, char** argv) {
  lckv::ensure_passive_openmp(argc, argv);
  CLI::App app{"lckv-bench-throughput: generation throughput at the largest batch a KV-cache budget allows"};
  std::vector<std::string> configs = {"configs/tiny-llama.json", "configs/tiny-lckv-w2.json", "configs/tiny-cla.json",
                                      "configs/tiny-yoco.json"};
  std::vector<std::string> scenario_names = {"5+251", "64+128", "128+128"};
  std::vector<int64_t> streaming_sizes = {64, 128, 256, 512};
  int threads = 2;
  int64_t vocab = 4096, streaming_tokens = 1024, sink = 4, prefill_chunk = 64;
  std::vector<double> budgets_mib = {1024};
  std::string dtype = "bf16", prefill = "iterative", out_path;
  bool sweep = true, latency_only = false;
  int latency_rounds = 5;
  int64_t latency_prompt = 64, latency_new = 64, latency_batch = 32;
  app.add_option("--configs", configs, "config files of one shape (the first is the baseline)")->expected(1, 16);
  app.add_option("--scenarios", scenario_names, "PROMPT+GENERATED token counts");
  app.add_option("--budget-mib", budgets_mib, "memory budgets for the KV cache, MiB (a table for each; the sweep uses the last)");
  app.add_option("--vocab", vocab, "override vocab_size (0 keeps the config's)");
  app.add_option("--dtype", dtype, "bf16 | fp32 weights and cache")->check(CLI::IsMember({"bf16", "fp32"}));
  app.add_option("--prefill", prefill, "exact | iterative")->check(CLI::IsMember({"exact", "iterative"}));
  app.add_option("--prefill-chunk", prefill_chunk, "prompt tokens per prefill chunk (bounds prefill activations)");
  app.add_option("--sweep", sweep, "measure throughput against batch size for the first scenario (Figure 4)");
  app.add_option("--streaming-cache-sizes", streaming_sizes, "StreamingLLM cache sizes for Figure 5 (empty: skip)");
  app.add_option("--streaming-tokens", streaming_tokens, "tokens generated per StreamingLLM run (batch 1)");
  app.add_option("--sink", sink, "StreamingLLM sink tokens");
  app.add_option("--threads", threads, "torch intra-op threads");
  app.add_option("--latency-rounds", latency_rounds, "interleaved rounds of the decode latency part (0: skip it)");
  app.add_option("--latency-prompt", latency_prompt, "prompt tokens of the decode latency part");
  app.add_option("--latency-new", latency_new, "new tokens per run of the decode latency part");
  app.add_option("--latency-batch", latency_batch, "batch of the greedy vs top-p comparison");
  app.add_flag("--latency-only", latency_only, "only the decode latency part (no table, sweep or streaming)");
  app.add_option("--out", out_path, "write the JSON result here too");
  CLI11_PARSE(app, argc, argv);
  try {
    torch::set_num_threads(threads);
    torch::manual_seed(0);
    const auto scalar = lckv::parse_float_dtype(dtype, "--dtype");
    std::vector<Scenario> scenarios;
    for (const auto& s : scenario_names) scenarios.push_back(parse_scenario(s));
    lckv::GenerationConfig base;  // greedy, no stop tokens: every sequence generates the full length
    base.prefill = lckv::parse_prefill_mode(prefill);
    base.prefill_chunk = prefill_chunk;

    std::vector<Model> models;
    nlohmann::json config_json = nlohmann::json::array();
    for (const auto& path : configs) {
      Model m;
      m.path = path;
      m.model = lckv::random_model(path, vocab);
      m.config = m.model->config;
      m.model->to(scalar);
      const auto& c = m.config;
      config_json.push_back({{"config", path},
                             {"layer_types", lckv::format_layer_types(c.layer_types)},
                             {"num_layers", c.num_hidden_layers},
                             {"kv_layers", c.kv_layers().size()},
                             {"kv_bytes_per_token", lckv::CondensedKVCache::bytes_for(c, 1, 1, scalar)},
                             {"memory_ratio_baseline_over_this",
                              double(lckv::CondensedKVCache::bytes_for(models.empty() ? c : models[0].config, 1, 1, scalar)) /
                                  lckv::CondensedKVCache::bytes_for(c, 1, 1, scalar)}});
      models.push_back(std::move(m));
    }
    for (size_t i = 1; i < models.size(); ++i) {
      const auto& a = models[0].config;
      const auto& b = models[i].config;
      if (a.hidden_size != b.hidden_size || a.num_hidden_layers != b.num_hidden_layers ||
          a.num_key_value_heads != b.num_key_value_heads || a.head_dim != b.head_dim) {
        throw std::invalid_argument(models[i].path + " has another shape than " + models[0].path);
      }
    }

    nlohmann::json result = {{"benchmark", "generation_throughput"}, {"threads", threads}, {"dtype", dtype},
                             {"vocab_size", vocab}, {"prefill", prefill},
                             {"prefill_chunk", prefill_chunk}, {"torch", TORCH_VERSION}, {"configs", config_json},
                             {"paper", {{"throughput_ratio_7b_5+8187_24GB", 4.7}, {"throughput_ratio_with_offloading", 26}}}};
    // Decode latency: ms per decode step at batch 1 (greedy) and, at latency_batch, greedy against
    // top-p sampling (p = 0.9) and top-k (k = 50), every config and mode interleaved in each round
    // (the machine may be shared); medians over rounds.
    if (latency_rounds > 0) {
      struct Mode {
        std::string name;
        int64_t batch;
        lckv::SamplingConfig sampling;
        std::vector<double> ms;
      };
      lckv::SamplingConfig top_p{true}, top_k{true};
      top_p.top_p = 0.9;
      top_k.top_k = 50;
      std::vector<std::vector<Mode>> modes(models.size());
      for (auto& ms : modes) {
        ms = {{"batch1_greedy", 1, {}, {}},
              {"batch" + std::to_string(latency_batch) + "_greedy", latency_batch, {}, {}},
              {"batch" + std::to_string(latency_batch) + "_top_p", latency_batch, top_p, {}},
              {"batch" + std::to_string(latency_batch) + "_top_k", latency_batch, top_k, {}}};
      }
      const Scenario sc{latency_prompt, latency_new};
      // A decode step at batch 1 reads every weight once: its floor is the weights' bytes over the memory
      // read rate, measured in each round by summing a buffer far larger than the caches.
      const torch::Tensor stream = torch::ones({int64_t(64) << 20}, torch::kFloat);  // 256 MiB
      std::vector<double> read_gb_per_s;
      for (int r = 0; r <= latency_rounds; ++r) {  // round 0 warms up
        {
          const auto t0 = std::chrono::steady_clock::now();
          const double sum = stream.sum().item<double>();
          const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          if (r > 0 && sum > 0) read_gb_per_s.push_back(double(stream.nbytes()) / s / 1e9);
        }
        for (size_t i = 0; i < models.size(); ++i) {
          for (Mode& mode : modes[i]) {
            lckv::GenerationConfig g = base;
            g.sampling = mode.sampling;
            const Measurement m = run(models[i], mode.batch, sc, g);
            if (r > 0) mode.ms.push_back(1e3 * m.decode_s / (sc.generate - 1));
          }
        }
      }
      auto median = [](std::vector<double> v) {
        std::sort(v.begin(), v.end());
        return v[v.size() / 2];
      };
      nlohmann::json lat = nlohmann::json::array();
      const double read_rate = median(read_gb_per_s);
      for (size_t i = 0; i < models.size(); ++i) {
        nlohmann::json j = {{"config", models[i].path}};
        int64_t weight_bytes = 0;  // what a step reads: all but an untied embedding table (one row of it)
        for (const auto& p : models[i].model->named_parameters()) {
          if (!models[i].config.tie_word_embeddings && p.key() == "model.embed_tokens.weight") continue;
          weight_bytes += p.value().nbytes();
        }
        j["weight_bytes"] = weight_bytes;
        j["batch1_bandwidth_floor_ms"] = 1e3 * double(weight_bytes) / (read_rate * 1e9);
        j["batch1_over_bandwidth_floor"] = median(modes[i][0].ms) / j["batch1_bandwidth_floor_ms"].get<double>();
        for (const Mode& mode : modes[i]) j[mode.name + "_ms_per_step"] = median(mode.ms), j[mode.name + "_rounds_ms"] = mode.ms;
        j["top_p_over_greedy"] = median(modes[i][2].ms) / median(modes[i][1].ms);
        j["top_k_over_greedy"] = median(modes[i][3].ms) / median(modes[i][1].ms);
        std::cerr << "latency " << models[i].path << ": batch 1 " << j["batch1_greedy_ms_per_step"] << " ms/step, top-p/greedy "
                  << j["top_p_over_greedy"] << "\n";
        lat.push_back(j);
      }
      result["decode_latency"] = {{"rounds", latency_rounds}, {"prompt", latency_prompt}, {"new_tokens", latency_new},
                                  {"memory_read_gb_per_s", read_rate}, {"memory_read_rounds_gb_per_s", read_gb_per_s},
                                  {"machine_shared", true}, {"openmp", lckv::bench::openmp_wait_settings()}, {"runs", lat}};
    }
    if (latency_only) {
      std::cout << result.dump(2) << "\n";
      if (!out_path.empty()) lckv::write_file_atomically(out_path, result.dump(2) + "\n");
      return 0;
    }

    // Throughput table: each config at its largest batch, for every budget and scenario.
    nlohmann::json table = nlohmann::json::array();
    int64_t budget = 0;
    for (double mib : budgets_mib) {
      budget = static_cast<int64_t>(mib * 1048576.0);
      for (const Scenario& sc : scenarios) {
        const int64_t capacity = sc.prompt + sc.generate;
        nlohmann::json runs = nlohmann::json::array();
        double base_tps = 0;
        for (Model& m : models) {
          const int64_t max_batch = lckv::max_batch_for_budget(m.config, capacity, scalar, budget);
          const Measurement r = run(m, max_batch, sc, base);
          if (base_tps == 0) base_tps = r.throughput();
          nlohmann::json j = r.json(sc.generate);
          j["config"] = m.path;
          j["max_batch"] = max_batch;
          j["throughput_ratio_vs_baseline"] = r.throughput() / base_tps;
          std::cerr << mib << " MiB " << sc.prompt << "+" << sc.generate << " " << m.path << ": max batch " << max_batch << ", "
                    << r.throughput() << " tokens/s (x" << r.throughput() / base_tps << ")\n";
          runs.push_back(j);
        }
        table.push_back({{"budget_bytes", budget}, {"prompt", sc.prompt}, {"generate", sc.generate},
                         {"capacity", capacity}, {"runs", runs}});
      }
    }
    result["table"] = table;

    // Figure 4: throughput against batch size (powers of two up to each config's largest batch).
    if (sweep && !scenarios.empty()) {
      const Scenario& sc = scenarios[0];
      nlohmann::json curves = nlohmann::json::array();
      for (Model& m : models) {
        const int64_t max_batch = lckv::max_batch_for_budget(m.config, sc.prompt + sc.generate, scalar, budget);
        nlohmann::json points = nlohmann::json::array();
        for (int64_t b = 1;; b = std::min(2 * b, max_batch)) {
          const Measurement r = run(m, b, sc, base);
          points.push_back(r.json(sc.generate));
          std::cerr << "sweep " << m.path << " batch " << b << ": " << r.throughput() << " tokens/s\n";
          if (b == max_batch) break;
        }
        curves.push_back({{"config", m.path}, {"max_batch", max_batch}, {"points", points}});
      }
      result["sweep"] = {{"budget_bytes", budget}, {"prompt", sc.prompt}, {"generate", sc.generate}, {"curves", curves}};
    }

    // Figure 5: StreamingLLM at batch 1, per-token latency and cache memory against the cache size.
    if (!streaming_sizes.empty()) {
      nlohmann::json curves = nlohmann::json::array();
      for (Model& m : models) {
        nlohmann::json points = nlohmann::json::array();
        for (int64_t size : streaming_sizes) {
          const lckv::StreamingOptions opts{sink, std::max<int64_t>(1, size / 16)};
          const Measurement r = run(m, 1, Scenario{5, streaming_tokens}, base, opts, size);
          nlohmann::json j = r.json(streaming_tokens);
          j["cache_size"] = size;
          j["evict_block"] = opts.evict_block;
          points.push_back(j);
          std::cerr << "streaming " << m.path << " cache " << size << ": " << j["decode_ms_per_step"] << " ms/token\n";
        }
        curves.push_back({{"config", m.path}, {"points", points}});
      }
      result["streaming"] = {{"sink", sink}, {"tokens", streaming_tokens}, {"curves", curves}};
    }

    std::cout << result.dump(2) << "\n";
    if (!out_path.empty()) lckv::write_file_atomically(out_path, result.dump(2) + "\n");
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "lckv-bench-throughput: " << e.what() << "\n";
    return 1;
  }
}
