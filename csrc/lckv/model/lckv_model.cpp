#include "lckv/model/lckv_model.h"

#include <ATen/Parallel.h>

#include <map>
#include <memory>

#include "lckv/ops/fused_ops.h"
#include "lckv/ops/accumulate.h"
#include "lckv/parallel_tasks.h"

namespace lckv {

LCKVModelImpl::LCKVModelImpl(const LCKVConfig& c) : config(c), plan(c.iteration_plan()), rotary(c) {
  config.validate();
  embed_tokens = register_module("embed_tokens", torch::nn::Embedding(c.vocab_size, c.hidden_size));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    layer_list.push_back(DecoderLayer(c, i));
    layers->push_back(layer_list.back());
  }
  norm = register_module("norm", RMSNorm(c.hidden_size, c.rms_norm_eps));
}

torch::Tensor LCKVModelImpl::run_cyclic_segment(int segment, const Segment& seg, const torch::Tensor& h, const torch::Tensor& cos,
                                                const torch::Tensor& sin, KVStore& kv, const IterationOptions& counts) {
  const int64_t B = h.size(0), T = h.size(1);
  // Before iteration 1 the top targets' KVs of this chunk are zeros.
  {
    torch::NoGradGuard no_grad;
    torch::Tensor zeros =
        torch::zeros({B, config.num_key_value_heads, T, config.head_dim}, h.options());
    for (int t : seg.top_targets) kv.write(t, zeros, zeros);
  }
  const bool grad = torch::GradMode::is_enabled();
  int total = counts.forward_passes + counts.backward_passes;
  // Without autograd T iterations already give the exact result (docs/design.md §1.3, the theorem) and
  // further ones reproduce it, so stop there. With autograd the count shapes the gradients.
  if (!grad) total = static_cast<int>(std::min<int64_t>(total, std::max<int64_t>(T, 1)));
  // Convergence (counts.tolerance > 0) is measured on the no-grad iterations: the first grad one
  // (or, without autograd, the final one) is where the loop jumps once the KVs stopped changing.
  const int last_no_grad = grad ? total - counts.backward_passes - 1 : total - 2;
  // Iterations without autograd of a CPU batch run as one task per slice of the batch, each slice's layers on one
  // thread, instead of every op waking the thread pool (~80 us a time on a VM whose idle cores wake slowly,
  // docs/design.md §7): a no-grad iteration 22 vs 26 ms in a quickstart training step, a no-grad forward 1.3x
  // faster. Sequences are independent, so a slice computes what the whole batch computes for it (up to the
  // matmuls' summation order). In training the no-grad iteration before the first grad one runs whole: the first
  // whole-batch iteration after sliced ones paid 4-25 ms more (not understood), cheapest there. Only where the
  // slices keep at least 3/4 of the threads busy (B = 4 on 16 threads would leave 12 idle that the per-op path
  // uses), and for a SequenceKV at position 0, whose reads are side-effect free; a cache keeps its own path.
  const int64_t threads = at::get_num_threads(), per_thread = (B + threads - 1) / threads;
  const bool slice_batch = h.device().is_cpu() && B >= 2 && threads >= 2 && 4 * B >= 3 * threads * per_thread &&
                           !at::in_parallel_region() && kv.past_length() == 0 &&
                           dynamic_cast<SequenceKV*>(&kv) != nullptr;
  std::vector<torch::Tensor> previous;  // the top targets' chunk K and V after the last iteration
  torch::Tensor out;
  for (int it = 0; it < total; ++it) {
    const bool last = it == total - 1;
    torch::AutoGradMode mode(grad && it >= total - counts.backward_passes);
    // Before the last iteration only the top targets' KVs matter: stop at the last one, and of
    // that layer compute only its K/V.
    const int stop = last ? seg.last : seg.last_top_target();
    // Only the last iteration's layer outputs are the model's (the earlier ones read unconverged KVs).
    const HiddenStateObserver observe = last ? counts.hidden_states : HiddenStateObserver();
    const bool sliced = slice_batch && !torch::GradMode::is_enabled() && !observe && (!grad || it < last_no_grad);
    torch::Tensor x = sliced ? run_layers_by_batch_slices(seg, stop, last, h, cos, sin, kv)
                             : run_layers(seg, stop, last, h, cos, sin, kv, observe);
    if (last) out = x;
    if (counts.observer) {
      for (int t : seg.top_targets) {
        KV target_kv = kv.read(t);
        counts.observer(segment, it, t, target_kv.k, target_kv.v);
      }
    }
    if (counts.tolerance > 0 && it <= last_no_grad) {
      torch::NoGradGuard no_grad;
      std::vector<torch::Tensor> current;
      double change = 0;
      for (int t : seg.top_targets) {
        const KV target_kv = kv.read(t);
        for (const torch::Tensor& x_kv : {target_kv.k, target_kv.v}) {
          // clone: a cache writes the next iteration's KVs into the same slots
          current.push_back(x_kv.narrow(2, kv.past_length(), T).clone());
          if (previous.empty()) continue;
          const torch::Tensor& before = previous[current.size() - 1];
          const double scale = current.back().abs().max().item<double>();
          const double diff = (current.back() - before).abs().max().item<double>();
          change = std::max(change, scale > 0 ? diff / scale : diff);
        }
      }
      const bool converged = !previous.empty() && change <= counts.tolerance;
      previous = std::move(current);
      if (converged) it = last_no_grad;  // next: the first grad iteration, or the final one
    }
  }
  return out;
}

