#include "lckv/train/evaluate.h"

#include <cmath>
#include <limits>

#include "lckv/autocast.h"
#include "lckv/train/trainer.h"

namespace lckv::train {

torch::Tensor window_loss(LCKVForCausalLM& model, const data::Batch& batch, const WindowEval& o, torch::Device device) {
  const torch::Tensor ids = batch_tensor(batch, device);
  AutocastScope autocast(device.type(), at::kBFloat16, o.bf16);
  return model->next_token_loss(ids.narrow(1, 0, o.seq_len), ids.narrow(1, 1, o.seq_len), o.iterations);
}

std::pair<double, int64_t> loss_sum(LCKVForCausalLM& model, data::SequentialLoader& loader, const WindowEval& o,
                                    torch::Device device) {
  torch::NoGradGuard no_grad;
  model->eval();
  loader.reset();
  double sum = 0;
  int64_t tokens = 0, batches = 0;
  while (auto batch = loader.next()) {
    if (o.max_batches > 0 && batches == o.max_batches) break;
    const torch::Tensor loss = window_loss(model, *batch, o, device);
    const int64_t n = batch->rows * o.seq_len;
    sum += loss.item<double>() * static_cast<double>(n);
    tokens += n;
    ++batches;
  }
  return {sum, tokens};
}

EvalStats eval_stats(double loss_sum, int64_t tokens) {
  EvalStats e;
  e.tokens = tokens;
  e.loss = tokens > 0 ? loss_sum / static_cast<double>(tokens) : std::numeric_limits<double>::quiet_NaN();
  e.ppl = std::exp(e.loss);
  return e;
}

IterationOptions exact_iterations(int64_t seq_len, bool bf16, torch::ScalarType weights) {
  return IterationOptions{static_cast<int>(seq_len), 1, {}, convergence_tolerance(bf16 ? torch::kBFloat16 : weights)};
}

}  // namespace lckv::train
