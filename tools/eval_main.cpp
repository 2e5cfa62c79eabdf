// lckv-eval: the perplexity (and bits per token) of a checkpoint on a split of an lckv-prepare data
// directory, computed exactly as lckv-train's validation computes it (lckv::train::loss_sum), so the
// same windows, batch, dtype and thread count reproduce the trainer's validation loss bitwise.
// Prints a JSON result (and writes it to --out).
#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <cmath>
#include <iostream>

#include "lckv/data/prepare.h"
#include "lckv/files.h"
#include "lckv/io/checkpoint.h"
#include "lckv/openmp_policy.h"
#include "lckv/train/evaluate.h"

int main(int argc, char** argv) {
  lckv::ensure_passive_openmp(argc, argv);
  CLI::App app{"lckv-eval: perplexity of a checkpoint on a prepared data directory's split (as lckv-train validates)"};
  std::string model_dir, data_dir, split = "val", dtype = "bf16", prefill = "iterative", out_path;
  int64_t seq_len = 256, batch_size = 16, max_batches = 0;
  int threads = 2;
  app.add_option("--model", model_dir, "Checkpoint directory (config.json, model.safetensors)")->required();
  app.add_option("--data", data_dir, "Directory written by lckv-prepare (meta.json and shards)")->required();
  app.add_option("--split", split, "val or train")->check(CLI::IsMember({"val", "train"}))->capture_default_str();
  app.add_option("--seq-len", seq_len, "Tokens per window (T)")->check(CLI::Range(int64_t{1}, int64_t{1} << 24))
      ->capture_default_str();
  app.add_option("--batch-size", batch_size, "Windows per batch")->check(CLI::Range(int64_t{1}, int64_t{1} << 24))
      ->capture_default_str();
  app.add_option("--max-batches", max_batches, "Batches to evaluate (0: the whole split)")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--dtype", dtype, "bf16 (fp32 weights, bf16 autocast) or fp32")->check(CLI::IsMember({"bf16", "fp32"}))
      ->capture_default_str();
  app.add_option("--prefill", prefill, "iterative (the config's m + b iterations, as in training) or exact "
                                       "(iterations until the KVs converge: the sequential definition)")
      ->check(CLI::IsMember({"iterative", "exact"}))->capture_default_str();
  app.add_option("--threads", threads, "Torch intra-op threads")->check(CLI::Range(1, 4096))->capture_default_str();
  app.add_option("--out", out_path, "Also write the JSON result to this file");
  CLI11_PARSE(app, argc, argv);
  try {
    torch::set_num_threads(threads);
    lckv::LCKVForCausalLM model = lckv::io::load_pretrained(model_dir);
    const lckv::data::PreparedData data = lckv::data::read_prepared(data_dir);
    const auto& shards = split == "val" ? data.val_shards : data.train_shards;
    if (shards.empty()) throw std::runtime_error("'" + data_dir + "/meta.json' lists no " + split + " shards");
    if (data.vocab_size > model->config.vocab_size) {
      throw std::runtime_error("the data's vocab_size " + std::to_string(data.vocab_size) + " (" + data_dir +
                               "/meta.json) exceeds the model's " + std::to_string(model->config.vocab_size));
    }
    lckv::data::LoaderOptions lo;
    lo.seq_len = seq_len;
    lo.batch_size = batch_size;
    lckv::data::SequentialLoader loader(shards, lo);
    if (loader.vocab_size() > model->config.vocab_size) {
      throw std::runtime_error("the " + split + " shards hold token ids up to " + std::to_string(loader.vocab_size() - 1) +
                               " but the model's vocab_size is " + std::to_string(model->config.vocab_size));
    }
    lckv::train::WindowEval w;
    w.seq_len = seq_len;
    w.max_batches = max_batches;
    w.bf16 = dtype == "bf16";
    if (prefill == "exact") w.iterations = lckv::train::exact_iterations(seq_len, w.bf16, torch::kFloat);
    const auto [sum, tokens] = lckv::train::loss_sum(model, loader, w, torch::kCPU);
    const lckv::train::EvalStats e = lckv::train::eval_stats(sum, tokens);
    const nlohmann::json result = {{"model", model_dir},     {"data", data_dir},       {"split", split},
                                   {"seq_len", seq_len},     {"batch_size", batch_size}, {"dtype", dtype},
                                   {"prefill", prefill},     {"threads", threads},     {"tokens", e.tokens},
                                   {"loss", e.loss},         {"ppl", e.ppl},           {"bits_per_token", e.loss / std::log(2.0)}};
    std::cout << result.dump(2) << "\n";
    if (!out_path.empty()) lckv::write_file_atomically(out_path, result.dump(2) + "\n");
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "lckv-eval: error: " << e.what() << "\n";
    return 1;
  }
}