torch::Tensor LCKVModelImpl::run_layers(const Segment& seg, int stop, bool whole, torch::Tensor x,
                                        const torch::Tensor& cos, const torch::Tensor& sin, KVStore& kv,
                                        const HiddenStateObserver& hidden_states) {
  for (int l = seg.first; l <= stop; ++l) {
    if (!whole && l == stop) {
      layer_list[l]->write_kv(x, cos, sin, kv);
    } else {
      x = layer_list[l]->forward(x, cos, sin, kv);
      if (hidden_states && l + 1 < config.num_hidden_layers) hidden_states(l + 1, x);
    }
  }
  return x;
}

namespace {

// One slice [b0, b0 + n) of a SequenceKV's batch, for one iteration run by one thread: a layer reads what this
// slice wrote in the iteration, else its slice of the store (the previous iteration's KVs, unchanged while the
// slices run); writes stay here until the slices are joined.
class BatchSliceKV : public KVStore {
 public:
  BatchSliceKV(KVStore& whole, int64_t b0, int64_t n) : whole_(whole), b0_(b0), n_(n) {}
  int64_t past_length() const override { return 0; }
  void write(int layer, const torch::Tensor& k, const torch::Tensor& v) override { written_[layer] = {k, v}; }
  KV read(int layer) override {
    const auto it = written_.find(layer);
    if (it != written_.end()) return it->second;
    const KV all = whole_.read(layer);
    return {all.k.narrow(0, b0_, n_), all.v.narrow(0, b0_, n_)};
  }
  torch::Tensor key_start() const override {
    const torch::Tensor ks = whole_.key_start();
    return ks.defined() ? ks.narrow(0, b0_, n_) : ks;
  }
  const std::map<int, KV>& written() const { return written_; }

 private:
  KVStore& whole_;
  int64_t b0_, n_;
  std::map<int, KV> written_;
};

}  // namespace

torch::Tensor LCKVModelImpl::run_layers_by_batch_slices(const Segment& seg, int stop, bool whole,
                                                        const torch::Tensor& x, const torch::Tensor& cos,
                                                        const torch::Tensor& sin, KVStore& kv) {
  const int64_t B = x.size(0), slices = std::min<int64_t>(B, at::get_num_threads());
  std::vector<torch::Tensor> outs(slices);
  std::vector<std::unique_ptr<BatchSliceKV>> stores(slices);
  auto slice_of = [&](const torch::Tensor& t, int64_t b0, int64_t n) {
    return t.size(0) == B ? t.narrow(0, b0, n) : t;  // cos/sin: per sequence, or one table for all
  };
  parallel_tasks(slices, [&](int64_t s) {
    const int64_t b0 = s * B / slices, n = (s + 1) * B / slices - b0;
    stores[s] = std::make_unique<BatchSliceKV>(kv, b0, n);
    outs[s] = run_layers(seg, stop, whole, x.narrow(0, b0, n), slice_of(cos, b0, n), slice_of(sin, b0, n),
                         *stores[s], {});
  });
  for (const auto& [layer, first] : stores[0]->written()) {
    std::vector<torch::Tensor> ks, vs;
    for (const auto& store : stores) {
      ks.push_back(store->written().at(layer).k);
      vs.push_back(store->written().at(layer).v);
    }
    kv.write(layer, torch::cat(ks, 0), torch::cat(vs, 0));
  }
  ++batch_sliced_iterations;
  return whole ? torch::cat(outs, 0) : torch::Tensor();
}

