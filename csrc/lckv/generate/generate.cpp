#include "lckv/generate/generate.h"

#include <ATen/autocast_mode.h>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>

#include "lckv/ops/accumulate.h"

#ifdef LCKV_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace lckv {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

template <typename... Args>
[[noreturn]] void invalid(const Args&... args) {
  std::ostringstream msg;
  (msg << ... << args);
  throw std::invalid_argument(msg.str());
}

void check_prompts(const std::vector<std::vector<int64_t>>& prompts, int64_t vocab_size) {
  if (prompts.empty()) invalid("generate: no prompts given");
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].empty()) invalid("generate: prompt ", i, " is empty (it needs at least one token, e.g. BOS)");
    for (size_t t = 0; t < prompts[i].size(); ++t) {
      const int64_t id = prompts[i][t];
      if (id < 0 || id >= vocab_size) {
        invalid("generate: prompt ", i, " has token id ", id, " at position ", t, ", outside the model's vocabulary [0, ",
                vocab_size, ")");
      }
    }
  }
}

// Refuses, before allocating, a cache of more elements than a model may have parameters
// (kMaxParameters, config.h): e.g. max_new_tokens near 2^63 without a cache_capacity.
void check_cache_size(const LCKVConfig& c, int64_t batch, int64_t capacity, torch::ScalarType dtype) {
  int64_t elements = 2 * static_cast<int64_t>(c.kv_layers().size());  // K and V of each KV layer
  bool fits = true;
  for (int64_t f : {batch, capacity, static_cast<int64_t>(c.num_key_value_heads), c.head_dim}) {
    fits = fits && !__builtin_mul_overflow(elements, f, &elements);
  }
  if (fits && elements <= kMaxParameters) return;
  int64_t bytes = 0;
  const std::string size =
      !fits ? std::string("more than 2^63 elements")
            : std::to_string(elements) + " elements (" +
                  (__builtin_mul_overflow(elements, static_cast<int64_t>(c10::elementSize(dtype)), &bytes)
                       ? std::string("more than 2^63")
                       : std::to_string(bytes)) +
                  " bytes in " + std::string(c10::toString(dtype)) + ")";
  invalid("generate: a KV cache of ", capacity, " slots for ", batch, " sequences would hold ", size,
          ", more than the limit of 2^40 elements; lower max_new_tokens or cache_capacity (StreamingLLM keeps a "
          "small cache for long generation)");
}

// Decode steps of fixed shapes (CondensedKVCache::set_static), run eagerly or captured once in a
// CUDA graph and replayed. The step reads its tokens from tokens_ and leaves its logits in logits_,
// both fixed tensors, as a graph needs; the cache's host bookkeeping (make_room, the device slot,
// eviction) runs before each step, outside the graph.
class StaticDecoder {
 public:
  StaticDecoder(LCKVForCausalLM& model, CondensedKVCache& cache, bool graph)
      : model_(model), cache_(cache), graph_(graph) {
    const torch::Tensor weight = model_->model->embed_tokens->weight;
    cache_.set_static(true);
    model_->model->rotary.keep_on(weight.device());  // the step computes its RoPE tables on the device
    tokens_ = torch::zeros({cache_.batch(), 1}, torch::TensorOptions(torch::kLong).device(weight.device()));
  }

  // One step on next [B] (int64, CPU; ids in the vocabulary, checked by the sampler that chose them):
  // the logits [B, V] of the following token.
  torch::Tensor step(const torch::Tensor& next) {
    cache_.make_room(1);
    tokens_.copy_(next.reshape({cache_.batch(), 1}));
    if (!graph_) {
      logits_ = forward();
      cache_.advance(1);
      return logits_;
    }
#ifdef LCKV_WITH_CUDA
    if (!captured_) capture();
    graph_step_->replay();
    cache_.advance_replayed();
    return logits_;
#else
    TORCH_CHECK(false, "generate: decode_step cuda_graph needs a build with CUDA");
#endif
  }

