// The Llama building blocks: RMSNorm, rotary embeddings (Hugging Face rotate_half convention),
// the SwiGLU MLP, and the attention whose K/V projections exist only on layers that compute KV.
#pragma once

#include <torch/torch.h>

#include "lckv/config.h"
#include "lckv/model/kv_store.h"
#include "lckv/ops/condensed_attention.h"

namespace lckv {

// y = x W^T + b through at::linear. torch::nn::Linear::forward multiplies by weight.t(), a view,
// and autocast never caches casts of views: every use re-cast the fp32 weight (9 uses per step in
// an LCKV segment with m + b = 9). With at::linear autocast casts each weight once per step.
// (ops::linear: at::linear, or its few-row kernel in decode.)
torch::Tensor linear(const torch::nn::Linear& layer, const torch::Tensor& x);

// Llama RMSNorm (ops::rms_norm). Statistics in fp32 for low-precision inputs (as HF), in fp64 for
// fp64 inputs; under autocast the output is in the autocast dtype.
struct RMSNormImpl : torch::nn::Module {
  RMSNormImpl(int64_t dim, double eps);
  torch::Tensor forward(const torch::Tensor& x);
  // {h + branch, forward(h + branch)} in one fused op (ops::residual_add_rms_norm).
  std::pair<torch::Tensor, torch::Tensor> add_and_forward(const torch::Tensor& h, const torch::Tensor& branch);
  torch::Tensor weight;
  double eps;

 private:
  torch::ScalarType output_dtype(torch::ScalarType x_dtype, c10::DeviceType device) const;
};
TORCH_MODULE(RMSNorm);

// cos/sin tables for given positions, computed in fp64 so fp64 models are exact; the frequencies of the config's
// rope_theta and rope_scaling (default / linear / llama3 / yarn) as transformers computes them.
struct RotaryEmbedding {
  explicit RotaryEmbedding(const LCKVConfig& c);
  // positions: [P] or [B, P] absolute positions -> cos, sin broadcastable to [B, H, P, D]: what q and k are rotated
  // with, both tables times attention_scaling as in transformers (YaRN's mscale; 1 otherwise).
  std::pair<torch::Tensor, torch::Tensor> cos_sin(const torch::Tensor& positions, torch::ScalarType dtype) const;
  // The pure rotation by `positions` (no attention_scaling): what moves keys that are already rotated (StreamingLLM).
  std::pair<torch::Tensor, torch::Tensor> rotation(const torch::Tensor& positions, torch::ScalarType dtype) const;
  // Keeps inv_freq on `device`, where the positions will be: a captured CUDA graph may not copy it from the host.
  void keep_on(const torch::Device& device) { inv_freq = inv_freq.to(device); }
  torch::Tensor inv_freq;  // [D / 2], fp64
  double attention_scaling = 1.0;
};

struct MLPImpl : torch::nn::Module {
  explicit MLPImpl(const LCKVConfig& c);
  torch::Tensor forward(const torch::Tensor& x);
  torch::nn::Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(MLP);

// What one decoder layer needs to know about its place in the model.
struct LayerRole {
  int index = 0;
  int target = 0;         // layer whose KVs the queries read
  bool computes_kv = false;
  ops::AttentionMask mask; // strict / window; q_offset is filled per chunk
};

LayerRole layer_role(const LCKVConfig& c, int layer);

struct AttentionImpl : torch::nn::Module {
  AttentionImpl(const LCKVConfig& c, const LayerRole& role);
  // x: normed hidden [B, T, H]. Writes this layer's KVs (if it computes any) to `kv`, then
  // attends to the target layer's KVs read from `kv`.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, KVStore& kv);
  // Only the K/V projection: what the iteration needs from a top target before the last pass.
  void write_kv(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, KVStore& kv);

  LayerRole role;
  int64_t num_heads, num_kv_heads, head_dim;
  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
};
TORCH_MODULE(Attention);

struct DecoderLayerImpl : torch::nn::Module {
  DecoderLayerImpl(const LCKVConfig& c, int layer);
  torch::Tensor forward(const torch::Tensor& h, const torch::Tensor& cos, const torch::Tensor& sin, KVStore& kv);
  void write_kv(const torch::Tensor& h, const torch::Tensor& cos, const torch::Tensor& sin, KVStore& kv);

  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  Attention self_attn{nullptr};
  MLP mlp{nullptr};
};
TORCH_MODULE(DecoderLayer);

}  // namespace lckv
