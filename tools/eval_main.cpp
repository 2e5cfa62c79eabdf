// lckv-eval: the perplexity (and bits per token) of a checkpoint
//   --data DIR: on a split of an lckv-prepare data directory, computed exactly as lckv-train's
//     validation computes it (lckv::train::loss_sum), so the same windows, batch, dtype and thread
//     count reproduce the trainer's validation loss bitwise;
//   --text FILE... / --jsonl FILE...: on documents tokenized with the checkpoint's tokenizer, longer
//     ones in sliding windows of --context ids moving by --stride, or token by token through a
//     StreamingLLM cache (--streaming) (lckv::train::text_loss_sum).
// Prints a JSON result (and writes it to --out); progress goes to stderr.
#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <functional>
#include <memory>
#include <iostream>

#include "lckv/autocast.h"
#include "lckv/data/prepare.h"
#include "lckv/files.h"
#include "lckv/generate/generate.h"
#include "lckv/io/checkpoint.h"
#include "lckv/openmp_policy.h"
#include "lckv/train/evaluate.h"

namespace {

// A progress line on stderr at most every 2 s (and at the end).
std::function<void(int64_t, int64_t)> progress_printer(const std::string& unit) {
  auto last = std::make_shared<std::chrono::steady_clock::time_point>();
  return [last, unit](int64_t done, int64_t total) {
    const auto now = std::chrono::steady_clock::now();
    if (done < total && now - *last < std::chrono::seconds(2)) return;
    *last = now;
    std::cerr << "lckv-eval: " << done << "/" << total << " " << unit << "\n";
  };
}

}  // namespace