 private:
  torch::Tensor forward() {
    // One scope for profilers, and for the test that the step never syncs with the host (what a capture forbids).
    RECORD_FUNCTION("lckv::static_decode_step", std::vector<c10::IValue>());
    IterationOptions counts{0, 1};
    counts.check_ids = false;  // no device-to-host sync inside the step
    torch::Tensor h = model_->model->forward_chunk(tokens_, cache_, counts, cache_.device_positions());
    return model_->lm_logits(h).squeeze(1);
  }

#ifdef LCKV_WITH_CUDA
  // As torch.cuda.graph: warm up on a side stream (lazy initialisation, the allocator), capture there,
  // replay on the current stream. Each run of the step rewrites the same slot with the same KVs, so the
  // warm-up leaves the cache as the replay will. Autocast's weight-cast cache is off while capturing:
  // the casts become part of the graph (a cached cast would be a tensor the graph does not own).
  void capture() {
    struct AutocastCacheOff {  // restored on every exit, a failed capture's included
      bool was = at::autocast::is_autocast_cache_enabled();
      AutocastCacheOff() { at::autocast::set_autocast_cache_enabled(false); }
      ~AutocastCacheOff() { at::autocast::set_autocast_cache_enabled(was); }
    } autocast_cache_off;
    c10::cuda::device_synchronize();
    c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
    {
      c10::cuda::CUDAStreamGuard on_side(side);
      for (int warm_up = 0; warm_up < 2; ++warm_up) {
        logits_ = forward();
        cache_.discard_chunk();
      }
      side.synchronize();
      graph_step_ = std::make_unique<at::cuda::CUDAGraph>();
      graph_step_->capture_begin();
      logits_ = forward();
      graph_step_->capture_end();
      cache_.discard_chunk();
    }
    c10::cuda::device_synchronize();
    captured_ = true;
  }
  std::unique_ptr<at::cuda::CUDAGraph> graph_step_;
#endif

  LCKVForCausalLM& model_;
  CondensedKVCache& cache_;
  bool graph_;
  bool captured_ = false;
  torch::Tensor tokens_, logits_;
};

}  // namespace

DecodeStep parse_decode_step(const std::string& name) {
  if (name == "dynamic") return DecodeStep::kDynamic;
  if (name == "static") return DecodeStep::kStatic;
  if (name == "cuda_graph") return DecodeStep::kCudaGraph;
  invalid("decode step '", name, "' is unknown: expected 'dynamic', 'static' or 'cuda_graph'");
}

std::string to_string(DecodeStep step) {
  switch (step) {
    case DecodeStep::kStatic: return "static";
    case DecodeStep::kCudaGraph: return "cuda_graph";
    default: return "dynamic";
  }
}

PrefillMode parse_prefill_mode(const std::string& name) {
  if (name == "exact") return PrefillMode::kExact;
  if (name == "iterative") return PrefillMode::kIterative;
  invalid("prefill mode '", name, "' is unknown: expected 'exact' or 'iterative'");
}

std::string to_string(PrefillMode mode) { return mode == PrefillMode::kExact ? "exact" : "iterative"; }

void GenerationConfig::validate() const {
  sampling.validate();
  if (max_new_tokens < 1) invalid("generate: max_new_tokens must be >= 1, got ", max_new_tokens);
  if (prefill_chunk < 0) invalid("generate: prefill_chunk must be >= 0 (0 = whole prompt), got ", prefill_chunk);
  if (cache_capacity < 0) invalid("generate: cache_capacity must be >= 0 (0 = prompt + new tokens), got ", cache_capacity);
  if (vocab_limit < 0) invalid("generate: vocab_limit must be >= 0 (0 = whole vocabulary), got ", vocab_limit);
}

void check_tokenizer_vocab(const LCKVConfig& config, int64_t tokenizer_vocab, const std::string& tokenizer_path) {
  if (tokenizer_vocab > config.vocab_size) {
    invalid("tokenizer ", tokenizer_path, " has ", tokenizer_vocab, " tokens but the checkpoint's vocab_size is ",
            config.vocab_size, ": they do not belong together (the tokenizer may produce ids the model cannot embed)");
  }
}

