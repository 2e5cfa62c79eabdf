// The LCKV decoder (docs/design.md §1): a Llama whose layers read the KVs of the layer named by
// `layer_types`. Two equivalent computations: the parallel iterative one (training, prefill)
// and the sequential definition (token by token).
#pragma once

#include <torch/torch.h>

#include <atomic>
#include <functional>
#include <optional>

#include "lckv/config.h"
#include "lckv/model/kv_store.h"
#include "lckv/model/layers.h"

namespace lckv {

// Called after each iteration of a cyclic segment, for every top target of the segment, with the
// KVs that target holds after that iteration (past + chunk): for analyses such as the convergence
// of the KVs over the iterations (the paper's Figure 3). `segment` indexes the iteration plan's segments.
using IterationObserver = std::function<void(int segment, int iteration, int layer, const torch::Tensor& k,
                                             const torch::Tensor& v)>;

// Called with the hidden states [B, T, H] of a chunk as transformers' output_hidden_states reports
// them: index 0 the embedding output, index i in [1, L) the output of layer i - 1 (of the final
// iteration of its segment), index L the last layer's output after the final norm.
using HiddenStateObserver = std::function<void(int index, const torch::Tensor& hidden)>;

// Options of the parallel iterative forward: how many times each cyclic segment runs
// (`forward_passes` (m) iterations without autograd, then `backward_passes` (b) with autograd;
// under no-grad every iteration is a no-grad one) and an optional observer of the KVs.
struct IterationOptions {
  int forward_passes = 7;
  int backward_passes = 2;
  IterationObserver observer;  // optional
  // > 0: stop the no-grad iterations of a segment early once they have converged: when no top
  // target's chunk K or V changed by more than tolerance x its largest magnitude between two
  // iterations, the remaining no-grad ones would only repeat it up to rounding (the iteration's
  // fixed point is the sequential result), so the segment goes on with its grad / final iteration.
  // 0: always run every iteration (training: the counts shape the computation).
  double tolerance = 0;
  HiddenStateObserver hidden_states;  // optional
  // false: the caller vouches that input_ids lie in [0, vocab_size) and forward_chunk skips its range
  // check, a device-to-host sync (a static decode step checks its tokens on the host, and a CUDA
  // graph capture forbids syncs).
  bool check_ids = true;
};

// The convergence tolerance of exact prefill: a small multiple of the dtype's rounding (the fp32
// change between iterations plateaus near 1e-6 relative rather than reaching 0).
double convergence_tolerance(torch::ScalarType dtype);

struct LCKVModelImpl : torch::nn::Module {
  explicit LCKVModelImpl(const LCKVConfig& c);

  // Final normed hidden states [B, T, H] of a chunk of tokens whose first token sits at position
  // kv.past_length(); the chunk's KVs are left in `kv`. positions: optional [B, T] absolute positions
  // for RoPE (defaults to past_length() + t).
  torch::Tensor forward_chunk(const torch::Tensor& input_ids, KVStore& kv, const IterationOptions& counts,
                              const torch::Tensor& positions = {});
  // The parallel iterative forward over a whole sequence (training).
  torch::Tensor forward(const torch::Tensor& input_ids, const IterationOptions& counts);
  // The sequential definition: one token at a time through all layers (`hidden_states`, if set, is
  // called for every token: one chunk of one token).
  torch::Tensor forward_sequential(const torch::Tensor& input_ids, const HiddenStateObserver& hidden_states = {});

  LCKVConfig config;
  IterationPlan plan;
  RotaryEmbedding rotary;
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  std::vector<DecoderLayer> layer_list;  // typed handles into `layers`
  RMSNorm norm{nullptr};
  // Iterations run as one thread per slice of the batch (run_cyclic_segment says when): a count for tests.
  std::atomic<int64_t> batch_sliced_iterations{0};

 private:
  // Layers [seg.first, stop] of one iteration on x; the last one only writes its KVs unless `whole`.
  torch::Tensor run_layers(const Segment& seg, int stop, bool whole, torch::Tensor x, const torch::Tensor& cos,
                           const torch::Tensor& sin, KVStore& kv, const HiddenStateObserver& hidden_states);
  // The same for a no-grad iteration, one parallel task per slice of the batch (kv a SequenceKV at position 0).
  torch::Tensor run_layers_by_batch_slices(const Segment& seg, int stop, bool whole, const torch::Tensor& x,
                                           const torch::Tensor& cos, const torch::Tensor& sin, KVStore& kv);
  torch::Tensor run_cyclic_segment(int segment, const Segment& seg, const torch::Tensor& h, const torch::Tensor& cos,
                                   const torch::Tensor& sin, KVStore& kv, const IterationOptions& counts);
};
TORCH_MODULE(LCKVModel);

struct CausalLMOutput {
  torch::Tensor logits;  // [B, T, V]
  torch::Tensor loss;    // scalar, undefined without labels
};

struct LCKVForCausalLMImpl : torch::nn::Module {
  explicit LCKVForCausalLMImpl(const LCKVConfig& c);

  // Hugging Face semantics: `labels` are aligned with input_ids and shifted inside (the logits
  // at t predict labels[t + 1]); -100 is ignored. counts default to the config's m and b, and
  // config.use_sequential selects the sequential definition.
  CausalLMOutput forward(const torch::Tensor& input_ids, const torch::Tensor& labels = {},
                         std::optional<IterationOptions> counts = std::nullopt);
  CausalLMOutput forward_sequential(const torch::Tensor& input_ids, const torch::Tensor& labels = {},
                                    const HiddenStateObserver& hidden_states = {});
  // The mean next-token loss of input_ids [B, T] against targets [B, T] that are already next-token
  // targets (targets[t] is predicted at t; -100 ignored): what training and validation minimise.
  // Same computation as forward (iterations default to the config's; use_sequential honoured).
  torch::Tensor next_token_loss(const torch::Tensor& input_ids, const torch::Tensor& targets,
                                std::optional<IterationOptions> iterations = std::nullopt);
  // Final normed hidden states [B, T, H]: the parallel iterative forward, or the sequential
  // definition when config.use_sequential.
  torch::Tensor hidden_states(const torch::Tensor& input_ids, std::optional<IterationOptions> iterations = std::nullopt);
  // Logits from final hidden states (tied or untied head).
  torch::Tensor lm_logits(const torch::Tensor& hidden);

  IterationOptions default_iterations() const { return {config.forward_passes, config.backward_passes}; }

  LCKVConfig config;
  LCKVModel model{nullptr};
  torch::nn::Linear lm_head{nullptr};  // null when tie_word_embeddings
};
TORCH_MODULE(LCKVForCausalLM);

// Mean cross-entropy of logits [B, T, V] against targets [B, T] that are already next-token
// targets (targets[t] is predicted by logits[t]); entries equal to ops::kIgnoreIndex are ignored.
// Computed in fp32 (fp64 for fp64 logits).
torch::Tensor lm_loss(const torch::Tensor& logits, const torch::Tensor& targets);

// Llama initialisation: normal(0, initializer_range) weights, zero biases, unit norm weights.
void init_weights(LCKVForCausalLM& model);
// The rule init_weights applies to one parameter, by its name (conversion draws fresh K/V projections
// with it); `generator` defaults to torch's default CPU generator.
void init_parameter(const std::string& name, torch::Tensor& p, double std,
                    std::optional<at::Generator> generator = std::nullopt);

// The model of the config file at config_path with init_weights' random weights (tools and
// benchmarks); vocab_size > 0 replaces the file's vocab_size.
LCKVForCausalLM random_model(const std::string& config_path, int64_t vocab_size = 0);

}  // namespace lckv
