// The training loop behind lckv-train and python -m lckv.train: assembled from the run options
// (options.h), the optimizer (optimizer.h) and the checkpoints (checkpoint.h). One step runs
// grad_accum micro-batches of the model's next-token loss; the loop logs progress lines and metrics
// records, validates, checkpoints, honours stop signals and resumes exactly.
//
// Precision: the weights and the optimizer state are fp32 (the master copy); with dtype "bf16" the
// forward and backward run under autocast to bf16 (lckv::AutocastScope; oneDNN/AMX on CPU), with
// "fp32" in plain fp32; "auto" (the default) is bf16 where the device computes it natively and fp32
// elsewhere (lckv::resolve_compute_dtype). The loss is computed in fp32 either way.
//
// Data parallelism: under torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
// MASTER_PORT; distributed.h) every rank runs batch_size / WORLD_SIZE rows of each micro-batch and
// the gradients are averaged, so the run computes what one process computes (batch_size is global);
// rank 0 alone logs, writes metrics and checkpoints and holds the output lock. Without them the
// single-process path is unchanged.
//
// Resume: with the same options, a run stopped after step k and resumed (resume = true) gives
// bitwise the same losses as an uninterrupted run on CPU with the same thread count. Options whose
// change would change the result are refused on resume unless listed in allow_changes; every changed
// option is reported.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "lckv/config.h"
#include "lckv/data/dataset.h"
#include "lckv/data/prepare.h"
#include "lckv/files.h"
#include "lckv/model/lckv_model.h"
#include "lckv/train/checkpoint.h"
#include "lckv/train/evaluate.h"
#include "lckv/train/distributed.h"
#include "lckv/train/optimizer.h"
#include "lckv/train/options.h"

namespace lckv::train {

struct StepStats {
  int64_t step = 0;      // optimizer steps completed, this one included
  double loss = 0;       // mean training loss of the step's micro-batches
  double lr = 0;         // learning rate this step used
  double grad_norm = 0;  // global gradient norm before clipping
  double seconds = 0;    // wall time of the step
};


struct RunResult {
  int64_t step = 0;                     // optimizer steps completed
  int stop_signal = 0;                  // the SIGINT/SIGTERM that stopped the run early, or 0
  std::optional<EvalStats> final_eval;  // the last validation (none without a validation split)
  std::string last_checkpoint;
  std::string sample;                   // the greedy continuation of options.prompt ("" without a prompt)
};

// SIGINT/SIGTERM handlers that ask Trainer::run to save a checkpoint and return after the current
// step. A second signal of the same kind gets the default action (it ends the process at once).
void install_stop_handlers();
int requested_stop_signal();  // the signal received since the last clear, or 0
void clear_stop_request();

// Builds the optimizer of a run; the default makes FusedAdamW.
using OptimizerFactory = std::function<std::unique_ptr<Optimizer>(LCKVForCausalLM& model, const TrainOptions& options)>;

// Token windows [rows, T + 1] of a loader batch as int64 on `device`.
torch::Tensor batch_tensor(const data::Batch& batch, torch::Device device = torch::kCPU);

class Trainer {
 public:
  // Reads the data and the model config, builds the model, optimizer and loaders, locks `out` for
  // the trainer's lifetime, and with options.resume loads <out>/latest. `log` receives notes and
  // progress lines (nullptr: quiet). Throws TrainError (or the data/io layers' errors) naming what
  // is wrong; nothing in `out` but its lock file is written before every input has been checked.
  explicit Trainer(const TrainOptions& options, std::ostream* log = nullptr, const OptimizerFactory& make_optimizer = {});

  // One optimizer step over grad_accum micro-batches. Throws TrainError naming the step when the
  // loss or the gradient norm is not finite; the weights are then left as they were.
  StepStats train_step();
  // Loss over the validation split (or its first eval_batches batches); no autograd.
  EvalStats evaluate();
  // Writes <out>/step_NNNNNN and points <out>/latest at it; returns the directory.
  std::string save_checkpoint();
  // The greedy continuation of `prompt` (with the condensed KV cache); "" when a stop signal arrives.
  std::string generate_sample(const std::string& prompt, int64_t tokens);

  // Trains until total_steps(): progress lines, metrics records, periodic validation and
  // checkpoints, a final validation and checkpoint, then the sample of options.prompt. Returns early
  // (after saving a checkpoint) when a stop signal arrives; `after_step` (optional) is called after
  // each step.
  RunResult run(const std::function<void(const StepStats&)>& after_step = {});

  int64_t step() const { return step_; }
  int64_t total_steps() const { return total_steps_; }
  int64_t tokens_per_step() const { return options_.tokens_per_step(); }
  const TrainOptions& options() const { return options_; }
  const LCKVConfig& config() const { return model_->config; }
  const data::PreparedData& data() const { return data_; }
  LCKVForCausalLM& model() { return model_; }
  Optimizer& optimizer() { return *optimizer_; }
  torch::Device device() const { return device_; }
  int rank() const { return comm_ ? comm_->rank() : 0; }
  int world_size() const { return comm_ ? comm_->world_size() : 1; }
  // Data-parallel runs: bytes of gradients all-reduced (or reduce-scattered) per step; 0 otherwise.
  int64_t bytes_reduced_per_step() const { return sync_ ? sync_->bytes_per_step() : 0; }
  int64_t optimizer_state_bytes() const;  // this rank's AdamW moments (fused or sharded AdamW; 0 otherwise)
  const std::string& last_checkpoint() const { return last_checkpoint_; }

 private:
  void build(const OptimizerFactory& make_optimizer);
  void check_ranks_agree(const std::string& local_error);
  void write_outputs();
  int stop_signal() const;  // the stop agreed by the ranks in the last step (data parallel), else the local one
  void resume_from(const std::string& dir);
  void log_metrics(const nlohmann::json& record);
  torch::Tensor batch_loss(const data::Batch& batch);

  TrainOptions options_;
  bool dtype_auto_ = false;  // options.dtype was "auto" (resolved in the constructor; a resume keeps the checkpoint's)
  std::ostream* log_;
  data::PreparedData data_;
  torch::Device device_{torch::kCPU};
  LCKVForCausalLM model_{nullptr};
  std::unique_ptr<Communicator> comm_;  // data-parallel runs only
  std::unique_ptr<GradientSync> sync_;  // before optimizer_: a ShardedAdamW refers to it
  std::unique_ptr<Optimizer> optimizer_;
  ShardedAdamW* sharded_ = nullptr;     // optimizer_ when --shard-optimizer
  int agreed_stop_ = 0;
  int64_t save_count_ = 0;
  std::unique_ptr<data::TrainLoader> train_loader_;
  std::unique_ptr<data::SequentialLoader> val_loader_;  // null without a validation split
  std::unique_ptr<FileLock> out_lock_;
  int64_t total_steps_ = 0;
  int64_t step_ = 0;
  int64_t tokens_seen_ = 0;
  double elapsed_s_ = 0;  // training wall time of earlier sessions (resume) plus this one's
  std::string last_checkpoint_;
  std::string metrics_path_;
};

}  // namespace lckv::train
