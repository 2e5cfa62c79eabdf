// lckv-bench-attention (CUDA): the condensed attention kernels against PyTorch on one GPU, side by
// side in one process, and the model end to end. Writes JSON.
//  * forward / backward TFLOP/s of strict-causal (diagonal-masked) attention, ours vs
//    scaled_dot_product_attention forced to the flash backend computing the same result by the
//    shift trick (queries 1..T-1 attend causally to keys 0..T-2; query 0 sees nothing), bf16,
//    hidden 2048 (D = 64: 32 heads, D = 128: 16 heads), 16k tokens per batch;
//  * decode (T = 1) achieved memory bandwidth over the KV cache, TinyLlama-1.1B heads (32 query,
//    4 KV, D 64), bf16, against the card's nominal peak and a measured device copy;
//  * training tokens/s (bf16 autocast, forward + backward) and generation tokens/s (bf16, greedy)
//    of the TinyLlama-1.1B shape, Llama identity vs LCKV w=2, and its decode steps dynamic vs static
//    vs replayed from a CUDA graph (GenerationConfig::decode_step) at batch 1 and --gen-batch.
//  * the paper's generation scenarios (5 + 8187 and 512 + 1024 tokens) at the largest batch whose cache
//    fits in the card's memory, LCKV over Llama throughput next to the paper's 4.7x (7B, 24 GB).
// --parts picks kernels (the first two), e2e (the third), scenarios (the last) or all.
#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <ATen/Context.h>
#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <iostream>
#include <map>
#include <algorithm>

#include "lckv/openmp_policy.h"
#include "lckv/files.h"
#include "lckv/autocast.h"
#include "lckv/generate/generate.h"
#include "lckv/model/lckv_model.h"
#include "lckv/ops/condensed_attention.h"

