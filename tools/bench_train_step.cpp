// lckv-bench-train-step: tokens/s of one training step (forward + backward) for two configs side
// by side in one process (interleaved, so both see the same machine state), with the FLOP ratio
// of their iteration plans, the step's GFLOP/s against a bf16 matmul of the model's MLP shape timed
// in the same rounds, and the share of the step spent in condensed attention (forward calls and
// their backward nodes, timed by RecordFunction callbacks: lckv::bench::AttentionTimer, in separate
// profiled steps, so the callbacks do not slow the timed ones). Writes JSON.
#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <iostream>

#include "lckv/autocast.h"
#include "lckv/model/lckv_model.h"
#include "lckv/openmp_policy.h"
#include "bench_timing.h"

namespace {

struct Run {
  std::string config_path;
  lckv::LCKVConfig config;
  lckv::LCKVForCausalLM model{nullptr};
  std::vector<double> seconds, attention_share;
};

using lckv::bench::median;

}  // namespace

int main(int argc, char** argv) {
  lckv::ensure_passive_openmp(argc, argv);
  CLI::App app{"lckv-bench-train-step: training-step throughput of two configs, side by side"};
  std::vector<std::string> configs = {"configs/tiny-llama.json", "configs/tiny-lckv-w2.json"};
  int threads = 2, seq_len = 512, batch = 1, steps = 3, warmup = 1, profiled = 1;
  int64_t vocab = 0;
  std::string dtype = "auto", out_path;
  app.add_option("--configs", configs, "config files to compare (the first is the baseline)")->expected(2, 16);
  app.add_option("--threads", threads, "torch intra-op threads");
  app.add_option("--seq-len", seq_len, "tokens per sequence (T)");
  app.add_option("--batch", batch, "sequences per step");
  app.add_option("--steps", steps, "timed steps per config");
  app.add_option("--warmup", warmup, "untimed steps per config");
  app.add_option("--vocab", vocab, "override vocab_size (0 keeps the config's)");
  app.add_option("--dtype", dtype, "auto (bf16 where this CPU computes it natively: AMX or avx512_bf16; else fp32), "
                                   "bf16 (CPU autocast) or fp32")
      ->check(CLI::IsMember(lckv::compute_dtype_names()));
  app.add_option("--profiled-steps", profiled, "steps per config timing the attention share (0: skip)");
  app.add_option("--out", out_path, "write the JSON result here too");
  CLI11_PARSE(app, argc, argv);
  dtype = lckv::resolve_compute_dtype(dtype, torch::kCPU, "--dtype");
  try {
    torch::set_num_threads(threads);
    torch::manual_seed(0);
    std::vector<Run> runs;
    for (const auto& path : configs) {
      Run r;
      r.config_path = path;
      r.model = lckv::random_model(path, vocab);
      r.config = r.model->config;
      runs.push_back(std::move(r));
    }
    torch::Tensor ids = torch::randint(0, runs[0].config.vocab_size, {batch, seq_len});
    auto step = [&](Run& r) {
      const auto t0 = std::chrono::steady_clock::now();
      {
        lckv::AutocastScope autocast(at::kCPU, at::kBFloat16, dtype == "bf16");
        auto out = r.model->forward(ids, ids);
        out.loss.backward();
      }
      r.model->zero_grad();
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    };
    // The matmul rate in the same rounds: the MLP's up projection of the batch, in the compute dtype.
    const auto& c0 = runs[0].config;
    const auto matmul_dtype = dtype == "bf16" ? torch::kBFloat16 : torch::kFloat;
    const torch::Tensor mx = torch::randn({batch * seq_len, c0.hidden_size}, matmul_dtype),
                        mw = torch::randn({c0.intermediate_size, c0.hidden_size}, matmul_dtype);
    std::vector<double> matmul_rates;
    auto time_matmul = [&] { matmul_rates.push_back(lckv::bench::linear_gflop_per_s(mx, mw)); };
    for (int i = 0; i < warmup; ++i) for (auto& r : runs) step(r);
    for (int i = 0; i < steps; ++i) {
      time_matmul();
      for (auto& r : runs) {
        r.seconds.push_back(step(r));
        std::cerr << r.config_path << " step " << i << ": " << r.seconds.back() << " s\n";
      }
    }
    for (int i = 0; i < profiled; ++i) {
      for (auto& r : runs) {
        const lckv::bench::AttentionTimer attention;
        const double s = step(r);
        r.attention_share.push_back(attention.seconds() / s);
      }
    }
    const double matmul_gflops = median(matmul_rates);
    nlohmann::json result = {{"benchmark", "train_step"}, {"threads", threads}, {"seq_len", seq_len},
                             {"batch", batch}, {"dtype", dtype}, {"steps", steps},
                             {"torch", TORCH_VERSION}, {"machine_shared", true}, {"openmp", lckv::bench::openmp_wait_settings()},
                             {"native_bf16", lckv::native_bf16(torch::kCPU)},
                             {"matmul_gflop_per_s", matmul_gflops}, {"matmul_dtype", dtype},
                             {"matmul_shape", {batch * seq_len, c0.hidden_size, c0.intermediate_size}},
                             {"runs", nlohmann::json::array()}};
    const double base_s = median(runs[0].seconds);
    const auto& bc = runs[0].config;
    const double base_flops = lckv::training_flops_per_token(bc, seq_len, bc.forward_passes, bc.backward_passes);
    for (auto& r : runs) {
      const double s = median(r.seconds);
      const double flops = lckv::training_flops_per_token(r.config, seq_len, r.config.forward_passes, r.config.backward_passes);
      result["runs"].push_back({{"config", r.config_path},
                                {"layer_types", lckv::format_layer_types(r.config.layer_types)},
                                {"forward_passes", r.config.forward_passes},
                                {"backward_passes", r.config.backward_passes},
                                {"vocab_size", r.config.vocab_size},
                                {"median_step_s", s},
                                {"tokens_per_s", batch * seq_len / s},
                                {"gflop_per_s", flops * batch * seq_len / s / 1e9},
                                {"fraction_of_matmul_rate", flops * batch * seq_len / s / 1e9 / matmul_gflops},
                                {"attention_share", r.attention_share.empty() ? nlohmann::json() : nlohmann::json(median(r.attention_share))},
                                {"step_seconds", r.seconds},
                                {"time_ratio_vs_first", s / base_s},
                                {"flop_ratio_vs_first", flops / base_flops},
                                {"time_over_flop_ratio", (s / base_s) / (flops / base_flops)}});
    }
    std::cout << result.dump(2) << std::endl;
    if (!out_path.empty()) std::ofstream(out_path) << result.dump(2) << "\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "lckv-bench-train-step: " << e.what() << "\n";
    return 1;
  }
}
