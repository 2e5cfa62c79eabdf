// The next-token loss of a model over the windows of a data split: what the trainer's validation
// reports and what lckv-eval / python -m lckv.eval compute for a checkpoint (one home, so the two
// agree exactly for the same windows, batch, dtype and threads).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <optional>
#include <string>

#include "lckv/data/dataset.h"
#include "lckv/model/lckv_model.h"

namespace lckv::train {

struct EvalStats {
  double loss = 0;  // mean next-token loss over the evaluated tokens
  double ppl = 0;   // exp(loss)
  int64_t tokens = 0;
};

struct WindowEval {
  int64_t seq_len = 256;    // T: each window predicts T tokens
  int64_t max_batches = 0;  // 0: the whole split
  bool bf16 = false;        // bf16 autocast (fp32 weights), as the trainer's dtype "bf16"
  std::optional<IterationOptions> iterations;  // default: the config's m and b
};

// The mean next-token loss of one loader batch of windows [rows, T + 1] (autograd as the caller's
// mode): what a training step and validation both compute per batch.
torch::Tensor window_loss(LCKVForCausalLM& model, const data::Batch& batch, const WindowEval& o, torch::Device device);

// Sum of per-token losses and the token count over `loader`'s windows from its start (no autograd;
// the model is left in eval mode). Sums, not means, so data-parallel ranks can add theirs.
std::pair<double, int64_t> loss_sum(LCKVForCausalLM& model, data::SequentialLoader& loader, const WindowEval& o,
                                    torch::Device device);

EvalStats eval_stats(double loss_sum, int64_t tokens);

// Iterations of exact evaluation: until the KVs converge (at most T), to the compute dtype's rounding.
IterationOptions exact_iterations(int64_t seq_len, bool bf16, torch::ScalarType weights);

}  // namespace lckv::train
