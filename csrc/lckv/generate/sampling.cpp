#include "lckv/generate/sampling.h"

#include <algorithm>
#include <limits>
#include <sstream>
#include <tuple>
#include <stdexcept>

#include "lckv/ops/accumulate.h"

namespace lckv {
namespace {

// Top-p in place on x [B, V]: ranked by logit (ties by token id), a token is dropped (set to -inf)
// when the tokens ranked before it already hold top_p of the mass (softmax(x) in token order, summed
// in rank order); the first always stays. Only the top n candidates of each row are ranked, not the
// vocabulary: n = 64 first, grown while some row's cut may lie past its candidates, up to n = V
// (one full sort, as before) at worst. The candidates' probabilities and their running sum are the very numbers a
// full sort would give, so the cut is the same to the last bit.
void keep_nucleus(torch::Tensor& x, double top_p) {
  const int64_t V = x.size(-1);
  const torch::Tensor all_probs = x.softmax(-1);
  for (int64_t n = std::min<int64_t>(V, 64);;) {
    torch::Tensor ranked, ids;
    if (n == V) {  // a full stable sort ranks ties by token id by itself
      std::tie(ranked, ids) = x.sort(/*stable=*/true, -1, /*descending=*/true);
    } else {
      auto [values, top] = x.topk(n, -1);
      // Rank the candidates by value, ties by token id: sort by id, then stably by value.
      auto [by_id, perm] = top.sort(-1);
      torch::Tensor order;
      std::tie(ranked, order) = values.gather(-1, perm).sort(/*stable=*/true, -1, /*descending=*/true);
      ids = by_id.gather(-1, order);
    }
    const torch::Tensor probs = all_probs.gather(-1, ids);
    const torch::Tensor cumsum = probs.cumsum(-1);
    const torch::Tensor drop = (cumsum - probs) >= top_p;
    if (n < V) {
      // A row is settled when it drops a candidate above its smallest candidate value: every token
      // ranked before that one is a candidate and every one after it is dropped. Or when the
      // smallest candidate is -inf: the tokens outside the candidates are filtered already.
      const torch::Tensor smallest = ranked.narrow(-1, n - 1, 1);
      const torch::Tensor settled =
          drop.logical_and(ranked > smallest).any(-1).logical_or(smallest.squeeze(-1).isneginf());
      if (!settled.all().item<bool>()) {
        // The tokens left are no more likely than the smallest candidate, so an unsettled row needs
        // at least (top_p - mass so far) / that probability more: grow to that (at least 8x), and
        // to a full sort when that is a large part of the vocabulary anyway.
        const torch::Tensor missing = (top_p - cumsum.narrow(-1, n - 1, 1)).clamp_min(0) /
                                      probs.narrow(-1, n - 1, 1).clamp_min(std::numeric_limits<float>::min());
        const double need = missing.masked_fill(settled.unsqueeze(-1), 0).max().item<double>();
        const double next = std::max<double>(8.0 * n, 1.25 * (n + need));
        n = next >= V / 4.0 ? V : static_cast<int64_t>(next);
        continue;
      }
    }
    const torch::Tensor keep = torch::zeros_like(x, torch::kBool).scatter_(-1, ids, drop.logical_not());
    x.masked_fill_(keep.logical_not(), -std::numeric_limits<double>::infinity());
    return;
  }
}

}  // namespace

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
  if (c.top_p < 1.0) keep_nucleus(x, c.top_p);
  return x;
}

torch::Tensor select_next_tokens(const torch::Tensor& logits, const SamplingConfig& c, const torch::Tensor& seen,
                                 at::Generator& generator) {
  torch::Tensor x = process_logits(logits, c, seen);
  if (!c.do_sample) return x.argmax(-1);
  return torch::multinomial(x.softmax(-1), 1, /*replacement=*/false, generator).squeeze(-1);
}

}  // namespace lckv
