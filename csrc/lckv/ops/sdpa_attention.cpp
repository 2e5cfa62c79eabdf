#include "lckv/ops/sdpa_attention.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <stdexcept>

namespace lckv::ops {

namespace {

std::atomic<int> g_backend{-1};  // -1: not set, read the environment

// [B or 1, 1, T, S] bool: which keys each query sees, on q's device.
at::Tensor visible_keys(const AttentionMask& m, int64_t T, int64_t S, const at::TensorOptions& device) {
  const auto opts = device.dtype(at::kLong);
  // The query positions, from the device tensor in a static step (no host value enters the mask).
  const at::Tensor pos = m.q_position.defined() ? (at::arange(T, opts) + m.q_position.to(opts)).view({T, 1})
                                                : at::arange(m.q_offset, m.q_offset + T, opts).view({T, 1});
  const at::Tensor key = at::arange(S, opts).view({1, S});
  at::Tensor visible = m.strict ? key.lt(pos) : key.le(pos);
  if (m.window > 0) visible = visible.logical_and(key.gt(pos - m.window));
  visible = visible.view({1, 1, T, S});
  if (m.key_start.defined()) {
    const at::Tensor start = m.key_start.to(device.device(), at::kLong).view({-1, 1, 1, 1});
    visible = visible.logical_and(key.view({1, 1, 1, S}).ge(start));
  }
  return visible;
}

}  // namespace

AttentionBackend parse_attention_backend(const std::string& name) {
  if (name == "auto") return AttentionBackend::kAuto;
  if (name == "lckv") return AttentionBackend::kLckv;
  if (name == "sdpa") return AttentionBackend::kSdpa;
  throw std::invalid_argument("attention backend: unknown value \"" + name + "\" (expected auto, lckv or sdpa)");
}

std::string to_string(AttentionBackend backend) {
  switch (backend) {
    case AttentionBackend::kLckv: return "lckv";
    case AttentionBackend::kSdpa: return "sdpa";
    default: return "auto";
  }
}

AttentionBackend attention_backend() {
  const int set = g_backend.load();
  if (set >= 0) return static_cast<AttentionBackend>(set);
  const char* env = std::getenv("LCKV_ATTENTION_BACKEND");
  if (env == nullptr || *env == '\0') return AttentionBackend::kAuto;
  try {
    return parse_attention_backend(env);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("environment variable LCKV_ATTENTION_BACKEND: ") + e.what());
  }
}

void set_attention_backend(AttentionBackend backend) { g_backend.store(static_cast<int>(backend)); }
void clear_attention_backend() { g_backend.store(-1); }

at::Tensor sdpa_condensed_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const AttentionParams& p) {
  const AttentionMask& m = p.mask;
  const int64_t T = q.size(2), S = k.size(2);
  const std::optional<double> scale = p.scale > 0 ? std::optional<double>(p.scale) : std::nullopt;
  const bool plain = m.window <= 0 && !m.key_start.defined() && !m.q_position.defined() && m.q_offset == 0 && T == S;
  if (plain && !m.strict) {
    return at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true, scale, /*enable_gqa=*/true);
  }
  if (plain && m.strict) {  // the shift trick: query t sees keys < t, i.e. query t against keys [0, t - 1] causally
    // Row 0 sees no key: exact zeros that still belong to the graph (zero gradient, never NaN).
    const at::Tensor first = at::where(at::zeros({1}, q.options().dtype(at::kBool)), q.narrow(2, 0, 1), 0);
    if (T == 1) return first;
    const at::Tensor rest = at::scaled_dot_product_attention(q.narrow(2, 1, T - 1), k.narrow(2, 0, S - 1),
                                                             v.narrow(2, 0, S - 1), {}, 0.0, /*is_causal=*/true,
                                                             scale, /*enable_gqa=*/true);
    // The last key is seen by no query: a NaN there must not reach the gradients (it is not read).
    return at::cat({first, rest}, 2);
  }
  at::Tensor visible = visible_keys(m, T, S, q.options());  // [B|1, 1, T, S]
  const at::Tensor sees = visible.any(-1, /*keepdim=*/true);  // [B|1, 1, T, 1]
  // Keys no query of a sequence sees are zeroed (finite ones give the same zeros after the mask), so
  // NaN/inf there reaches neither an output nor a gradient; one copy, no finiteness probe and sync.
  // (Skipped when the caller vouches that every key and value is finite: p.keys_finite.)
  at::Tensor kk = k, vv = v;
  if (!p.keys_finite) {
    const at::Tensor unseen = visible.any(2).logical_not().unsqueeze(-1);  // [B|1, 1, S, 1]
    kk = k.masked_fill(unseen, 0), vv = v.masked_fill(unseen, 0);
  }
  // Rows that see no key attend to every key (finite now: SDPA would give NaN for an all-false row)
  // and are replaced by exact zeros, so they pass zero gradients back.
  const at::Tensor mask = visible.logical_or(sees.logical_not());
  const at::Tensor out = at::scaled_dot_product_attention(q, kk, vv, mask, 0.0, false, scale, /*enable_gqa=*/true);
  return at::where(sees, out, at::zeros_like(out));
}

}  // namespace lckv::ops
