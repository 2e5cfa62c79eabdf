#include "lckv/generate/sampling.h"

#include <limits>
#include <sstream>
#include <stdexcept>

#include "lckv/ops/accumulate.h"

namespace lckv {

void SamplingConfig::validate() const {
  auto fail = [](const std::string& field, double value, const std::string& expected) {
    std::ostringstream msg;
    msg << "sampling: " << field << " = " << value << " is invalid: expected " << expected;
    throw std::invalid_argument(msg.str());
  };
  // Greedy decoding ignores the temperature, but a negative or NaN one is a mistake either way; 0 is
  // greedy's own spelling (lckv-generate --temperature 0), so with do_sample it is refused, as in HF.
  if (!(temperature >= 0)) fail("temperature", temperature, ">= 0 (> 0 to sample; greedy ignores it)");
  if (do_sample && temperature == 0) {
    fail("temperature", temperature, "> 0 with do_sample (for greedy decoding turn do_sample off)");
  }
  if (top_k < 0) fail("top_k", static_cast<double>(top_k), ">= 0 (0 disables it)");
  if (!(top_p > 0 && top_p <= 1)) fail("top_p", top_p, "a value in (0, 1]");
  if (!(repetition_penalty > 0)) fail("repetition_penalty", repetition_penalty, "> 0 (1 disables it)");
}

torch::Tensor process_logits(const torch::Tensor& logits, const SamplingConfig& c, const torch::Tensor& seen) {
  TORCH_CHECK(logits.dim() == 2, "sampling: logits must be [batch, vocab], got ", logits.sizes());
  const auto dt = ops::accumulate_dtype(logits.scalar_type());
  torch::Tensor x = logits.to(dt, /*non_blocking=*/false, /*copy=*/true);
  if (c.repetition_penalty != 1.0 && seen.defined()) {
    TORCH_CHECK(seen.sizes() == logits.sizes(), "sampling: seen must be ", logits.sizes(), ", got ", seen.sizes());
    torch::Tensor penalised = torch::where(x < 0, x * c.repetition_penalty, x / c.repetition_penalty);
    x = torch::where(seen, penalised, x);
  }
  if (!c.do_sample) return x;
  x.div_(c.temperature);
  const double neg_inf = -std::numeric_limits<double>::infinity();
  if (c.top_k > 0 && c.top_k < x.size(-1)) {
    torch::Tensor kth = std::get<0>(x.topk(c.top_k, -1)).narrow(-1, c.top_k - 1, 1);
    x.masked_fill_(x < kth, neg_inf);
  }
  if (c.top_p < 1.0) {
    auto [sorted, order] = x.sort(-1, /*descending=*/true);
    torch::Tensor probs = sorted.softmax(-1);
    // Drop a token when the tokens ranked before it already hold top_p of the mass (the first stays).
    torch::Tensor drop_sorted = (probs.cumsum(-1) - probs) >= c.top_p;
    x.masked_fill_(torch::zeros_like(drop_sorted).scatter(-1, order, drop_sorted), neg_inf);
  }
  return x;
}

torch::Tensor select_next_tokens(const torch::Tensor& logits, const SamplingConfig& c, const torch::Tensor& seen,
                                 at::Generator& generator) {
  torch::Tensor x = process_logits(logits, c, seen);
  if (!c.do_sample) return x.argmax(-1);
  return torch::multinomial(x.softmax(-1), 1, /*replacement=*/false, generator).squeeze(-1);
}

}  // namespace lckv
