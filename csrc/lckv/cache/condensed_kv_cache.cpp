#include "lckv/cache/condensed_kv_cache.h"

#include "lckv/ops/fused_ops.h"
#include "lckv/ops/accumulate.h"

namespace lckv {

CondensedKVCache::CondensedKVCache(const LCKVConfig& config, int64_t batch, int64_t capacity,
                                   torch::TensorOptions options, std::optional<StreamingOptions> streaming)
    : rotary_(config),
      batch_(batch),
      capacity_(capacity),
      num_kv_heads_(config.num_key_value_heads),
      head_dim_(config.head_dim),
      streaming_(streaming),
      kv_layers_(config.kv_layers()),
      buffer_of_layer_(config.num_hidden_layers, -1) {
  TORCH_CHECK(batch > 0, "CondensedKVCache: batch must be > 0, got ", batch);
  TORCH_CHECK(capacity > 0, "CondensedKVCache: capacity must be > 0, got ", capacity);
  if (streaming_) {
    TORCH_CHECK(streaming_->sink_tokens >= 0 && streaming_->sink_tokens < capacity,
                "CondensedKVCache: sink_tokens must lie in [0, capacity = ", capacity, "), got ",
                streaming_->sink_tokens);
    TORCH_CHECK(streaming_->evict_block >= 1, "CondensedKVCache: evict_block must be >= 1, got ",
                streaming_->evict_block);
  }
  // Slots beyond the committed ones are always written before they are read: no need to zero them.
  for (size_t i = 0; i < kv_layers_.size(); ++i) {
    buffer_of_layer_[kv_layers_[i]] = static_cast<int>(i);
    k_.push_back(torch::empty({batch, num_kv_heads_, capacity, head_dim_}, options));
    v_.push_back(torch::empty({batch, num_kv_heads_, capacity, head_dim_}, options));
  }
  written_.assign(kv_layers_.size(), false);
}

int64_t CondensedKVCache::bytes_for(const LCKVConfig& config, int64_t batch, int64_t capacity,
                                    torch::ScalarType dtype) {
  return static_cast<int64_t>(config.kv_layers().size()) * batch * capacity * config.num_key_value_heads *
         config.head_dim * 2 * static_cast<int64_t>(c10::elementSize(dtype));
}

int64_t CondensedKVCache::memory_bytes() const {
  int64_t bytes = 0;
  for (size_t i = 0; i < k_.size(); ++i) bytes += k_[i].nbytes() + v_[i].nbytes();
  return bytes;
}

int CondensedKVCache::buffer_index(int layer) const {
  TORCH_CHECK(layer >= 0 && layer < static_cast<int>(buffer_of_layer_.size()) && buffer_of_layer_[layer] >= 0,
              "CondensedKVCache: layer ", layer, " computes no KV, so the cache has no buffer for it");
  return buffer_of_layer_[layer];
}

void CondensedKVCache::write(int layer, const torch::Tensor& k, const torch::Tensor& v) {
  const int i = buffer_index(layer);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == batch_ && k.size(1) == num_kv_heads_ && k.size(3) == head_dim_ &&
                  v.sizes() == k.sizes(),
              "CondensedKVCache: KVs of layer ", layer, " must be [", batch_, ", ", num_kv_heads_, ", T, ", head_dim_,
              "], got k ", k.sizes(), " v ", v.sizes());
  const int64_t T = k.size(2);
  TORCH_CHECK(!static_ || T == 1, "CondensedKVCache: a static step writes one token, layer ", layer, " wrote ", T);
  TORCH_CHECK(chunk_ == 0 || chunk_ == T, "CondensedKVCache: layer ", layer, " writes ", T,
              " tokens into a chunk of ", chunk_);
  TORCH_CHECK(length_ + T <= capacity_, "CondensedKVCache: a chunk of ", T, " tokens after ", length_,
              " cached ones exceeds the capacity of ", capacity_, " slots (call make_room first)");
  chunk_ = T;
  if (static_) {
    // At the device slot: the same operation whatever the position (index_copy_ needs k's dtype equal).
    k_[i].index_copy_(2, slot_, k.to(k_[i].scalar_type()));
    v_[i].index_copy_(2, slot_, v.to(v_[i].scalar_type()));
  } else {
    k_[i].narrow(2, length_, T).copy_(k);
    v_[i].narrow(2, length_, T).copy_(v);
  }
  written_[i] = true;
}

