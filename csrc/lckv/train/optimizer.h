// Optimisation for the trainer: the learning-rate schedule, the weight-decay parameter groups, and
// the optimizer seam. The trainer talks to an `Optimizer`; the default is AdamW with fp32 state
// stepped by ATen's fused kernel, and Python's trainer can pass one built on torch.optim instead.
//
// Weight decay applies to the matrices: every 2-D parameter (projections, embeddings, lm_head), as
// in llm.c; norm weights and biases are not decayed.
#pragma once

#include <torch/torch.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lckv/model/lckv_model.h"
#include "lckv/train/options.h"

namespace lckv::train {

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

// What the trainer needs of an optimizer. `kind()` is recorded in checkpoints: a run resumes only
// with the kind of optimizer that wrote its optimizer.pt.
class Optimizer {
 public:
  virtual ~Optimizer() = default;
  virtual std::string kind() const = 0;
  virtual void set_lr(double lr) = 0;  // every parameter group
  virtual void zero_grad() = 0;
  virtual void step() = 0;
  virtual void save(const std::string& path) = 0;
  virtual void load(const std::string& path, torch::Device device) = 0;
};

// AdamW over weight_decay_groups with the run's betas, eps and weight decay; state in fp32 (the
// parameters' dtype); optimizer.pt is torch::save of the libtorch AdamW.
class FusedAdamW : public Optimizer {
 public:
  FusedAdamW(LCKVForCausalLM& model, const TrainOptions& o);
  std::string kind() const override { return "adamw"; }
  void set_lr(double lr) override;
  void zero_grad() override { adamw_->zero_grad(); }
  void step() override;
  void save(const std::string& path) override;
  void load(const std::string& path, torch::Device device) override;
  torch::optim::AdamW& adamw() { return *adamw_; }

 private:
  std::unique_ptr<torch::optim::AdamW> adamw_;
};

// One step of `opt` for every parameter with a gradient, through ATen's fused multi-tensor AdamW
// kernel (one pass per parameter instead of libtorch's ~10 elementwise ops; what
// torch.optim.AdamW(fused=True) runs). The moments live in the optimizer's own per-parameter state,
// so torch::save/load of the optimizer (the checkpoint format) is unchanged.
void fused_adamw_step(torch::optim::AdamW& opt);

}  // namespace lckv::train
