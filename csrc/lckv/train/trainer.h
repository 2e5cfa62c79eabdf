// The training library behind lckv-train: options (a JSON run file overridable by flags), the
// learning-rate schedule, AdamW parameter groups, one optimizer step, validation, checkpoints
// with exact resume, and the training loop with progress lines and metrics JSONL.
//
// Precision: the weights and AdamW state are fp32 (the master copy); with dtype "bf16" the
// forward and backward run under autocast to bf16 (lckv::AutocastScope; oneDNN/AMX on CPU), with
// "fp32" in plain fp32. The loss is computed in fp32 either way.
//
// Weight decay applies to the matrices: every 2-D parameter (projections, embeddings, lm_head),
// as in llm.c; norm weights and biases are not decayed.
//
// Checkpoints: <out>/step_NNNNNN/ holding config.json + model.safetensors (fp32, HF tensor
// names: loadable with lckv::io::load_pretrained), optimizer.pt (AdamW state, torch::save) and
// trainer_state.json (step, tokens, elapsed time, data-loader position, CPU RNG state, the run's
// options). Each is written into <out>/.tmp_step_NNNNNN and renamed into place when complete;
// <out>/latest (also replaced by rename) names the newest. Older checkpoints beyond
// keep_checkpoints are deleted after a new one is complete.
//
// Resume: with the same options, a run stopped after step k and resumed (resume = true) gives
// bitwise the same losses as an uninterrupted run on CPU with the same thread count.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <ostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "lckv/config.h"
#include "lckv/data/dataset.h"
#include "lckv/data/prepare.h"
#include "lckv/model/lckv_model.h"

namespace lckv::train {

// Bad options, data, checkpoints or a diverged run. Messages name the file, field, value or step.
struct TrainError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Every setting of a run. JSON run files use these field names; lckv-train's flags are the same
// names with '-' for '_'.
struct TrainOptions {
  std::string model_config;  // model config.json (configs/*.json); vocab_size is taken from the data
  std::string data;          // directory written by lckv-prepare (meta.json, shards, tokenizer.model)
  std::string out;           // checkpoints, metrics.jsonl, train.json

  int64_t seq_len = 256;    // tokens per sequence (T)
  int64_t batch_size = 16;  // sequences per micro-batch
  int grad_accum = 1;       // micro-batches per optimizer step
  int64_t max_steps = 1000;
  int64_t max_tokens = 0;  // > 0: train this many tokens instead (max_steps = ceil(tokens / tokens per step))

  double lr = 1e-3;            // peak learning rate
  double min_lr_ratio = 0.1;   // the cosine ends at lr * min_lr_ratio
  int64_t warmup_steps = 100;  // linear warmup from lr / warmup_steps to lr
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double adam_eps = 1e-8;
  double grad_clip = 1.0;  // max global gradient norm; 0 disables clipping

  uint64_t seed = 1234;  // weight initialisation and data order
  int threads = 2;       // torch intra-op threads
  std::string dtype = "bf16";   // "bf16" (fp32 weights, bf16 autocast) or "fp32"
  std::string device = "cpu";   // "cpu" or "cuda[:N]"

  int64_t eval_every = 200;  // validation every this many steps (0: only at the end)
  int64_t eval_batches = 0;  // validation batches per evaluation (0: the whole split)
  int64_t save_every = 500;  // checkpoint every this many steps (0: only at the end)
  int keep_checkpoints = 2;  // newest checkpoints kept
  int64_t log_every = 10;    // progress line + metrics record every this many steps
  bool resume = false;       // continue from <out>/latest
  std::string metrics;       // metrics JSONL (default <out>/metrics.jsonl)

  std::string prompt;           // lckv-train: greedy-generate from this text after training ("" = no)
  int64_t generate_tokens = 64;  // tokens to generate from `prompt`

