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

// The processed logits [B, V] (CPU; fp32, or fp64 for fp64 logits; filtered tokens at -inf) that
// sampling draws from, bitwise what the ATen ops of the definition give: x * p / x / p for the penalty,
// x / temperature, top-k keeps every token tied with the k-th (x < kth value dropped), top-p ranks
// tokens by logit, ties by token id, and drops a token when (cumsum - p) >= top_p in rank order, with
// p = softmax(x) and ATen's CPU cumsum. Computed per row (parallel over rows), ranking only as much of
// each row as its cut needs, not sorting the vocabulary. seen: [B, V] bool of tokens already in each
// sequence, or undefined (no repetition penalty).
torch::Tensor process_logits(const torch::Tensor& logits, const SamplingConfig& c, const torch::Tensor& seen);

// Next token ids [B] (int64) from logits [B, V]: greedy is argmax (the first maximum); sampling draws
// from softmax(process_logits(...)) by inverse CDF with one uniform per row, taken from `generator`
// (CPU) in row order, so a row's token depends only on its logits and its place in the batch. Throws
// when a row has no token to draw (all -inf or NaN).
torch::Tensor select_next_tokens(const torch::Tensor& logits, const SamplingConfig& c, const torch::Tensor& seen,
                                 at::Generator& generator);

}  // namespace lckv
