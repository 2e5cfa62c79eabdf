#include "lckv/model/layers.h"

#include <ATen/autocast_mode.h>

#include <cmath>

#include "lckv/ops/fused_ops.h"

namespace lckv {

torch::Tensor linear(const torch::nn::Linear& layer, const torch::Tensor& x) {
  return ops::linear(x, layer->weight, layer->bias);
}

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_) : eps(eps_) {
  weight = register_parameter("weight", torch::ones({dim}));
}

torch::ScalarType RMSNormImpl::output_dtype(torch::ScalarType x_dtype, c10::DeviceType device) const {
  // Under autocast a linear reading this output computes in the autocast dtype: write that dtype
  // directly instead of fp32 the linear would cast.
  return x_dtype != torch::kDouble && at::autocast::is_autocast_enabled(device)
             ? at::autocast::get_autocast_dtype(device)
             : torch::promote_types(x_dtype, weight.scalar_type());
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  return ops::rms_norm(x, weight, eps, output_dtype(x.scalar_type(), x.device().type()));
}

std::pair<torch::Tensor, torch::Tensor> RMSNormImpl::add_and_forward(const torch::Tensor& h,
                                                                     const torch::Tensor& branch) {
  const auto sum_dtype = torch::promote_types(h.scalar_type(), branch.scalar_type());  // residual_add's
  return ops::residual_add_rms_norm(h, branch, weight, eps, output_dtype(sum_dtype, h.device().type()));
}

RotaryEmbedding::RotaryEmbedding(const LCKVConfig& c) {
  // The inverse frequencies of transformers' modeling_rope_utils (_compute_*_parameters), in fp64.
  const int64_t d = c.head_dim;
  inv_freq = 1.0 / torch::pow(c.rope_theta, torch::arange(0, d, 2, torch::kDouble) / static_cast<double>(d));
  if (!c.rope_scaling) return;
  const RopeScaling& s = *c.rope_scaling;
  if (s.type == "linear") {
    inv_freq = inv_freq / s.factor;
  } else if (s.type == "llama3") {
    // Llama 3.1 frequency-dependent scaling, as in HF's _compute_llama3_parameters.
    const double low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
    const double high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
    torch::Tensor wavelen = 2 * M_PI / inv_freq;
    torch::Tensor scaled = torch::where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq);
    torch::Tensor smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) /
                           (s.high_freq_factor - s.low_freq_factor);
    torch::Tensor smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled;
    torch::Tensor medium = wavelen.ge(high_wavelen).logical_and(wavelen.le(low_wavelen));
    inv_freq = torch::where(medium, smoothed, scaled);
  } else if (s.type == "yarn") {
    // YaRN, as in HF's _compute_yarn_parameters: interpolated (inv_freq / factor) for the dimensions that rotate
    // fewer than beta_slow times over original_max_position_embeddings, extrapolated (inv_freq) for those rotating
    // more than beta_fast times, a linear ramp between; cos and sin are scaled by attention_factor.
    auto correction_dim = [&](double rotations) {
      return d * std::log(s.original_max_position_embeddings / (rotations * 2 * M_PI)) / (2 * std::log(c.rope_theta));
    };
    double low = correction_dim(s.beta_fast), high = correction_dim(s.beta_slow);
    if (s.truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, static_cast<double>(d - 1));
    if (low == high) high += 0.001;  // HF's guard against a zero-width ramp
    torch::Tensor ramp = ((torch::arange(d / 2, torch::kDouble) - low) / (high - low)).clamp(0, 1);
    torch::Tensor extrapolation = 1 - ramp;
    inv_freq = inv_freq / s.factor * (1 - extrapolation) + inv_freq * extrapolation;
    attention_scaling = s.attention_factor;
  }
}

