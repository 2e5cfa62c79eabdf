// The condensed KV cache (docs/design.md §4): preallocated K/V buffers for the layers that compute KV
// only, so its memory is #KV layers x batch x capacity x kv_heads x head_dim x 2 x dtype bytes
// (a Llama with the same shape needs num_hidden_layers instead of #KV layers).
//
// It is a KVStore: the model writes the KVs of a chunk into the slots after the cached ones and
// reads views of the buffers (never copies), so one decode step touches each cached KV once.
// In-place writes implement the parallel iteration correctly (see kv_store.h): when a layer
// reads a top target, the target's slots still hold the previous iteration's KVs.
//
// Batches of prompts with different lengths are left-padded: every sequence shares the slot
// index, and key_start[b] (the number of pad slots of sequence b) hides the pads from its queries;
// RoPE positions are slot - key_start[b], so each sequence sees itself exactly as if alone.
//
// Static decode steps (set_static): one-token chunks whose operations have the same shapes and
// arguments at every position, so a CUDA graph captured once replays them (gpt-fast's static cache).
// read() returns the whole buffers, write() puts the token's KVs at the slot held in a device tensor
// (device_slot(), set by make_room on the host before each step), and attention hides the slots beyond
// it by that tensor. Entering zero-fills the slots not yet written, so every hidden key is finite.
//
// StreamingLLM (Xiao et al. 2023): with `streaming` set, a full cache keeps the first sink_tokens
// slots after the padding and evicts the oldest other slots, `evict_block` at a time (amortising
// the shift over that many steps). Keys are stored rotated; the kept ones are shifted down and
// re-rotated by -evicted positions (RoPE is a rotation, R(p - e) = R(-e) R(p), computed in fp32 or
// fp64), so every key stays rotated to its cache position and positions never exceed the capacity.
#pragma once

#include <torch/torch.h>

#include <optional>
#include <vector>

#include "lckv/config.h"
#include "lckv/model/kv_store.h"
#include "lckv/model/layers.h"

namespace lckv {

struct StreamingOptions {
  int64_t sink_tokens = 4;  // initial tokens always kept (the attention sinks)
  int64_t evict_block = 1;  // slots evicted at once when the cache is full (1 = StreamingLLM exactly)
};

class CondensedKVCache : public KVStore {
 public:
  // capacity: slots per sequence. options: dtype and device of the buffers.
  CondensedKVCache(const LCKVConfig& config, int64_t batch, int64_t capacity, torch::TensorOptions options,
                   std::optional<StreamingOptions> streaming = std::nullopt);

  // Bytes of the buffers for this shape: #KV layers x batch x capacity x kv_heads x head_dim x 2 x dtype bytes.
  static int64_t bytes_for(const LCKVConfig& config, int64_t batch, int64_t capacity, torch::ScalarType dtype);

  // KVStore
  int64_t past_length() const override { return length_; }
  void write(int layer, const torch::Tensor& k, const torch::Tensor& v) override;
  KV read(int layer) override;
  torch::Tensor key_start() const override { return key_start_; }
  void describe_keys(ops::AttentionParams& p) const override;

  // Left padding: sequence b's first key_start[b] slots are pads (int64 [batch], on any device).
  // Set before the first chunk.
  void set_key_start(const torch::Tensor& key_start);
  // Makes room for a chunk of n tokens. Without streaming, throws if the chunk does not fit;
  // with streaming, evicts old non-sink slots (throws if n exceeds what eviction can free).
  void make_room(int64_t n);
  // RoPE positions [batch, n] of the next n slots: slot - key_start[b], clamped at 0 for pads.
  torch::Tensor positions(int64_t n) const;
  // The chunk written since the last advance (n tokens) becomes past.
  void advance(int64_t n);
  void reset();

  // Static decode steps (see above). Between chunks; on = false returns to dynamic chunks.
  void set_static(bool on);
  bool is_static() const { return static_; }
  // [1] int64 on the buffers' device: the slot of the next token (static steps).
  const torch::Tensor& device_slot() const { return slot_; }
  // [B, 1] int64 RoPE positions of the next token, computed on the device from device_slot() and key_start.
  torch::Tensor device_positions() const;
  // Forgets the chunk written since the last advance (a CUDA graph's warm-up or capture ran the step's
  // host code; the replay does the step): its slots count as unwritten again.
  void discard_chunk();
  // Commits a static step that a CUDA graph replay wrote on the device, past write()'s bookkeeping.
  void advance_replayed();

  int64_t batch() const { return batch_; }
  int64_t capacity() const { return capacity_; }
  int64_t memory_bytes() const;  // bytes actually held by the buffers
  int64_t evicted() const { return evicted_; }  // slots evicted so far (streaming)

 private:
  int buffer_index(int layer) const;
  torch::Tensor positions_of(const torch::Tensor& slots) const;  // slots [B, n] -> RoPE positions on their device
  void evict_for(int64_t n);  // make_room's StreamingLLM eviction for a chunk of n that does not fit
  void evict(int64_t n);

  RotaryEmbedding rotary_;
  int64_t batch_, capacity_, num_kv_heads_, head_dim_;
  std::optional<StreamingOptions> streaming_;
  std::vector<int> kv_layers_;
  std::vector<int> buffer_of_layer_;  // layer -> index into k_/v_, -1 if the layer computes no KV
  std::vector<torch::Tensor> k_, v_;  // [B, Hkv, capacity, D]
  std::vector<bool> written_;         // which buffers hold the current chunk
  torch::Tensor key_start_;           // [B] int64, undefined = no padding
  int64_t max_key_start_ = 0;
  int64_t length_ = 0;                // committed slots
  int64_t chunk_ = 0;                 // slots of the chunk being written
  int64_t evicted_ = 0;
  bool static_ = false;
  torch::Tensor slot_;                // [1] int64 on the device: length_ during static steps
};

// The largest batch whose cache of `capacity` slots fits in `budget_bytes` (bytes_for, the
// buffers' exact size, is linear in the batch). Throws with the needed and available bytes when
// not even batch 1 fits.
int64_t max_batch_for_budget(const LCKVConfig& config, int64_t capacity, torch::ScalarType dtype, int64_t budget_bytes);

}  // namespace lckv