namespace {

using Clock = std::chrono::steady_clock;

// Mean milliseconds of fn() after two warm-up calls, repeated until at least `min_ms` have passed.
template <typename F>
double time_ms(F&& fn, double min_ms = 100, int max_iters = 200) {
  fn();
  fn();
  torch::cuda::synchronize();
  int iters = 0;
  const auto t0 = Clock::now();
  double elapsed = 0;
  do {
    fn();
    ++iters;
    torch::cuda::synchronize();
    elapsed = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  } while (elapsed < min_ms && iters < max_iters);
  return elapsed / iters;
}

// The card's nominal memory bandwidth from its clock and bus width (0 if the driver won't say).
double nominal_peak_gbps(int device) {
  int clock_khz = 0, bus_bits = 0;
  if (cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return 2.0 * clock_khz * 1e3 * bus_bits / 8 / 1e9;  // double data rate
}

// Device-to-device copy bandwidth, bytes read + written.
double measured_copy_gbps() {
  torch::Tensor src = torch::empty({int64_t{1} << 30}, torch::TensorOptions().dtype(torch::kByte).device(torch::kCUDA));
  torch::Tensor dst = torch::empty_like(src);
  const double ms = time_ms([&] { dst.copy_(src); });
  return 2.0 * src.numel() / (ms * 1e-3) / 1e9;
}

nlohmann::json bench_attention(const std::vector<int64_t>& seq_lens, const std::vector<int64_t>& head_dims,
                               int64_t tokens_per_batch) {
  // SDPA forced to its flash backend here only: the decode and end-to-end parts after this one (the
  // model's masked SDPA calls need the memory-efficient or math backends) get the flags back.
  auto& ctx = at::globalContext();
  struct RestoreSdpFlags {
    at::Context& ctx;
    bool flash, mem_efficient, math, cudnn;
    ~RestoreSdpFlags() {
      ctx.setSDPUseFlash(flash);
      ctx.setSDPUseMemEfficient(mem_efficient);
      ctx.setSDPUseMath(math);
      ctx.setSDPUseCuDNN(cudnn);
    }
  } restore{ctx, ctx.userEnabledFlashSDP(), ctx.userEnabledMemEfficientSDP(), ctx.userEnabledMathSDP(),
            ctx.userEnabledCuDNNSDP()};
  ctx.setSDPUseFlash(true);
  ctx.setSDPUseMemEfficient(false);
  ctx.setSDPUseMath(false);
  ctx.setSDPUseCuDNN(false);
  nlohmann::json rows = nlohmann::json::array();
  const auto opts = torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA);
  for (int64_t D : head_dims) {
    for (int64_t T : seq_lens) {
      const int64_t H = 2048 / D, B = std::max<int64_t>(1, tokens_per_batch / T);
      torch::manual_seed(0);
      torch::Tensor q = torch::randn({B, H, T, D}, opts), k = torch::randn({B, H, T, D}, opts),
                    v = torch::randn({B, H, T, D}, opts), g = torch::randn({B, H, T, D}, opts);
      lckv::ops::AttentionParams p;
      p.mask.strict = true;

      auto [out, lse] = lckv::ops::condensed_attention_forward(q, k, v, p);
      const double ours_fwd = time_ms([&] { lckv::ops::condensed_attention_forward(q, k, v, p); });
      const double ours_bwd = time_ms([&] { lckv::ops::condensed_attention_backward(g, q, k, v, out, lse, p); });

      // The shift trick: strict attention of queries 1..T-1 = causal attention over keys 0..T-2.
      torch::Tensor qs = q.narrow(2, 1, T - 1).contiguous().requires_grad_();
      torch::Tensor ks = k.narrow(2, 0, T - 1).contiguous().requires_grad_();
      torch::Tensor vs = v.narrow(2, 0, T - 1).contiguous().requires_grad_();
      torch::Tensor gs = g.narrow(2, 1, T - 1).contiguous();
      torch::Tensor sdpa_out;
      const double sdpa_fwd = time_ms([&] {
        torch::NoGradGuard no_grad;
        sdpa_out = at::scaled_dot_product_attention(qs, ks, vs, {}, 0.0, true);
      });
      const double max_diff = (sdpa_out.to(torch::kFloat) - out.narrow(2, 1, T - 1).to(torch::kFloat)).abs().max().item<double>();
      torch::Tensor graph_out = at::scaled_dot_product_attention(qs, ks, vs, {}, 0.0, true);
      const double sdpa_bwd = time_ms([&] { graph_out.backward(gs, /*retain_graph=*/true); });

      // Visible (query, key) pairs of strict attention: T(T-1)/2 per head.
      const double flops_fwd = 4.0 * B * H * D * (static_cast<double>(T) * (T - 1) / 2);
      const double flops_bwd = 2.5 * flops_fwd;
      auto tflops = [](double flops, double ms) { return flops / (ms * 1e-3) / 1e12; };
      nlohmann::json row = {{"D", D},
                            {"T", T},
                            {"batch", B},
                            {"heads", H},
                            {"ours_fwd_ms", ours_fwd},
                            {"sdpa_flash_fwd_ms", sdpa_fwd},
                            {"ours_bwd_ms", ours_bwd},
                            {"sdpa_flash_bwd_ms", sdpa_bwd},
                            {"ours_fwd_tflops", tflops(flops_fwd, ours_fwd)},
                            {"sdpa_flash_fwd_tflops", tflops(flops_fwd, sdpa_fwd)},
                            {"ours_bwd_tflops", tflops(flops_bwd, ours_bwd)},
                            {"sdpa_flash_bwd_tflops", tflops(flops_bwd, sdpa_bwd)},
                            {"fwd_ratio", sdpa_fwd / ours_fwd},
                            {"bwd_ratio", sdpa_bwd / ours_bwd},
                            {"max_abs_diff_vs_sdpa", max_diff}};
      std::cerr << row.dump() << "\n";
      rows.push_back(row);
    }
  }
  return rows;
}

nlohmann::json bench_decode(const std::vector<int64_t>& batches, const std::vector<int64_t>& contexts, double peak_gbps,
                            double copy_gbps) {
  nlohmann::json rows = nlohmann::json::array();
  const int64_t Hq = 32, Hkv = 4, D = 64;  // TinyLlama-1.1B
  const auto opts = torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA);
  for (int64_t B : batches) {
    for (int64_t S : contexts) {
      torch::Tensor q = torch::randn({B, Hq, 1, D}, opts);
      torch::Tensor k = torch::randn({B, Hkv, S, D}, opts), v = torch::randn({B, Hkv, S, D}, opts);
      lckv::ops::AttentionParams p;
      p.mask.strict = true;  // a layer attending top: the new token sees the S cached keys
      p.mask.q_offset = S;
      const double ms = time_ms([&] { lckv::ops::condensed_attention_forward(q, k, v, p); }, 50, 1000);
      // SDPA on the same work (the token sees every cached key: no mask), whichever backend it picks, GQA native.
      torch::Tensor sdpa_out;
      const double sdpa_ms = time_ms(
          [&] { sdpa_out = at::scaled_dot_product_attention(q, k, v, {}, 0.0, false, std::nullopt, true); }, 50, 1000);
      const torch::Tensor ours = std::get<0>(lckv::ops::condensed_attention_forward(q, k, v, p));
      const double max_diff = (sdpa_out.to(torch::kFloat) - ours.to(torch::kFloat)).abs().max().item<double>();
      const double bytes = 2.0 * B * Hkv * S * D * 2;  // K and V, bf16
      const double gbps = bytes / (ms * 1e-3) / 1e9;
      nlohmann::json row = {{"batch", B}, {"context", S}, {"D", D}, {"ms", ms}, {"gbps", gbps},
                            {"fraction_of_peak", peak_gbps > 0 ? gbps / peak_gbps : 0.0},
                            {"fraction_of_copy", gbps / copy_gbps}, {"sdpa_ms", sdpa_ms},
                            {"ratio", sdpa_ms / ms}, {"max_abs_diff_vs_sdpa", max_diff}};
      std::cerr << row.dump() << "\n";
      rows.push_back(row);
    }
  }
  return rows;
}