  // Throws TrainError naming the field on an unknown field, a mistyped or an out-of-range value.
  static TrainOptions from_json(const nlohmann::json& j);
  static TrainOptions from_file(const std::string& path);  // a JSON run file
  nlohmann::json to_json() const;
  void validate() const;  // every range check; also checks that model_config, data, out are set
};

// Learning rate of optimizer step `step` (0-based) out of `total_steps`: linear warmup over the
// first warmup_steps steps ((step + 1) / warmup_steps × lr), then a cosine from lr down to
// lr × min_lr_ratio at the last step.
double learning_rate(const TrainOptions& o, int64_t step, int64_t total_steps);

// The parameters AdamW decays (every 2-D tensor) and the rest (norm weights, biases), by HF name.
struct ParamGroups {
  std::vector<std::pair<std::string, torch::Tensor>> decay;
  std::vector<std::pair<std::string, torch::Tensor>> no_decay;
};
ParamGroups weight_decay_groups(LCKVForCausalLM& model);

struct StepStats {
  int64_t step = 0;    // optimizer steps completed, this one included
  double loss = 0;     // mean training loss of the step's micro-batches
  double lr = 0;       // learning rate this step used
  double grad_norm = 0;  // global gradient norm before clipping
  double seconds = 0;  // wall time of the step
};

struct EvalStats {
  double loss = 0;  // mean next-token loss over the evaluated tokens
  double ppl = 0;   // exp(loss)
  int64_t tokens = 0;
};

struct RunResult {
  int64_t step = 0;        // optimizer steps completed
  int stop_signal = 0;     // the SIGINT/SIGTERM that stopped the run early, or 0
  std::optional<EvalStats> final_eval;  // the last validation (none without a validation split)
  std::string last_checkpoint;
};

// SIGINT/SIGTERM handlers that ask Trainer::run to save a checkpoint and return after the current
// step. A second signal of the same kind gets the default action (it ends the process at once).
void install_stop_handlers();
int requested_stop_signal();  // the signal received since the last clear, or 0
void clear_stop_request();

class Trainer {
 public:
  // Reads the data and the model config, builds the model, optimizer and loaders, and with
  // options.resume loads <out>/latest. `log` receives notes and progress lines (nullptr: quiet).
  // Throws TrainError (or the data/io layers' errors) naming what is wrong; nothing in `out` is
  // changed before every input has been checked.
  explicit Trainer(const TrainOptions& options, std::ostream* log = nullptr);

  // One optimizer step over grad_accum micro-batches. Throws TrainError naming the step when the
  // loss or the gradient norm is not finite; the weights are then left as they were.
  StepStats train_step();
  // Loss over the validation split (or its first eval_batches batches); no autograd.
  EvalStats evaluate();
  // Writes <out>/step_NNNNNN and points <out>/latest at it; returns the directory.
  std::string save_checkpoint();

  // Trains until total_steps(): progress lines, metrics records, periodic validation and
  // checkpoints, a final validation and checkpoint. Returns early (after saving a checkpoint)
  // when a stop signal arrives; `after_step` (optional) is called after each step.
  RunResult run(const std::function<void(const StepStats&)>& after_step = {});

  int64_t step() const { return step_; }
  int64_t total_steps() const { return total_steps_; }
  int64_t tokens_per_step() const;
  const TrainOptions& options() const { return options_; }
  const LCKVConfig& config() const { return model_->config; }
  const data::PreparedData& data() const { return data_; }
  LCKVForCausalLM& model() { return model_; }
  torch::Device device() const { return device_; }
  const std::string& last_checkpoint() const { return last_checkpoint_; }

 private:
  void load_checkpoint(const std::string& dir);
  void log_metrics(const nlohmann::json& record);

  TrainOptions options_;
  std::ostream* log_;
  data::PreparedData data_;
  torch::Device device_{torch::kCPU};
  LCKVForCausalLM model_{nullptr};
  std::unique_ptr<torch::optim::AdamW> optimizer_;
  std::unique_ptr<data::TrainLoader> train_loader_;
  std::unique_ptr<data::SequentialLoader> val_loader_;  // null without a validation split
  int64_t total_steps_ = 0;
  int64_t step_ = 0;
  int64_t tokens_seen_ = 0;
  double elapsed_s_ = 0;  // training wall time of earlier sessions (resume) plus this one's
  std::string last_checkpoint_;
  std::string metrics_path_;
};

// One step of `opt` for every parameter with a gradient, through ATen's fused multi-tensor AdamW
// kernel (one pass per parameter instead of libtorch's ~10 elementwise ops; what
// torch.optim.AdamW(fused=True) runs). The moments live in the optimizer's own per-parameter state,
// so torch::save/load of the optimizer (the checkpoint format) is unchanged.
void fused_adamw_step(torch::optim::AdamW& opt);

}  // namespace lckv::train
