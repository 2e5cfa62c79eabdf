// lckv-bench-attention-cpu: the CPU paths of condensed attention side by side in one process, in
// interleaved rounds (the machine may be shared: medians of several rounds), against the matmul
// rate measured in the same rounds, all in one dtype (--dtype; auto: bf16 where native, else fp32). Writes JSON.
//  * training shapes (the quickstart's heads: 4 query, 2 KV, D 64): causal and strict
//    attention, forward without grad and forward + backward, by auto (what the op runs: PyTorch's
//    fused forward, and its fused backward beyond one query block, else our blocked one), flash
//    (PyTorch's fused forward, our blocked backward from its lse), blocked (ours, forward and
//    backward) and sdpa (PyTorch's SDPA with its own autograd, strict by narrowing to T-1 keys);
//  * decode (T = 1 over S cached keys, the tiny shape's heads: 8 query, 4 KV, D 64): the
//    direct-loop kernel (rows) against the blocked path.
#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <fstream>
#include <iostream>
#include <map>

#include "lckv/autocast.h"
#include "lckv/files.h"
#include "lckv/openmp_policy.h"
#include "lckv/ops/condensed_attention.h"
#include "lckv/ops/sdpa_attention.h"
#include "bench_timing.h"

namespace {

using lckv::ops::AttentionParams;
using lckv::ops::CpuAttentionPath;

using lckv::bench::median;
using lckv::bench::median_ms;

struct Contender {
  std::string name;
  std::function<void()> fn;
  double flops = 0;
  std::vector<double> ms;  // one median per round
  int min_reps = 0;        // timed calls per round at least (0: --reps)
};

}  // namespace