// `batch` prompts of `length` uniformly random token ids below `vocab` (from torch's default generator).
std::vector<std::vector<int64_t>> random_prompts(int64_t batch, int64_t length, int64_t vocab) {
  const torch::Tensor ids = torch::randint(0, vocab, {batch, length}, torch::kLong);
  const auto id = ids.accessor<int64_t, 2>();
  std::vector<std::vector<int64_t>> prompts(batch, std::vector<int64_t>(length));
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < length; ++t) prompts[b][t] = id[b][t];
  }
  return prompts;
}

// Decode steps dynamic vs static vs cuda_graph (DecodeStep), interleaved over rounds, at each batch: the
// decode ms per step of each timed round and the best of them (a cuda_graph call includes its one capture) and whether its greedy tokens
// equal the dynamic ones (bf16: a near-tie may flip; the fp32 equality is the [cuda] test's).
nlohmann::json bench_decode_steps(lckv::LCKVForCausalLM& model, const lckv::LCKVConfig& config,
                                  const std::vector<int64_t>& batches, int64_t prompt, int64_t new_tokens) {
  nlohmann::json rows = nlohmann::json::array();
  const lckv::DecodeStep steps[] = {lckv::DecodeStep::kDynamic, lckv::DecodeStep::kStatic, lckv::DecodeStep::kCudaGraph};
  for (int64_t batch : batches) {
    const std::vector<std::vector<int64_t>> prompts = random_prompts(batch, prompt, config.vocab_size);
    std::map<std::string, std::vector<double>> ms;
    std::map<std::string, std::vector<std::vector<int64_t>>> tokens;
    for (int round = 0; round < 3; ++round) {  // round 0 warms up
      for (lckv::DecodeStep step : steps) {
        lckv::GenerationConfig gc;
        gc.max_new_tokens = new_tokens;
        gc.decode_step = step;
        torch::cuda::synchronize();
        const lckv::GenerationResult r = lckv::generate(model, prompts, gc);
        if (round == 0) continue;
        ms[lckv::to_string(step)].push_back(1e3 * r.stats.decode_seconds / std::max<int64_t>(1, r.stats.steps - 1));
        tokens[lckv::to_string(step)] = r.tokens;
      }
    }
    nlohmann::json row = {{"batch", batch}, {"prompt", prompt}, {"new_tokens", new_tokens}};
    const double dynamic_ms = *std::min_element(ms["dynamic"].begin(), ms["dynamic"].end());
    for (lckv::DecodeStep step : steps) {
      const std::string name = lckv::to_string(step);
      const double best = *std::min_element(ms[name].begin(), ms[name].end());
      row[name] = {{"ms_per_step", ms[name]}, {"best_ms_per_step", best}, {"speedup_vs_dynamic", dynamic_ms / best},
                   {"tokens_equal_dynamic", tokens[name] == tokens["dynamic"]}};
    }
    std::cerr << row.dump() << "\n";
    rows.push_back(row);
  }
  return rows;
}