KV CondensedKVCache::read(int layer) {
  const int i = buffer_index(layer);
  TORCH_CHECK(written_[i], "CondensedKVCache: KV of layer ", layer, " read before the chunk wrote it");
  if (static_) return {k_[i], v_[i]};  // every slot; attention hides those after device_slot()
  return {k_[i].narrow(2, 0, length_ + chunk_), v_[i].narrow(2, 0, length_ + chunk_)};
}

void CondensedKVCache::describe_keys(ops::AttentionParams& p) const {
  if (!static_) return KVStore::describe_keys(p);
  p.mask.key_start = key_start_;
  p.mask.q_offset = 0;
  p.mask.q_position = slot_;
  p.keys_finite = true;  // set_static zero-filled the unwritten slots; the written ones hold KVs
}

void CondensedKVCache::set_static(bool on) {
  TORCH_CHECK(chunk_ == 0, "CondensedKVCache: set_static inside a chunk (advance first)");
  static_ = on;
  if (!on) return;
  torch::NoGradGuard no_grad;
  // The slots not yet written become finite zeros: attention reads every slot and hides these by the
  // mask alone (NaN garbage there would turn the masked scores into NaN).
  for (size_t i = 0; i < k_.size(); ++i) {
    k_[i].narrow(2, length_, capacity_ - length_).zero_();
    v_[i].narrow(2, length_, capacity_ - length_).zero_();
  }
  slot_ = torch::full({1}, length_, k_.empty() ? torch::TensorOptions(torch::kLong)
                                                 : torch::TensorOptions(torch::kLong).device(k_[0].device()));
}

torch::Tensor CondensedKVCache::device_positions() const {
  TORCH_CHECK(static_, "CondensedKVCache: device_positions outside static steps (call set_static(true))");
  return positions_of(slot_.view({1, 1}).expand({batch_, 1}));
}

torch::Tensor CondensedKVCache::positions_of(const torch::Tensor& slots) const {
  if (!key_start_.defined()) return slots.contiguous();
  return (slots - key_start_.to(slots.device()).view({batch_, 1})).clamp_min(0);
}

void CondensedKVCache::discard_chunk() {
  chunk_ = 0;
  written_.assign(written_.size(), false);
}

void CondensedKVCache::advance_replayed() {
  TORCH_CHECK(static_ && chunk_ == 0, "CondensedKVCache: advance_replayed commits a replayed static step only");
  TORCH_CHECK(length_ < capacity_, "CondensedKVCache: advance_replayed on a full cache (call make_room first)");
  length_ += 1;
}

void CondensedKVCache::set_key_start(const torch::Tensor& key_start) {
  TORCH_CHECK(length_ == 0 && chunk_ == 0, "CondensedKVCache: set_key_start must come before the first chunk");
  TORCH_CHECK(key_start.dim() == 1 && key_start.size(0) == batch_, "CondensedKVCache: key_start must be [",
              batch_, "], got ", key_start.sizes());
  key_start_ = key_start.to(k_.empty() ? torch::kCPU : k_[0].device(), torch::kLong);
  max_key_start_ = key_start_.numel() ? key_start_.max().item<int64_t>() : 0;
  TORCH_CHECK(key_start_.min().item<int64_t>() >= 0 && max_key_start_ < capacity_,
              "CondensedKVCache: key_start entries must lie in [0, capacity = ", capacity_, "), got max ",
              max_key_start_);
}

torch::Tensor CondensedKVCache::positions(int64_t n) const {
  auto opts = torch::TensorOptions().dtype(torch::kLong);
  return positions_of(torch::arange(length_, length_ + n, opts).unsqueeze(0).expand({batch_, n}));
}