double convergence_tolerance(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kDouble: return 1e-13;
    case torch::kFloat: return 4e-6;
    case torch::kHalf: return 2e-3;  // about 4 units of fp16 rounding (2^-11)
    default: return 1.6e-2;          // bfloat16: about 4 units of its rounding (2^-8)
  }
}

torch::Tensor LCKVModelImpl::forward_chunk(const torch::Tensor& input_ids, KVStore& kv, const IterationOptions& counts,
                                           const torch::Tensor& positions) {
  TORCH_CHECK(input_ids.dim() == 2, "input_ids must be [batch, tokens], got ", input_ids.sizes());
  TORCH_CHECK(input_ids.scalar_type() == torch::kLong || input_ids.scalar_type() == torch::kInt,
              "input_ids must be int64 or int32, got ", input_ids.scalar_type());
  TORCH_CHECK(input_ids.device() == embed_tokens->weight.device(), "input_ids is on ", input_ids.device(),
              " but the model's parameters are on ", embed_tokens->weight.device());
  TORCH_CHECK(counts.forward_passes >= 0 && counts.forward_passes <= kMaxPasses, "forward_passes must be in [0, ",
              kMaxPasses, "], got ", counts.forward_passes);
  TORCH_CHECK(counts.backward_passes >= 1 && counts.backward_passes <= kMaxPasses, "backward_passes must be in [1, ",
              kMaxPasses, "], got ", counts.backward_passes);
  TORCH_CHECK(input_ids.size(1) > 0, "input_ids must hold at least one token per sequence, got ", input_ids.sizes());
  if (counts.check_ids && input_ids.numel() > 0) {
    const int64_t lo = input_ids.min().item<int64_t>(), hi = input_ids.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < config.vocab_size, "input_ids must lie in [0, vocab_size = ", config.vocab_size,
                "), got values in [", lo, ", ", hi, "]");
  }
  const int64_t T = input_ids.size(1);
  torch::Tensor h = embed_tokens(input_ids.to(torch::kLong));
  torch::Tensor pos = positions.defined()
                          ? positions
                          : torch::arange(kv.past_length(), kv.past_length() + T, input_ids.options().dtype(torch::kLong));
  // Tables in the rotation's compute precision; ops::apply_rotary keeps q/k in their own dtype.
  auto [cos, sin] = rotary.cos_sin(pos, ops::accumulate_dtype(h.scalar_type()));
  const int L = config.num_hidden_layers;
  if (counts.hidden_states) counts.hidden_states(0, h);
  for (size_t s = 0; s < plan.segments.size(); ++s) {
    const Segment& seg = plan.segments[s];
    if (seg.cyclic) {
      h = run_cyclic_segment(static_cast<int>(s), seg, h, cos, sin, kv, counts);
    } else {
      h = layer_list[seg.first]->forward(h, cos, sin, kv);
      if (counts.hidden_states && seg.first + 1 < L) counts.hidden_states(seg.first + 1, h);
    }
  }
  torch::Tensor out = norm(h);
  if (counts.hidden_states) counts.hidden_states(L, out);
  return out;
}

torch::Tensor LCKVModelImpl::forward(const torch::Tensor& input_ids, const IterationOptions& counts) {
  SequenceKV kv(config.num_hidden_layers);
  return forward_chunk(input_ids, kv, counts);
}

torch::Tensor LCKVModelImpl::forward_sequential(const torch::Tensor& input_ids, const HiddenStateObserver& hidden_states) {
  SequenceKV kv(config.num_hidden_layers);
  std::vector<torch::Tensor> outs;
  // One token per chunk: one iteration is exact, since a strict query never sees its own slot.
  IterationOptions one_iteration{0, 1};
  one_iteration.hidden_states = hidden_states;
  for (int64_t p = 0; p < input_ids.size(1); ++p) {
    outs.push_back(forward_chunk(input_ids.narrow(1, p, 1), kv, one_iteration));
    kv.append_chunk(1);
  }
  return torch::cat(outs, 1);
}

LCKVForCausalLMImpl::LCKVForCausalLMImpl(const LCKVConfig& c) : config(c) {
  model = register_module("model", LCKVModel(c));
  if (!c.tie_word_embeddings) {
    lm_head = register_module("lm_head", torch::nn::Linear(torch::nn::LinearOptions(c.hidden_size, c.vocab_size).bias(false)));
  }
}