nlohmann::json bench_end_to_end(const std::vector<std::string>& configs, int64_t seq_len, int64_t batch,
                                int64_t gen_batch, int64_t prompt, int64_t new_tokens, int64_t decode_step_tokens) {
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& path : configs) {
    torch::manual_seed(0);
    lckv::LCKVForCausalLM model = lckv::random_model(path);
    const lckv::LCKVConfig& config = model->config;
    nlohmann::json row = {{"config", path}, {"layer_types", lckv::format_layer_types(config.layer_types)}};
    model->to(torch::kCUDA);
    // Training step: fp32 weights, bf16 autocast, forward + backward.
    torch::Tensor ids = torch::randint(0, config.vocab_size, {batch, seq_len},
                                       torch::TensorOptions().dtype(torch::kLong).device(torch::kCUDA));
    const double ms = time_ms(
        [&] {
          {
            lckv::AutocastScope autocast(at::kCUDA, at::kBFloat16);
            model->forward(ids, ids).loss.backward();
          }
          model->zero_grad();
        },
        1000, 3);
    row["train_seq_len"] = seq_len;
    row["train_batch"] = batch;
    row["train_step_ms"] = ms;
    row["train_tokens_per_s"] = batch * seq_len / (ms * 1e-3);
    // Generation: bf16 weights and cache, greedy, the config's prefill iterations.
    model->to(torch::kBFloat16);
    model->eval();
    torch::NoGradGuard no_grad;
    const std::vector<std::vector<int64_t>> prompts = random_prompts(gen_batch, prompt, config.vocab_size);
    lckv::GenerationConfig gc;
    gc.max_new_tokens = new_tokens;
    lckv::generate(model, prompts, gc);  // warm-up
    torch::cuda::synchronize();
    const lckv::GenerationResult r = lckv::generate(model, prompts, gc);
    const double s = r.stats.prefill_seconds + r.stats.decode_seconds;
    row["gen_batch"] = gen_batch;
    row["gen_prompt"] = prompt;
    row["gen_new_tokens"] = new_tokens;
    row["gen_seconds"] = s;
    row["gen_tokens_per_s"] = r.stats.new_tokens / s;
    row["gen_cache_bytes"] = r.stats.cache_bytes;
    row["decode_steps"] = bench_decode_steps(model, config, {1, gen_batch}, prompt, decode_step_tokens);
    std::cerr << row.dump() << "\n";
    rows.push_back(row);
  }
  return rows;
}