int main(int argc, char** argv) {
  lckv::ensure_passive_openmp(argc, argv);
  CLI::App app{"lckv-eval: perplexity of a checkpoint on a prepared data directory's split (as lckv-train "
               "validates) or on text / JSONL files"};
  std::string model_dir, data_dir, split = "val", dtype = "auto", prefill = "iterative", out_path, tokenizer_path,
                         text_field = "text";
  std::vector<std::string> text_files, jsonl_files;
  int64_t seq_len = 256, batch_size = 16, max_batches = 0, context = 0, stride = 0, sink_tokens = 4;
  bool streaming = false;
  int threads = 2;
  app.add_option("--model", model_dir, "Checkpoint directory (config.json, model.safetensors)")->required();
  auto* data_opt = app.add_option("--data", data_dir, "Directory written by lckv-prepare (meta.json and shards)");
  auto* text_opt = app.add_option("--text", text_files, "Text files, one document each");
  auto* jsonl_opt = app.add_option("--jsonl", jsonl_files, "JSONL files, one document per line (--text-field)");
  data_opt->excludes(text_opt)->excludes(jsonl_opt);
  text_opt->excludes(jsonl_opt);
  auto* split_opt = app.add_option("--split", split, "val or train (--data)")->check(CLI::IsMember({"val", "train"}))
      ->capture_default_str();
  auto* seq_len_opt = app.add_option("--seq-len", seq_len, "Tokens per window (T) (--data)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 24))->capture_default_str();
  auto* max_batches_opt =
      app.add_option("--max-batches", max_batches, "Batches to evaluate (0: the whole split) (--data)")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--batch-size", batch_size, "Windows per batch")->check(CLI::Range(int64_t{1}, int64_t{1} << 24))
      ->capture_default_str();
  auto* field_opt = app.add_option("--text-field", text_field, "The JSONL records' text field")->capture_default_str();
  auto* tok_opt =
      app.add_option("--tokenizer", tokenizer_path, "SentencePiece model (default: <model>/tokenizer.model)");
  auto* context_opt = app.add_option("--context", context, "Ids per window (default: the config's "
                                     "max_position_embeddings; at most that)")->check(CLI::PositiveNumber);
  auto* stride_opt = app.add_option("--stride", stride, "Predictions a window moves on by (default: --context): each "
                                    "is scored once, with at least context - stride ids before it")
      ->check(CLI::PositiveNumber);
  auto* streaming_opt = app.add_flag("--streaming", streaming, "Token by token through a StreamingLLM cache of "
                                     "--context slots instead of windows");
  auto* sink_opt = app.add_option("--sink-tokens", sink_tokens, "StreamingLLM sink tokens kept (--streaming)")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--dtype", dtype, "auto (bf16 where this CPU computes it natively: AMX or avx512_bf16; else fp32), "
                                   "bf16 (fp32 weights, bf16 autocast) or fp32")
      ->check(CLI::IsMember(lckv::compute_dtype_names()))->capture_default_str();
  app.add_option("--prefill", prefill, "iterative (the config's m + b iterations, as in training) or exact "
                                       "(iterations until the KVs converge: the sequential definition)")
      ->check(CLI::IsMember({"iterative", "exact"}))->capture_default_str();
  app.add_option("--threads", threads, "Torch intra-op threads")->check(CLI::Range(1, 4096))->capture_default_str();
  app.add_option("--out", out_path, "Also write the JSON result to this file");
  CLI11_PARSE(app, argc, argv);
  const bool texts = !text_files.empty() || !jsonl_files.empty();
  if (!texts && data_dir.empty()) {
    std::cerr << "lckv-eval: error: give the inputs: --data DIR, --text FILE... or --jsonl FILE...\n";
    return 2;
  }
  // Options of the other kind of input are refused, not ignored.
  for (const auto* o : texts ? std::vector<CLI::Option*>{split_opt, seq_len_opt, max_batches_opt}
                             : std::vector<CLI::Option*>{field_opt, tok_opt, context_opt, stride_opt, streaming_opt,
                                                         sink_opt}) {
    if (o->count() > 0) {
      std::cerr << "lckv-eval: error: " << o->get_name() << " applies to "
                << (texts ? "--data" : "--text / --jsonl") << " only\n";
      return 2;
    }
  }
  if (field_opt->count() > 0 && jsonl_files.empty()) {
    std::cerr << "lckv-eval: error: --text-field applies to --jsonl only\n";
    return 2;
  }
  if (sink_opt->count() > 0 && !streaming) {
    std::cerr << "lckv-eval: error: --sink-tokens applies to --streaming only\n";
    return 2;
  }
  if (streaming && stride_opt->count() > 0) {
    std::cerr << "lckv-eval: error: --stride applies to windows, not --streaming\n";
    return 2;
  }
  dtype = lckv::resolve_compute_dtype(dtype, torch::kCPU, "--dtype");  // the result's JSON names the one that ran
  try {
    torch::set_num_threads(threads);
    lckv::LCKVForCausalLM model = lckv::io::load_pretrained(model_dir);
    if (texts) {
      const bool jsonl = !jsonl_files.empty();
      const std::vector<std::string>& files = jsonl ? jsonl_files : text_files;
      if (tokenizer_path.empty()) tokenizer_path = lckv::train::checkpoint_tokenizer(model_dir);
      const auto documents = lckv::train::tokenize_documents(files, jsonl, text_field, tokenizer_path, model->config);
      lckv::train::TextEval t;
      t.context = context > 0 ? context : model->config.max_position_embeddings;
      t.stride = stride > 0 ? stride : t.context;
      t.batch_size = batch_size;
      t.bf16 = dtype == "bf16";
      if (prefill == "exact") t.iterations = lckv::train::exact_iterations(t.context, t.bf16, torch::kFloat);
      if (streaming) t.streaming = lckv::StreamingOptions{sink_tokens, 1};
      t.progress = progress_printer(streaming ? "documents" : "windows");
      const lckv::train::TextLossSum r = lckv::train::text_loss_sum(model, documents, t, torch::kCPU);
      const lckv::train::EvalStats e = lckv::train::eval_stats(r.sum, r.tokens);
      nlohmann::json result = {{"model", model_dir},         {"inputs", files},
                               {"format", jsonl ? "jsonl" : "text"}, {"tokenizer", tokenizer_path},
                               {"documents", documents.size()}, {"context", t.context},
                               {"batch_size", batch_size},   {"dtype", dtype},
                               {"prefill", prefill},         {"threads", threads},
                               {"windows", r.windows},       {"tokens", e.tokens},
                               {"loss", e.loss},             {"ppl", e.ppl},
                               {"bits_per_token", e.loss / std::log(2.0)}};
      if (jsonl) result["text_field"] = text_field;
      if (streaming) {
        result["streaming"] = {{"sink_tokens", sink_tokens}};
      } else {
        result["stride"] = t.stride;
      }
      std::cout << result.dump(2) << "\n";
      if (!out_path.empty()) lckv::write_file_atomically(out_path, result.dump(2) + "\n");
      return 0;
    }
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
    w.progress = progress_printer("windows");
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
