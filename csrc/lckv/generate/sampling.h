// Next-token selection from logits: greedy, or sampling with temperature, top-k and top-p
// (nucleus), after an optional repetition penalty. The rules and their order are Hugging Face's
// (RepetitionPenalty -> Temperature -> TopK -> TopP logits processors), batched over sequences.
#pragma once

#include <ATen/core/Generator.h>
#include <torch/torch.h>

namespace lckv {

struct SamplingConfig {
  bool do_sample = false;           // false: greedy (argmax after the repetition penalty)
  double temperature = 1.0;         // > 0 with do_sample, where it divides the logits; >= 0 (ignored) without
  int64_t top_k = 0;                // keep the k most likely tokens; 0 = all
  double top_p = 1.0;               // keep the smallest set of most likely tokens with mass >= top_p; 1 = all
  double repetition_penalty = 1.0;  // > 0; tokens already in the sequence: logit / p if > 0, logit * p if < 0
  // Throws std::invalid_argument naming the field and its value: temperature negative or NaN (or 0
  // with do_sample), top_k < 0, top_p outside (0, 1] or NaN, repetition_penalty <= 0 or NaN.
  void validate() const;
};

// The processed logits [B, V] (fp32 or fp64, filtered tokens at -inf) that sampling draws from. Top-k
// keeps every token tied with the k-th; top-p ranks tokens by logit, ties by token id, and ranks only
// as many top candidates (a partial selection, topk) as each row's cut needs, not the vocabulary.
// seen: [B, V] bool of tokens already in each sequence, or undefined (no repetition penalty).
torch::Tensor process_logits(const torch::Tensor& logits, const SamplingConfig& c, const torch::Tensor& seen);

// Next token ids [B] (int64) from logits [B, V]; `generator` seeds the draws (CPU).
torch::Tensor select_next_tokens(const torch::Tensor& logits, const SamplingConfig& c, const torch::Tensor& seen,
                                 at::Generator& generator);

}  // namespace lckv
