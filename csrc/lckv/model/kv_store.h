// Where the layers of a chunk of tokens write and read the KVs of the layers that compute them.
//
// The parallel iteration needs no special bookkeeping from a store: layers run in order, so when
// layer i reads target t > i, slot t still holds what t wrote in the previous iteration, and when
// it reads t <= i, slot t already holds this iteration's KVs. Both stores below rely on that.
#pragma once

#include <torch/torch.h>

#include <vector>

#include "lckv/ops/attention_params.h"

namespace lckv {

struct KV {
  torch::Tensor k, v;  // [B, Hkv, S, D]; keys already rotated
};

class KVStore {
 public:
  virtual ~KVStore() = default;
  // Positions held from earlier chunks: the absolute position of the chunk's first token.
  virtual int64_t past_length() const = 0;
  // The chunk's KVs of `layer`, [B, Hkv, T, D]: replaces what the chunk wrote there before.
  virtual void write(int layer, const torch::Tensor& k, const torch::Tensor& v) = 0;
  // Past and chunk KVs of `layer`, [B, Hkv, past + T, D].
  virtual KV read(int layer) = 0;
  // Optional [B] int64: keys before key_start[b] are invisible to sequence b (left padding of
  // prompts with different lengths). Undefined (the default) when every key is visible.
  virtual torch::Tensor key_start() const { return {}; }
  // Where the keys read() returns sit, for attention's mask: the chunk's queries start at
  // past_length(), keys before key_start() are hidden. A store with fixed-shape reads (the static
  // decode step of CondensedKVCache) gives the position on the device instead.
  virtual void describe_keys(ops::AttentionParams& p) const {
    p.mask.q_offset = past_length();
    p.mask.key_start = key_start();
  }
};

// Autograd-friendly store: tensors are replaced, never modified in place, so gradients flow
// through every grad iteration, and through earlier tokens in the sequential definition.
class SequenceKV : public KVStore {
 public:
  explicit SequenceKV(int num_layers) : past_(num_layers), chunk_(num_layers) {}
  int64_t past_length() const override { return past_length_; }
  void write(int layer, const torch::Tensor& k, const torch::Tensor& v) override { chunk_.at(layer) = {k, v}; }
  KV read(int layer) override {
    const KV& c = chunk_.at(layer);
    const KV& p = past_.at(layer);
    TORCH_CHECK(c.k.defined(), "KV of layer ", layer, " read before any layer wrote it");
    if (!p.k.defined()) return c;
    return {torch::cat({p.k, c.k}, 2), torch::cat({p.v, c.v}, 2)};
  }
  // The chunk becomes past: the next chunk starts after it.
  void append_chunk(int64_t chunk_length) {
    for (size_t l = 0; l < chunk_.size(); ++l) {
      if (chunk_[l].k.defined()) past_[l] = read(static_cast<int>(l));
      chunk_[l] = {};
    }
    past_length_ += chunk_length;
  }

 private:
  std::vector<KV> past_, chunk_;
  int64_t past_length_ = 0;
};

}  // namespace lckv