int main(int argc, char** argv) {
  lckv::ensure_passive_openmp(argc, argv);
  CLI::App app{"lckv-bench-attention-cpu: CPU condensed attention paths vs the in-run matmul rate"};
  int threads = 2, rounds = 5, reps = 5;
  std::vector<int64_t> seq_lens = {128, 512};
  int64_t tokens = 2048, context = 512;
  std::string out_path, dtype = "auto";
  app.add_option("--threads", threads, "torch intra-op threads");
  app.add_option("--rounds", rounds, "interleaved rounds (medians reported)");
  app.add_option("--reps", reps, "timed calls per contender per round");
  app.add_option("--seq-lens", seq_lens, "T of the training shapes");
  app.add_option("--tokens", tokens, "tokens per training batch (batch = tokens / T)");
  app.add_option("--context", context, "cached keys of the decode benchmark");
  app.add_option("--out", out_path, "write the JSON here too");
  app.add_option("--dtype", dtype, "auto (bf16 where this CPU computes it natively: AMX or avx512_bf16; else fp32), "
                                   "bf16 or fp32: of every input and of the matmul")
      ->check(CLI::IsMember(lckv::compute_dtype_names()));
  CLI11_PARSE(app, argc, argv);
  dtype = lckv::resolve_compute_dtype(dtype, torch::kCPU, "--dtype");
  try {
    torch::set_num_threads(threads);
    torch::manual_seed(0);
    const auto opts = torch::TensorOptions().dtype(dtype == "bf16" ? torch::kBFloat16 : torch::kFloat);
    std::vector<Contender> all;
    // The matmul rate: a model-shaped linear (tokens x 256 -> 768, the quickstart MLP).
    const torch::Tensor x = torch::randn({tokens, 256}, opts), w = torch::randn({768, 256}, opts);
    // Timed over lckv::bench::kMatmulCalls calls at least, as bench_train_step's rate (bench_timing.h says why).
    all.push_back({"matmul", [&] { at::linear(x, w); }, 2.0 * tokens * 256 * 768, {}, lckv::bench::kMatmulCalls});
    std::vector<torch::Tensor> keep;  // inputs the lambdas read
    nlohmann::json shapes = nlohmann::json::array();
    for (int64_t T : seq_lens) {
      const int64_t B = std::max<int64_t>(1, tokens / T), Hq = 4, Hkv = 2, D = 64;
      shapes.push_back({{"T", T}, {"batch", B}, {"heads", Hq}, {"kv_heads", Hkv}, {"head_dim", D}});
      for (bool strict : {false, true}) {
        torch::Tensor q = torch::randn({B, Hq, T, D}, opts).requires_grad_(), k = torch::randn({B, Hkv, T, D}, opts).requires_grad_(),
                      v = torch::randn({B, Hkv, T, D}, opts).requires_grad_(), g = torch::randn({B, Hq, T, D}, opts);
        keep.insert(keep.end(), {q, k, v, g});
        const double pairs = strict ? T * (T - 1) / 2.0 : T * (T + 1) / 2.0;
        const double fwd = 4.0 * B * Hq * D * pairs;
        const std::string tag = "T" + std::to_string(T) + (strict ? "_strict" : "_causal");
        for (auto [name, path, backend] :
             {std::tuple{"auto", CpuAttentionPath::kAuto, lckv::ops::AttentionBackend::kAuto},
              std::tuple{"tiled", CpuAttentionPath::kTiled, lckv::ops::AttentionBackend::kAuto},
              std::tuple{"flash", CpuAttentionPath::kFlash, lckv::ops::AttentionBackend::kAuto},
              std::tuple{"blocked", CpuAttentionPath::kBlocked, lckv::ops::AttentionBackend::kAuto},
              std::tuple{"sdpa", CpuAttentionPath::kAuto, lckv::ops::AttentionBackend::kSdpa}}) {
          AttentionParams p;
          p.mask.strict = strict;
          p.cpu_path = path;
          auto run = [=](bool grad) {
            lckv::ops::set_attention_backend(backend);
            if (!grad) {
              torch::NoGradGuard no_grad;
              lckv::ops::condensed_attention(q, k, v, p);
            } else {
              torch::autograd::grad({(lckv::ops::condensed_attention(q, k, v, p) * g).sum()}, {q, k, v});
            }
            lckv::ops::clear_attention_backend();
          };
          all.push_back({tag + "_fwd_" + name, [=] { run(false); }, fwd});
          all.push_back({tag + "_fwdbwd_" + name, [=] { run(true); }, 3.5 * fwd});
        }
      }
    }
    // Decode: one new token over `context` cached keys, batch 1, the tiny shape's heads.
    {
      const int64_t Hq = 8, Hkv = 4, D = 64;
      torch::Tensor q = torch::randn({1, Hq, 1, D}, opts), k = torch::randn({1, Hkv, context, D}, opts),
                    v = torch::randn({1, Hkv, context, D}, opts);
      keep.insert(keep.end(), {q, k, v});
      for (auto [name, path] : {std::pair{"rows", CpuAttentionPath::kRows}, std::pair{"blocked", CpuAttentionPath::kBlocked}}) {
        AttentionParams p;
        p.mask.q_offset = context - 1;
        p.cpu_path = path;
        all.push_back({"decode_" + std::string(name), [=] {
                         torch::NoGradGuard no_grad;
                         lckv::ops::condensed_attention(q, k, v, p);
                       },
                       4.0 * Hq * D * context});
      }
    }
    for (int r = 0; r < rounds; ++r) {
      for (auto& c : all) c.ms.push_back(median_ms(c.fn, std::max(reps, c.min_reps)));
      std::cerr << "round " << r + 1 << "/" << rounds << " done\n";
    }
    const double matmul_ms = median(all[0].ms);
    const double matmul_gflops = all[0].flops / matmul_ms / 1e6;
    char date[32];
    const std::time_t now = std::time(nullptr);
    std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
    nlohmann::json result = {{"benchmark", "condensed_attention_cpu"},
                             {"date", date},
                             {"torch", TORCH_VERSION},
                             {"threads", threads},
                             {"rounds", rounds},
                             {"reps_per_round", reps},
                             {"machine_shared", true},
                             {"openmp", lckv::bench::openmp_wait_settings()},
                             {"note", "2-core machine shared with other agents' builds: medians over interleaved rounds; "
                                      "ratios inside one run are what to compare"},
                             {"training_shapes", shapes},
                             {"decode_context", context},
                             {"dtype", dtype},
                             {"native_bf16", lckv::native_bf16(torch::kCPU)},
                             {"matmul_gflop_per_s", matmul_gflops},
                             {"contenders", nlohmann::json::object()}};
    for (const auto& c : all) {
      const double ms = median(c.ms);
      const double gflops = c.flops / ms / 1e6;
      result["contenders"][c.name] = {{"median_ms", ms}, {"round_medians_ms", c.ms}, {"gflop_per_s", gflops},
                                      {"fraction_of_matmul_rate", gflops / matmul_gflops}};
    }
    std::cout << result.dump(2) << std::endl;
    if (!out_path.empty()) lckv::write_file_atomically(out_path, result.dump(2) + "\n");
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "lckv-bench-attention-cpu: " << e.what() << "\n";
    return 1;
  }
}