// The paper's generation scenarios (prompt + new tokens, e.g. 5 + 8187 and 512 + 1024) on the TinyLlama-1.1B
// shape: the largest batch whose condensed cache fits in `memory_fraction` of the free device memory after
// `reserve_gb` for weights and activations (max_batch_for_budget; capped at max_batch), bf16, greedy, the
// config's iterative prefill in chunks of 64. At most `max_steps` decode steps are timed (the full scenario
// when it is >= new tokens; fewer give early-context throughput, said in the row).
nlohmann::json bench_scenarios(const std::vector<std::string>& configs, const std::vector<int64_t>& scenarios,
                               int64_t max_steps, double memory_fraction, double reserve_gb, int64_t max_batch) {
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& path : configs) {
    torch::manual_seed(0);
    lckv::LCKVForCausalLM model = lckv::random_model(path);
    model->to(torch::kCUDA, torch::kBFloat16);
    model->eval();
    torch::NoGradGuard no_grad;
    const lckv::LCKVConfig& config = model->config;
    for (size_t i = 0; i + 1 < scenarios.size(); i += 2) {
      const int64_t prompt = scenarios[i], new_tokens = scenarios[i + 1], capacity = prompt + new_tokens;
      size_t free_bytes = 0, total_bytes = 0;
      cudaMemGetInfo(&free_bytes, &total_bytes);
      const double budget = memory_fraction * static_cast<double>(free_bytes) - reserve_gb * 1e9;
      nlohmann::json row = {{"config", path}, {"layer_types", lckv::format_layer_types(config.layer_types)},
                            {"prompt", prompt}, {"new_tokens", new_tokens},
                            {"kv_bytes_per_token", lckv::CondensedKVCache::bytes_for(config, 1, 1, torch::kBFloat16)},
                            {"free_gb", free_bytes / 1e9}, {"cache_budget_gb", budget / 1e9}};
      if (budget <= 0) {
        row["error"] = "no memory left for a cache after the reserve";
        rows.push_back(row);
        continue;
      }
      const int64_t fits = lckv::max_batch_for_budget(config, capacity, torch::kBFloat16, static_cast<int64_t>(budget));
      const int64_t batch = std::min(fits, max_batch);
      const std::vector<std::vector<int64_t>> prompts = random_prompts(batch, prompt, config.vocab_size);
      lckv::GenerationConfig gc;
      gc.max_new_tokens = std::min(new_tokens, max_steps);
      gc.cache_capacity = capacity;  // the scenario's memory, even when fewer steps are timed
      gc.prefill_chunk = 64;
      torch::cuda::synchronize();
      const lckv::GenerationResult r = lckv::generate(model, prompts, gc);
      const double s = r.stats.prefill_seconds + r.stats.decode_seconds;
      row.update({{"batch", batch}, {"max_batch_that_fits", fits}, {"cache_gb", r.stats.cache_bytes / 1e9},
                  {"timed_new_tokens", gc.max_new_tokens}, {"full_scenario", gc.max_new_tokens == new_tokens},
                  {"prefill_s", r.stats.prefill_seconds}, {"decode_s", r.stats.decode_seconds},
                  {"tokens_per_s", r.stats.new_tokens / s},
                  {"decode_tokens_per_s", r.stats.new_tokens / std::max(1e-9, r.stats.decode_seconds)}});
      std::cerr << row.dump() << "\n";
      rows.push_back(row);
    }
  }
  return rows;
}

}  // namespace

