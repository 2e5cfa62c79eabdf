// lckv-train: pretrains an LCKV (or plain Llama) model from token shards written by lckv-prepare.
// All the work is in lckv::train (csrc/lckv/train/trainer.h); this file parses flags, installs
// the SIGINT/SIGTERM handlers and prints the sample generation.
#include <CLI/CLI.hpp>

#include <cstring>
#include <exception>
#include <iostream>

#include "lckv/autocast.h"
#include "lckv/data/tokenizer.h"
#include "lckv/generate/generate.h"
#include "lckv/train/trainer.h"

namespace {

// The run file named by --config, found before the flags are parsed so its values become the
// flags' defaults (flags given on the command line override it).
std::string find_run_file(int argc, char** argv) {
  std::string path;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--config") == 0 && i + 1 < argc) path = argv[i + 1];
    else if (std::strncmp(argv[i], "--config=", 9) == 0) path = argv[i] + 9;
  }
  return path;
}

}  // namespace

int main(int argc, char** argv) {
  using lckv::train::TrainOptions;
  TrainOptions o;
  std::string run_file = find_run_file(argc, argv);
  if (!run_file.empty()) {
    try {
      o = TrainOptions::from_file(run_file);
    } catch (const std::exception& e) {
      std::cerr << "lckv-train: error: " << e.what() << "\n";
      return 2;
    }
  }

  CLI::App app{
      "Pretrain an LCKV model (or a plain Llama: identity layer_types) on token shards from lckv-prepare.\n"
      "Weights and AdamW state are fp32; --dtype bf16 runs forward and backward under bf16 autocast.\n"
      "Checkpoints go to <out>/step_NNNNNN (config.json, model.safetensors, optimizer.pt,\n"
      "trainer_state.json), <out>/latest names the newest; metrics to <out>/metrics.jsonl.\n"
      "SIGINT/SIGTERM save a checkpoint after the current step and exit; --resume continues exactly.",
      "lckv-train"};
  app.add_option("--config", run_file,
                 "JSON run file whose fields (the flag names with '_' for '-', e.g. \"seq_len\") set the defaults "
                 "of every flag below");
  app.add_option("--model-config", o.model_config, "Model config.json (e.g. configs/quickstart-lckv-w2.json); its "
                                                   "vocab_size is replaced by the data's")
      ->capture_default_str();
  app.add_option("--data", o.data, "Directory written by lckv-prepare (meta.json, shards, tokenizer.model)")
      ->capture_default_str();
  app.add_option("--out", o.out, "Output directory for checkpoints, metrics.jsonl and train.json")->capture_default_str();
  app.add_option("--seq-len", o.seq_len, "Tokens per training sequence (T)")->capture_default_str();
  app.add_option("--batch-size", o.batch_size, "Sequences per micro-batch")->capture_default_str();
  app.add_option("--grad-accum", o.grad_accum, "Micro-batches accumulated per optimizer step")->capture_default_str();
  app.add_option("--max-steps", o.max_steps, "Optimizer steps to train (ignored when --max-tokens is set)")
      ->capture_default_str();
  app.add_option("--max-tokens", o.max_tokens, "Token budget: train ceil(tokens / tokens per step) steps (0: use --max-steps)")
      ->capture_default_str();
  app.add_option("--lr", o.lr, "Peak learning rate")->capture_default_str();
  app.add_option("--min-lr-ratio", o.min_lr_ratio, "The cosine schedule ends at lr x this")->capture_default_str();
  app.add_option("--warmup-steps", o.warmup_steps, "Linear warmup steps")->capture_default_str();
  app.add_option("--weight-decay", o.weight_decay, "AdamW weight decay of the 2-D weights (norms and biases: none)")
      ->capture_default_str();
  app.add_option("--beta1", o.beta1, "AdamW beta1")->capture_default_str();
  app.add_option("--beta2", o.beta2, "AdamW beta2")->capture_default_str();
  app.add_option("--adam-eps", o.adam_eps, "AdamW epsilon")->capture_default_str();
  app.add_option("--grad-clip", o.grad_clip, "Clip the global gradient norm to this (0: no clipping)")->capture_default_str();
  app.add_option("--seed", o.seed, "Seed of the weight initialisation and the data order")->capture_default_str();
  app.add_option("--threads", o.threads, "Torch intra-op threads")->capture_default_str();
  app.add_option("--dtype", o.dtype, "bf16: fp32 weights with bf16 autocast (fast on CPUs with AMX); fp32: plain fp32")
      ->capture_default_str();
  app.add_option("--device", o.device, "cpu or cuda[:N]")->capture_default_str();
  app.add_option("--eval-every", o.eval_every, "Validate every this many steps (0: only at the end)")->capture_default_str();
  app.add_option("--eval-batches", o.eval_batches, "Validation batches per evaluation (0: the whole validation split)")
      ->capture_default_str();
  app.add_option("--save-every", o.save_every, "Checkpoint every this many steps (0: only at the end)")
      ->capture_default_str();
  app.add_option("--keep-checkpoints", o.keep_checkpoints, "Newest checkpoints to keep")->capture_default_str();
  app.add_option("--log-every", o.log_every, "Progress line and metrics record every this many steps")
      ->capture_default_str();
  app.add_flag("--resume,!--no-resume", o.resume,
               "Continue the run in --out from its latest checkpoint (same options give the same losses)");
  app.add_option("--metrics", o.metrics, "Metrics JSONL file (default <out>/metrics.jsonl)")->capture_default_str();
  app.add_option("--prompt", o.prompt, "After training, greedy-generate a continuation of this text")
      ->capture_default_str();
  app.add_option("--generate-tokens", o.generate_tokens, "Tokens to generate from --prompt")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  try {
    lckv::train::install_stop_handlers();
    lckv::train::Trainer trainer(o, &std::cerr);
    const lckv::train::RunResult result = trainer.run();
    if (result.stop_signal) return 128 + result.stop_signal;
    if (result.final_eval) {
      std::cout << "final validation: loss " << result.final_eval->loss << ", perplexity " << result.final_eval->ppl
                << " (step " << result.step << ", checkpoint " << result.last_checkpoint << ")\n";
    }
    if (!o.prompt.empty() && o.generate_tokens > 0) {
      const auto tokenizer = lckv::data::Tokenizer::load(trainer.data().tokenizer);
      // In the shards every document follows an EOS, so an EOS in front makes the prompt a document start.
      std::vector<int32_t> text = tokenizer.encode(o.prompt);
      std::vector<int64_t> prompt(text.begin(), text.end());
      if (tokenizer.eos_id() >= 0) prompt.insert(prompt.begin(), tokenizer.eos_id());
      lckv::GenerationConfig g;  // greedy, with the condensed KV cache
      g.max_new_tokens = o.generate_tokens;
      if (tokenizer.eos_id() >= 0) g.stop_tokens = {tokenizer.eos_id()};
      lckv::AutocastScope autocast(trainer.model()->parameters().front().device().type(), at::kBFloat16,
                                   o.dtype == "bf16");
      std::vector<int64_t> generated = lckv::generate(trainer.model(), {prompt}, g).tokens[0];
      if (!generated.empty() && generated.back() == tokenizer.eos_id()) generated.pop_back();
      text.insert(text.end(), generated.begin(), generated.end());
      std::cout << "greedy continuation of \"" << o.prompt << "\":\n" << tokenizer.decode(text) << "\n";
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "lckv-train: error: " << e.what() << "\n";
    return 1;
  }
}
