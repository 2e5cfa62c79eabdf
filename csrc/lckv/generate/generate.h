// Generation with the condensed KV cache (docs/design.md §4): batched prompts of different lengths
// (left-padded, pads masked per sequence), prefill in chunks, then one token per step through all
// layers; optional StreamingLLM eviction for generation beyond the cache.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "lckv/cache/condensed_kv_cache.h"
#include "lckv/generate/sampling.h"
#include "lckv/model/lckv_model.h"

namespace lckv {

// How the prompt's cyclic segments are iterated.
//   exact: the prompt's KVs equal the sequential definition: each cyclic segment iterates until its
//          top targets' KVs stop changing (to the compute dtype's rounding, convergence_tolerance),
//          at most as many times as the chunk has tokens (the theorem's bound).
//   iterative: the config's forward_passes + backward_passes iterations, as in training (the paper's choice).
enum class PrefillMode { kExact, kIterative };
PrefillMode parse_prefill_mode(const std::string& name);  // "exact" | "iterative"
std::string to_string(PrefillMode mode);

// How each decode step runs (prefill is always dynamic).
//   dynamic:    attention over the slots written so far (the fewest FLOPs; the default).
//   static:     fixed shapes over the whole preallocated cache, the position in a device tensor
//               (CondensedKVCache::set_static), so the step is the same operations at every position;
//               the same logits as dynamic up to rounding (the same keys; hidden ones weigh exactly 0).
//   cuda_graph: the static step captured once in a CUDA graph and replayed (gpt-fast's
//               "reduce-overhead"): no launch overhead per op. CUDA models only.
enum class DecodeStep { kDynamic, kStatic, kCudaGraph };
DecodeStep parse_decode_step(const std::string& name);  // "dynamic" | "static" | "cuda_graph"
std::string to_string(DecodeStep step);

struct GenerationConfig {
  int64_t max_new_tokens = 32;
  SamplingConfig sampling;
  uint64_t seed = 0;                  // seeds the sampling draws
  std::vector<int64_t> stop_tokens;   // a sequence ends after emitting one of these (it is kept in the output)
  PrefillMode prefill = PrefillMode::kIterative;
  int64_t prefill_chunk = 0;          // prompt tokens per prefill chunk; 0 = the whole prompt at once
  int64_t cache_capacity = 0;         // slots per sequence; 0 = longest prompt + max_new_tokens
  std::optional<StreamingOptions> streaming;  // StreamingLLM: evict old slots instead of failing when full
  int64_t vocab_limit = 0;            // sample only ids < vocab_limit (a tokenizer smaller than the model); 0 = all
  bool return_logits = false;         // keep the raw logits of every step in the result
  DecodeStep decode_step = DecodeStep::kDynamic;  // see DecodeStep
  void validate() const;              // throws std::invalid_argument naming the field
};

struct GenerationStats {
  int64_t batch = 0;
  int64_t prompt_tokens = 0;     // real prompt tokens (no padding), summed over the batch
  int64_t padded_prompt_length = 0;
  int64_t steps = 0;             // decode steps (tokens chosen per sequence, finished or not)
  int64_t new_tokens = 0;        // tokens emitted, summed over sequences (stops at each one's stop token)
  double prefill_seconds = 0, decode_seconds = 0;
  int64_t cache_bytes = 0;       // the condensed cache's buffers
  int64_t cache_capacity = 0;
  int64_t evicted = 0;           // slots evicted by StreamingLLM
};

struct GenerationResult {
  std::vector<std::vector<int64_t>> tokens;  // new tokens of each sequence
  torch::Tensor logits;                      // [B, steps, V] raw logits each token was chosen from (return_logits)
  GenerationStats stats;
};

// Called after every step with the chosen tokens [B] (int64, CPU) and which sequences were still
// active (had not stopped) before the step; returning false ends generation after this step.
using TokenCallback = std::function<bool(const torch::Tensor& tokens, const std::vector<bool>& active)>;

// Generates continuations of `prompts` (token ids, each non-empty and < vocab_size) in one batch.
// The cache is allocated in the dtype and on the device of the model's parameters.
GenerationResult generate(LCKVForCausalLM& model, const std::vector<std::vector<int64_t>>& prompts,
                          const GenerationConfig& config, const TokenCallback& on_tokens = {});

// Mean negative log-likelihood per predicted token of `ids` (one sequence, >= 2 tokens), fed one
// token per step through a cache of `cache_capacity` slots as generation would: with StreamingLLM
// this measures how well the model keeps predicting beyond its cache (perplexity = exp of it);
// sink_tokens 0 is the plain sliding window.
double decode_nll(LCKVForCausalLM& model, const std::vector<int64_t>& ids, int64_t cache_capacity,
                  const std::optional<StreamingOptions>& streaming);

// Throws std::invalid_argument when a tokenizer with `tokenizer_vocab` ids cannot be used with the
// model (it could produce ids the model has no embedding for).
void check_tokenizer_vocab(const LCKVConfig& config, int64_t tokenizer_vocab, const std::string& tokenizer_path);

}  // namespace lckv