void CondensedKVCache::make_room(int64_t n) {
  TORCH_CHECK(n > 0, "CondensedKVCache: a chunk must have at least one token, got ", n);
  TORCH_CHECK(chunk_ == 0, "CondensedKVCache: make_room inside a chunk (advance first)");
  TORCH_CHECK(!static_ || n == 1, "CondensedKVCache: static steps take one token, got a chunk of ", n);
  if (length_ + n > capacity_) evict_for(n);
  // Host to device outside any captured step: the slot the step's writes and mask read.
  if (static_) slot_.fill_(length_);
}

void CondensedKVCache::evict_for(int64_t n) {
  TORCH_CHECK(streaming_.has_value(), "CondensedKVCache: ", length_, " cached tokens + ", n,
              " new ones exceed the cache capacity of ", capacity_,
              " slots; use a larger cache or StreamingLLM (sink + recent window)");
  const int64_t sink_end = max_key_start_ + streaming_->sink_tokens;
  const int64_t needed = length_ + n - capacity_;
  const int64_t evictable = length_ - sink_end;
  TORCH_CHECK(needed <= evictable, "CondensedKVCache: a chunk of ", n, " tokens cannot fit in ", capacity_,
              " slots that keep ", sink_end, " sink and pad slots (at most ", capacity_ - sink_end, " per chunk)");
  evict(std::min(evictable, std::max(needed, streaming_->evict_block)));
}

void CondensedKVCache::evict(int64_t n) {
  torch::NoGradGuard no_grad;
  const int64_t sink_end = max_key_start_ + streaming_->sink_tokens;
  const int64_t kept = length_ - sink_end - n;
  if (kept > 0) {
    // Kept keys move n slots down: rotate them by -n positions (computed in fp32, fp64 for fp64 buffers).
    const auto acc = ops::accumulate_dtype(k_[0].scalar_type());
    auto [cos, sin] = rotary_.rotation(torch::full({1}, -n, torch::kLong), acc);
    cos = cos.to(k_[0].device());
    sin = sin.to(k_[0].device());
    for (size_t i = 0; i < k_.size(); ++i) {
      torch::Tensor k_moved = ops::apply_rotary(k_[i].narrow(2, sink_end + n, kept), cos, sin);
      torch::Tensor v_moved = v_[i].narrow(2, sink_end + n, kept).clone();  // source and destination overlap
      k_[i].narrow(2, sink_end, kept).copy_(k_moved);
      v_[i].narrow(2, sink_end, kept).copy_(v_moved);
    }
  }
  length_ -= n;
  evicted_ += n;
}

void CondensedKVCache::advance(int64_t n) {
  TORCH_CHECK(n == chunk_, "CondensedKVCache: advance(", n, ") but the chunk wrote ", chunk_, " tokens");
  length_ += n;
  chunk_ = 0;
  written_.assign(written_.size(), false);
}

void CondensedKVCache::reset() {
  length_ = chunk_ = evicted_ = 0;
  static_ = false;
  slot_ = torch::Tensor();
  key_start_ = torch::Tensor();
  max_key_start_ = 0;
  written_.assign(written_.size(), false);
}

int64_t max_batch_for_budget(const LCKVConfig& config, int64_t capacity, torch::ScalarType dtype,
                             int64_t budget_bytes) {
  const int64_t one = CondensedKVCache::bytes_for(config, 1, capacity, dtype);
  TORCH_CHECK(one <= budget_bytes, "KV-cache budget of ", budget_bytes, " bytes is too small for batch 1: a cache of ",
              capacity, " slots needs ", one, " bytes (", config.kv_layers().size(), " KV layers x ",
              config.num_key_value_heads, " KV heads x head_dim ", config.head_dim, " x 2 x ", c10::elementSize(dtype),
              " bytes per slot)");
  return budget_bytes / one;  // bytes_for is linear in the batch
}

}  // namespace lckv
