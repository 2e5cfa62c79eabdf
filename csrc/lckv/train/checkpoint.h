// The trainer's checkpoints: <out>/step_NNNNNN/ holding config.json + model.safetensors (fp32, HF
// tensor names: lckv::io::load_pretrained and from_pretrained load them), optimizer.pt (the
// optimizer's own state file) and trainer_state.json (step, tokens, elapsed time, data-loader
// position, CPU RNG state, the optimizer's kind, the run's options).
//
// Nothing is ever half-written: a checkpoint is assembled in <out>/.tmp_step_NNNNNN and renamed into
// place when complete; <out>/latest (replaced atomically) then names it; older checkpoints beyond
// `keep` are renamed out of the way before they are deleted. A failed save (a full disk) removes
// its temporary directory and leaves the previous checkpoint and `latest` as they were.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "lckv/data/dataset.h"
#include "lckv/model/lckv_model.h"
#include "lckv/train/optimizer.h"

namespace lckv::train {

struct TrainerState {
  int64_t step = 0;         // optimizer steps completed
  int64_t total_steps = 0;  // of the run that wrote it
  int64_t tokens_seen = 0;
  double elapsed_s = 0;     // training wall time so far
  data::LoaderState loader;
  torch::Tensor rng_cpu;    // the default CPU generator's state (uint8)
  std::string optimizer;    // Optimizer::kind()
  nlohmann::json options;   // TrainOptions::to_json() of the run
};

std::string checkpoint_name(int64_t step);  // "step_000123"

// Writes <out>/step_NNNNNN, points <out>/latest at it and keeps the newest `keep` checkpoints;
// returns the directory. `tokenizer` (a tokenizer file or a directory holding one; empty: none) is
// copied into it, so lckv-generate --model and from_pretrained find it there. Throws TrainError
// (previous checkpoint intact) when anything fails.
std::string save_checkpoint(const std::string& out, LCKVForCausalLM& model, Optimizer& optimizer,
                            const TrainerState& state, int keep, const std::string& tokenizer = "");

// The checkpoint directory <out>/latest names, or nothing when `out` holds none.
std::optional<std::string> latest_checkpoint(const std::string& out);

// Loads the weights and the optimizer state of checkpoint `dir` into `model` and `optimizer` and
// returns its trainer state. The checkpoint must have been written for this model (its config.json
// equal to model's config; the differences are listed otherwise) and by this kind of optimizer.
TrainerState load_checkpoint(const std::string& dir, LCKVForCausalLM& model, Optimizer& optimizer,
                             torch::Device device);

// Removes what a killed run may have left in `out`: .tmp_step_* and .trash_* entries.
void remove_stale_temporaries(const std::string& out);

torch::Tensor cpu_rng_state();
void set_cpu_rng_state(const torch::Tensor& state);

}  // namespace lckv::train