int main(int argc, char** argv) {
  lckv::ensure_passive_openmp(argc, argv);
  CLI::App app{"lckv-bench-attention: CUDA condensed attention vs PyTorch SDPA, decode bandwidth, end to end"};
  std::vector<int64_t> seq_lens = {1024, 2048, 4096, 8192, 16384}, head_dims = {64, 128};
  std::vector<int64_t> batches = {1, 16, 64, 256}, contexts = {1024, 4096, 16384, 32768};
  int64_t tokens_per_batch = 16384;
  std::string parts = "kernels";
  std::vector<std::string> configs = {"configs/tinyllama-1.1b-llama.json", "configs/tinyllama-1.1b-lckv-w2.json"};
  int64_t train_seq = 2048, train_batch = 2, gen_batch = 32, gen_prompt = 128, gen_new = 128, decode_step_tokens = 48;
  int threads = 2;
  std::vector<int64_t> scenarios = {5, 8187, 512, 1024};  // the paper's two
  int64_t scenario_steps = 64, max_batch = 1024;
  double memory_fraction = 0.9, reserve_gb = 12;
  std::string out_path, card;
  app.add_option("--seq-lens", seq_lens, "T of the attention benchmark");
  app.add_option("--head-dims", head_dims, "D of the attention benchmark (64, 128)");
  app.add_option("--tokens-per-batch", tokens_per_batch, "batch = this / T");
  app.add_option("--decode-batches", batches, "batch sizes of the decode benchmark");
  app.add_option("--decode-contexts", contexts, "cached keys of the decode benchmark");
  app.add_option("--parts", parts, "kernels | e2e | scenarios | all")
      ->check(CLI::IsMember({"kernels", "e2e", "scenarios", "all"}));
  app.add_option("--scenarios", scenarios, "prompt and new-token pairs of the scenarios part");
  app.add_option("--scenario-steps", scenario_steps, "decode steps timed per scenario at most");
  app.add_option("--memory-fraction", memory_fraction, "share of the free device memory the scenarios' caches may use");
  app.add_option("--reserve-gb", reserve_gb, "GB of that share kept for weights and activations");
  app.add_option("--max-batch", max_batch, "largest batch the scenarios run (the largest that fits is reported too)");
  app.add_option("--configs", configs, "model configs of the end-to-end benchmark");
  app.add_option("--train-seq", train_seq, "tokens per training sequence");
  app.add_option("--train-batch", train_batch, "training sequences per step");
  app.add_option("--gen-batch", gen_batch, "generated sequences");
  app.add_option("--gen-prompt", gen_prompt, "prompt tokens per sequence");
  app.add_option("--gen-new", gen_new, "new tokens per sequence");
  app.add_option("--decode-step-tokens", decode_step_tokens,
                 "new tokens per call of the dynamic / static / cuda_graph decode-step comparison (batch 1 and --gen-batch)");
  app.add_option("--threads", threads, "torch intra-op threads (CPU side)");
  app.add_option("--card", card, "the GPU's name for the JSON (default: the driver's)");
  app.add_option("--out", out_path, "write the JSON here (atomically)");
  CLI11_PARSE(app, argc, argv);
  try {
    torch::set_num_threads(threads);
    if (!torch::cuda::is_available()) throw std::runtime_error("no CUDA device");
    cudaDeviceProp prop{};
    cudaGetDeviceProperties(&prop, 0);
    if (card.empty()) card = prop.name;
    const double peak = nominal_peak_gbps(0), copy = measured_copy_gbps();
    char date[32];
    const std::time_t now = std::time(nullptr);
    std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
    nlohmann::json result = {{"benchmark", "condensed_attention_cuda"},
                             {"card", card},
                             {"date", date},
                             {"torch", TORCH_VERSION},
                             {"sms", prop.multiProcessorCount},
                             {"sm", prop.major * 10 + prop.minor},  // compute capability: the routes' key
                             {"dtype", "bf16"},                      // of every kernel row
                             {"nominal_peak_gbps", peak},
                             {"measured_copy_gbps", copy}};
    if (scenarios.size() % 2 != 0) throw std::invalid_argument("--scenarios takes prompt and new-token pairs");
    if (parts == "kernels" || parts == "all") {
      result["attention"] = bench_attention(seq_lens, head_dims, tokens_per_batch);
      result["decode"] = bench_decode(batches, contexts, peak, copy);
    }
    if (parts == "e2e" || parts == "all") {
      result["end_to_end"] = bench_end_to_end(configs, train_seq, train_batch, gen_batch, gen_prompt, gen_new, decode_step_tokens);
    }
    if (parts == "scenarios" || parts == "all") {
      result["scenarios"] = bench_scenarios(configs, scenarios, scenario_steps, memory_fraction, reserve_gb, max_batch);
      result["paper"] = {{"throughput_ratio_7b_5+8187_24GB", 4.7}};
      // LCKV over Llama per scenario (the first config is the baseline), at each one's own largest batch.
      nlohmann::json ratios = nlohmann::json::array();
      const auto& rows = result["scenarios"];
      for (const auto& a : rows) {
        for (const auto& b : rows) {
          if (a["config"] == configs.front() && b["config"] != configs.front() && a["prompt"] == b["prompt"] &&
              a["new_tokens"] == b["new_tokens"] && a.contains("tokens_per_s") && b.contains("tokens_per_s")) {
            ratios.push_back({{"prompt", a["prompt"]}, {"new_tokens", a["new_tokens"]}, {"config", b["config"]},
                              {"throughput_ratio", b["tokens_per_s"].get<double>() / a["tokens_per_s"].get<double>()},
                              {"batch_ratio", b["batch"].get<double>() / a["batch"].get<double>()}});
          }
        }
      }
      result["scenario_ratios"] = ratios;
    }
    std::cout << result.dump(2) << std::endl;
    if (!out_path.empty()) lckv::write_file_atomically(out_path, result.dump(2) + "\n");
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "lckv-bench-attention: " << e.what() << "\n";
    return 1;
  }
}