GenerationResult generate(LCKVForCausalLM& model, const std::vector<std::vector<int64_t>>& prompts,
                          const GenerationConfig& config, const TokenCallback& on_tokens) {
  config.validate();
  const LCKVConfig& mc = model->config;
  check_prompts(prompts, mc.vocab_size);
  if (config.vocab_limit > mc.vocab_size) {
    invalid("generate: vocab_limit ", config.vocab_limit, " exceeds the model's vocab_size ", mc.vocab_size);
  }
  torch::NoGradGuard no_grad;
  const int64_t B = static_cast<int64_t>(prompts.size());
  int64_t max_len = 0, min_len = prompts[0].size();
  for (const auto& p : prompts) {
    max_len = std::max<int64_t>(max_len, p.size());
    min_len = std::min<int64_t>(min_len, p.size());
  }
  int64_t needed = 0;  // slots for the longest prompt and every new token
  const bool needed_fits = !__builtin_add_overflow(max_len, config.max_new_tokens, &needed);
  if (config.cache_capacity == 0 && !needed_fits) {
    invalid("generate: max_new_tokens (", config.max_new_tokens, ") plus the longest prompt (", max_len,
            " tokens) overflows int64; lower max_new_tokens, or set cache_capacity with StreamingLLM");
  }
  const int64_t capacity = config.cache_capacity > 0 ? config.cache_capacity : needed;
  check_cache_size(mc, B, capacity, model->model->embed_tokens->weight.scalar_type());
  if (!config.streaming && (!needed_fits || needed > capacity)) {
    invalid("generate: the cache of ", capacity, " slots cannot hold the longest prompt (", max_len,
            " tokens, padded) plus max_new_tokens (", config.max_new_tokens,
            "); enlarge cache_capacity or enable StreamingLLM (sink + recent window)");
  }

  const torch::Tensor weight = model->model->embed_tokens->weight;
  if (config.decode_step == DecodeStep::kCudaGraph) {
#ifdef LCKV_WITH_CUDA
    if (!weight.is_cuda()) {
      invalid("generate: decode_step cuda_graph needs the model on a CUDA device, it is on ", weight.device(),
              " (use dynamic or static there)");
    }
#else
    invalid("generate: decode_step cuda_graph needs a build with CUDA (LCKV_WITH_CUDA); this one has none");
#endif
  }
  CondensedKVCache cache(mc, B, capacity, weight.options(), config.streaming);
  // Left padding: every prompt ends at slot max_len - 1.
  torch::Tensor ids = torch::zeros({B, max_len}, torch::kLong);
  std::vector<int64_t> pads(B);
  for (int64_t b = 0; b < B; ++b) {
    pads[b] = max_len - static_cast<int64_t>(prompts[b].size());
    ids[b].narrow(0, pads[b], prompts[b].size()).copy_(torch::tensor(prompts[b], torch::kLong));
  }
  if (max_len != min_len) cache.set_key_start(torch::tensor(pads, torch::kLong));
  ids = ids.to(weight.device());

  const bool penalise = config.sampling.repetition_penalty != 1.0;
  torch::Tensor seen;
  if (penalise) {
    seen = torch::zeros({B, mc.vocab_size}, torch::kBool);
    for (int64_t b = 0; b < B; ++b) seen[b].index_fill_(0, torch::tensor(prompts[b], torch::kLong), true);
  }

  GenerationResult result;
  result.tokens.resize(B);
  GenerationStats& st = result.stats;
  st.batch = B;
  st.padded_prompt_length = max_len;
  st.cache_bytes = cache.memory_bytes();
  st.cache_capacity = capacity;
  for (const auto& p : prompts) st.prompt_tokens += p.size();

  // Runs one chunk [B, n] through the model on the cache; returns the final hidden states.
  auto run_chunk = [&](const torch::Tensor& chunk, const IterationOptions& counts) {
    const int64_t n = chunk.size(1);
    cache.make_room(n);
    torch::Tensor h = model->model->forward_chunk(chunk, cache, counts, cache.positions(n).to(weight.device()));
    cache.advance(n);
    return h;
  };

  // Prefill. With StreamingLLM a chunk must also fit in what eviction can free.
  auto t0 = Clock::now();
  int64_t chunk = config.prefill_chunk > 0 ? config.prefill_chunk : max_len;
  if (config.streaming) chunk = std::min(chunk, capacity - (max_len - min_len) - config.streaming->sink_tokens);
  if (chunk < 1) {
    invalid("generate: a cache of ", capacity, " slots leaves no room for prompt tokens after ",
            max_len - min_len, " pad and ", config.streaming->sink_tokens, " sink slots");
  }
  const at::DeviceType device_type = weight.device().type();
  const torch::ScalarType compute_dtype = at::autocast::is_autocast_enabled(device_type)
                                              ? at::autocast::get_autocast_dtype(device_type)
                                              : weight.scalar_type();
  torch::Tensor last_hidden;
  for (int64_t s = 0; s < max_len; s += chunk) {
    const int64_t n = std::min(chunk, max_len - s);
    // exact: iterate until the KVs stop changing (at most n iterations, the theorem's bound), to
    // the rounding of the dtype the layers compute in.
    const IterationOptions counts =
        config.prefill == PrefillMode::kExact
            ? IterationOptions{static_cast<int>(n), 1, {}, convergence_tolerance(compute_dtype)}
            : IterationOptions{mc.forward_passes, mc.backward_passes};
    torch::Tensor h = run_chunk(ids.narrow(1, s, n), counts);
    if (s + n == max_len) last_hidden = h.narrow(1, n - 1, 1);
  }
  torch::Tensor logits = model->lm_logits(last_hidden).squeeze(1);
  st.prefill_seconds = seconds_since(t0);

  // Decode: one token per step for every sequence; finished ones keep running, their tokens dropped.
  t0 = Clock::now();
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(config.seed);
  std::vector<bool> active(B, true);
  std::vector<torch::Tensor> step_logits;
  std::optional<StaticDecoder> static_decoder;
  if (config.decode_step != DecodeStep::kDynamic) {
    static_decoder.emplace(model, cache, config.decode_step == DecodeStep::kCudaGraph);
  }
  const auto logit_dtype = ops::accumulate_dtype(weight.scalar_type());
  // Plain greedy picks on the logits' device: only B ids cross to the host, not B x V logits (at large
  // batch on a GPU that copy and a host argmax would outweigh the step). The same tokens: argmax takes
  // the first maximum everywhere, and widening to the accumulate dtype is exact.
  const bool greedy_on_device = !config.sampling.do_sample && !penalise && !config.return_logits;
  for (int64_t step = 0; step < config.max_new_tokens; ++step) {
    torch::Tensor next;
    if (greedy_on_device) {
      const torch::Tensor l = config.vocab_limit > 0 ? logits.narrow(1, 0, config.vocab_limit) : logits;
      next = l.argmax(-1).to(torch::kCPU).contiguous();
    } else {
      torch::Tensor raw = logits.to(torch::kCPU, logit_dtype);
      if (config.return_logits) step_logits.push_back(raw);
      if (config.vocab_limit > 0) raw = raw.narrow(1, 0, config.vocab_limit);
      next = select_next_tokens(raw, config.sampling, penalise ? seen.narrow(1, 0, raw.size(1)) : torch::Tensor(),
                                generator);
    }
    const std::vector<bool> active_before = active;
    const auto next_acc = next.accessor<int64_t, 1>();
    for (int64_t b = 0; b < B; ++b) {
      if (!active[b]) continue;
      const int64_t id = next_acc[b];
      result.tokens[b].push_back(id);
      ++st.new_tokens;
      if (penalise) seen[b][id] = true;
      if (std::find(config.stop_tokens.begin(), config.stop_tokens.end(), id) != config.stop_tokens.end()) {
        active[b] = false;
      }
    }
    ++st.steps;
    const bool go_on = on_tokens ? on_tokens(next, active_before) : true;
    if (!go_on || step + 1 == config.max_new_tokens || std::none_of(active.begin(), active.end(), [](bool a) { return a; })) {
      break;
    }
    if (static_decoder) {
      logits = static_decoder->step(next);
    } else {
      torch::Tensor h = run_chunk(next.to(weight.device()).view({B, 1}), IterationOptions{0, 1});
      logits = model->lm_logits(h).squeeze(1);
    }
  }
  st.decode_seconds = seconds_since(t0);
  st.evicted = cache.evicted();
  if (config.return_logits) result.logits = torch::stack(step_logits, 1);
  return result;
}

double decode_nll(LCKVForCausalLM& model, const std::vector<int64_t>& ids, int64_t cache_capacity,
                  const std::optional<StreamingOptions>& streaming) {
  check_prompts({ids}, model->config.vocab_size);
  if (ids.size() < 2) invalid("decode_nll: needs at least 2 tokens, got ", ids.size());
  torch::NoGradGuard no_grad;
  const torch::Tensor weight = model->model->embed_tokens->weight;
  CondensedKVCache cache(model->config, 1, cache_capacity, weight.options(), streaming);
  double total = 0;
  for (size_t t = 0; t + 1 < ids.size(); ++t) {
    cache.make_room(1);
    torch::Tensor token = torch::full({1, 1}, ids[t], torch::kLong).to(weight.device());
    torch::Tensor h = model->model->forward_chunk(token, cache, IterationOptions{0, 1}, cache.positions(1).to(weight.device()));
    cache.advance(1);
    torch::Tensor target = torch::full({1, 1}, ids[t + 1], torch::kLong).to(weight.device());
    total += lm_loss(model->lm_logits(h), target).item<double>();
  }
  return total / static_cast<double>(ids.size() - 1);
}

}  // namespace lckv