std::pair<torch::Tensor, torch::Tensor> RotaryEmbedding::rotation(const torch::Tensor& positions,
                                                                  torch::ScalarType dtype) const {
  torch::Tensor pos = positions.to(torch::kDouble);
  if (pos.dim() == 1) pos = pos.unsqueeze(0);                              // [B or 1, P]
  torch::Tensor freqs = pos.unsqueeze(-1) * inv_freq.to(pos.device());     // [B, P, D/2]
  torch::Tensor emb = torch::cat({freqs, freqs}, -1).unsqueeze(1);          // [B, 1, P, D]
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

std::pair<torch::Tensor, torch::Tensor> RotaryEmbedding::cos_sin(const torch::Tensor& positions,
                                                                 torch::ScalarType dtype) const {
  if (attention_scaling == 1.0) return rotation(positions, dtype);
  auto [cos, sin] = rotation(positions, torch::kDouble);
  return {(cos * attention_scaling).to(dtype), (sin * attention_scaling).to(dtype)};
}

MLPImpl::MLPImpl(const LCKVConfig& c) {
  auto lin = [&](int64_t in, int64_t out) { return torch::nn::LinearOptions(in, out).bias(c.mlp_bias); };
  gate_proj = register_module("gate_proj", torch::nn::Linear(lin(c.hidden_size, c.intermediate_size)));
  up_proj = register_module("up_proj", torch::nn::Linear(lin(c.hidden_size, c.intermediate_size)));
  down_proj = register_module("down_proj", torch::nn::Linear(lin(c.intermediate_size, c.hidden_size)));
}

torch::Tensor MLPImpl::forward(const torch::Tensor& x) {
  return linear(down_proj, ops::swiglu(linear(gate_proj, x), linear(up_proj, x)));
}

LayerRole layer_role(const LCKVConfig& c, int layer) {
  LayerRole r;
  r.index = layer;
  r.target = c.target(layer);
  r.computes_kv = c.layer_computes_kv(layer);
  r.mask.strict = c.layer_masks_diagonal(layer);
  r.mask.window = c.layer_window(layer);
  return r;
}

AttentionImpl::AttentionImpl(const LCKVConfig& c, const LayerRole& role_)
    : role(role_), num_heads(c.num_attention_heads), num_kv_heads(c.num_key_value_heads), head_dim(c.head_dim) {
  auto lin = [&](int64_t in, int64_t out) { return torch::nn::LinearOptions(in, out).bias(c.attention_bias); };
  q_proj = register_module("q_proj", torch::nn::Linear(lin(c.hidden_size, num_heads * head_dim)));
  if (role.computes_kv) {
    k_proj = register_module("k_proj", torch::nn::Linear(lin(c.hidden_size, num_kv_heads * head_dim)));
    v_proj = register_module("v_proj", torch::nn::Linear(lin(c.hidden_size, num_kv_heads * head_dim)));
  }
  o_proj = register_module("o_proj", torch::nn::Linear(lin(num_heads * head_dim, c.hidden_size)));
}

void AttentionImpl::write_kv(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                             KVStore& kv) {
  const int64_t B = x.size(0), T = x.size(1);
  torch::Tensor k = linear(k_proj, x).view({B, T, num_kv_heads, head_dim}).transpose(1, 2);
  torch::Tensor v = linear(v_proj, x).view({B, T, num_kv_heads, head_dim}).transpose(1, 2);
  kv.write(role.index, ops::apply_rotary(k, cos, sin), v);
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                                     KVStore& kv) {
  const int64_t B = x.size(0), T = x.size(1);
  torch::Tensor q = ops::apply_rotary(linear(q_proj, x).view({B, T, num_heads, head_dim}).transpose(1, 2), cos, sin);
  if (role.computes_kv) write_kv(x, cos, sin, kv);
  const KV target = kv.read(role.target);
  ops::AttentionParams params;
  params.mask = role.mask;
  kv.describe_keys(params);
  torch::Tensor out = ops::condensed_attention(q, target.k, target.v, params);
  return linear(o_proj, out.transpose(1, 2).reshape({B, T, num_heads * head_dim}));
}

DecoderLayerImpl::DecoderLayerImpl(const LCKVConfig& c, int layer) {
  input_layernorm = register_module("input_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
  self_attn = register_module("self_attn", Attention(c, layer_role(c, layer)));
  post_attention_layernorm = register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
  mlp = register_module("mlp", MLP(c));
}

torch::Tensor DecoderLayerImpl::forward(const torch::Tensor& h, const torch::Tensor& cos, const torch::Tensor& sin,
                                        KVStore& kv) {
  auto [x, normed] = post_attention_layernorm->add_and_forward(h, self_attn(input_layernorm(h), cos, sin, kv));
  return ops::residual_add(x, mlp(normed));
}

void DecoderLayerImpl::write_kv(const torch::Tensor& h, const torch::Tensor& cos, const torch::Tensor& sin,
                                KVStore& kv) {
  self_attn->write_kv(input_layernorm(h), cos, sin, kv);
}

}  // namespace lckv
