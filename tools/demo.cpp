// lckv-demo: builds a model from a config, runs a few forward/backward steps on random tokens and
// checks that the parallel iterative forward agrees with the sequential definition. The quick
// "does it work on this machine" run.
#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <chrono>
#include <iostream>

#include "lckv/model/lckv_model.h"
#include "lckv/openmp_policy.h"

int main(int argc, char** argv) {
  lckv::ensure_passive_openmp(argc, argv);
  CLI::App app{"lckv-demo: forward/backward of an LCKV model on random tokens"};
  std::string config_path = "configs/tiny-lckv-w2.json";
  int threads = 2, steps = 3, seq_len = 64, batch = 2;
  int64_t vocab = 512;
  app.add_option("--config", config_path, "model config.json")->check(CLI::ExistingFile);
  app.add_option("--threads", threads, "torch intra-op threads");
  app.add_option("--steps", steps, "training steps");
  app.add_option("--seq-len", seq_len, "tokens per sequence");
  app.add_option("--batch", batch, "sequences per batch");
  app.add_option("--vocab", vocab, "override the config's vocab_size (0 keeps it)");
  CLI11_PARSE(app, argc, argv);
  try {
    torch::set_num_threads(threads);
    torch::manual_seed(0);
    lckv::LCKVForCausalLM model = lckv::random_model(config_path, vocab);
    const lckv::LCKVConfig& config = model->config;
    std::cout << "config " << config_path << ": " << config.num_hidden_layers << " layers, layer_types "
              << lckv::format_layer_types(config.layer_types) << ", KV layers " << config.kv_layers().size() << "\n";
    torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(1e-3));
    torch::Tensor ids = torch::randint(0, config.vocab_size, {batch, seq_len});
    for (int step = 0; step < steps; ++step) {
      const auto t0 = std::chrono::steady_clock::now();
      opt.zero_grad();
      auto out = model->forward(ids, ids);
      out.loss.backward();
      opt.step();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::cout << "step " << step << " loss " << out.loss.item<double>() << " (" << batch * seq_len / s << " tokens/s)\n";
    }
    torch::NoGradGuard no_grad;
    model->to(torch::kDouble);
    torch::Tensor short_ids = ids.narrow(1, 0, 12);
    const double diff = (model->forward(short_ids, {}, lckv::IterationOptions{12, 1}).logits -
                         model->forward_sequential(short_ids).logits).abs().max().item<double>();
    std::cout << "parallel (m+b = T) vs sequential, fp64: max |logit difference| = " << diff << "\n";
    return diff < 1e-9 ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "lckv-demo: " << e.what() << "\n";
    return 1;
  }
}