torch::Tensor LCKVForCausalLMImpl::lm_logits(const torch::Tensor& hidden) {
  return lm_head ? linear(lm_head, hidden) : ops::linear(hidden, model->embed_tokens->weight);
}

torch::Tensor lm_loss(const torch::Tensor& logits, const torch::Tensor& targets) {
  TORCH_CHECK(logits.dim() == 3 && targets.dim() == 2 && logits.size(0) == targets.size(0) &&
                  logits.size(1) == targets.size(1),
              "lm_loss: logits [B, T, V] and targets [B, T] expected, got ", logits.sizes(), " and ", targets.sizes());
  return ops::cross_entropy(logits, targets, ops::kIgnoreIndex);
}

namespace {
CausalLMOutput head_and_loss(LCKVForCausalLMImpl& m, const torch::Tensor& hidden, const torch::Tensor& labels) {
  CausalLMOutput out;
  out.logits = m.lm_logits(hidden);
  if (labels.defined()) {
    TORCH_CHECK(labels.sizes() == out.logits.sizes().slice(0, 2), "labels must be [batch, tokens] like input_ids, got ",
                labels.sizes());
    TORCH_CHECK(labels.scalar_type() == torch::kLong || labels.scalar_type() == torch::kInt,
                "labels must be int64 or int32 token ids, got ", labels.scalar_type());
    // Position t predicts labels[t + 1]; the last position predicts nothing (ignore_index). The loss reads
    // all T positions rather than the first T - 1: its gradient is then written whole, where the slice's
    // backward allocated, zero-filled and copied a second [B, T, V] tensor (~1% of a training step).
    const int64_t B = labels.size(0), T = labels.size(1);
    const torch::Tensor targets =
        torch::cat({labels.narrow(1, 1, T - 1), torch::full({B, 1}, ops::kIgnoreIndex, labels.options())}, 1);
    out.loss = lm_loss(out.logits, targets);
  }
  return out;
}
}  // namespace

torch::Tensor LCKVForCausalLMImpl::hidden_states(const torch::Tensor& input_ids, std::optional<IterationOptions> iterations) {
  if (config.use_sequential) return model->forward_sequential(input_ids);
  return model->forward(input_ids, iterations.value_or(default_iterations()));
}

CausalLMOutput LCKVForCausalLMImpl::forward(const torch::Tensor& input_ids, const torch::Tensor& labels,
                                            std::optional<IterationOptions> counts) {
  return head_and_loss(*this, hidden_states(input_ids, std::move(counts)), labels);
}

torch::Tensor LCKVForCausalLMImpl::next_token_loss(const torch::Tensor& input_ids, const torch::Tensor& targets,
                                                   std::optional<IterationOptions> iterations) {
  TORCH_CHECK(targets.sizes() == input_ids.sizes(), "next_token_loss: targets must be [batch, tokens] like input_ids ",
              input_ids.sizes(), ", got ", targets.sizes());
  return lm_loss(lm_logits(hidden_states(input_ids, std::move(iterations))), targets);
}

CausalLMOutput LCKVForCausalLMImpl::forward_sequential(const torch::Tensor& input_ids, const torch::Tensor& labels,
                                                      const HiddenStateObserver& hidden_states) {
  return head_and_loss(*this, model->forward_sequential(input_ids, hidden_states), labels);
}

void init_weights(LCKVForCausalLM& m) {
  torch::NoGradGuard no_grad;
  const double std = m->config.initializer_range;
  for (auto& item : m->named_parameters()) init_parameter(item.key(), item.value(), std);
}

void init_parameter(const std::string& name, torch::Tensor& p, double std, std::optional<at::Generator> generator) {
  torch::NoGradGuard no_grad;
  if (name.size() >= 4 && name.compare(name.size() - 4, 4, "bias") == 0) {
    p.zero_();
  } else if (name.find("norm") != std::string::npos) {
    p.fill_(1.0);
  } else {
    p.normal_(0.0, std, generator);
  }
}

LCKVForCausalLM random_model(const std::string& config_path, int64_t vocab_size) {
  LCKVConfig config = LCKVConfig::from_file(config_path);
  if (vocab_size > 0) config.vocab_size = vocab_size;
  LCKVForCausalLM model(config);
  init_weights(model);
  return model;
}

}  // namespace lckv
