// Condensed attention on PyTorch's own scaled_dot_product_attention (flash / cuDNN / memory-efficient
// backends on a GPU, the fused CPU kernel on CPU): the baseline that cannot be wrong, and the path
// `auto` takes on CUDA wherever scripts/gpu_check.sh has not measured our kernels faster (cuda_routes.h).
// Device-agnostic, so it is tested on CPU against the fp64 reference on every mask case.
//   causal, q_offset 0, T == S, no window / key_start:  is_causal (no mask is built)
//   strict, same:  the shift trick: queries 1.. against keys ..T-2 with is_causal, row 0 exactly zero
//   otherwise:     the condensed mask as a boolean mask [B or 1, 1, T, S]; rows that see no key are
//                  exact zeros (SDPA alone would give NaN), and keys no query of a sequence sees are
//                  zeroed before SDPA when they are not finite, so they never reach an output or a
//                  gradient (their dk/dv are 0; skipped with keys_finite); with q_position the
//                  query positions come from that device tensor (a static decode step)
// GQA with enable_gqa (no repeated K/V). Differentiable through SDPA's own autograd.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "lckv/ops/attention_params.h"

namespace lckv::ops {

// Which implementation condensed_attention uses:
//   auto: on CPU the tiled kernel where it applies, else the blocked path or PyTorch's fused CPU
//         attention (as measured fastest here), on CUDA our kernels only for the shapes a GPU run
//         measured them faster (cuda_routes.h; none measured yet), the SDPA backend elsewhere;
//   lckv: our own implementations (the tiled CPU kernel where it applies, else the blocked path; the
//         CUDA kernels);
//   sdpa: this file, on every device.
enum class AttentionBackend { kAuto, kLckv, kSdpa };

// The backend in force: set_attention_backend's, else the environment variable
// LCKV_ATTENTION_BACKEND (auto | lckv | sdpa; anything else is an error naming it), else auto.
AttentionBackend attention_backend();
void set_attention_backend(AttentionBackend backend);
void clear_attention_backend();  // back to the environment variable's choice
AttentionBackend parse_attention_backend(const std::string& name);  // throws naming the value
std::string to_string(AttentionBackend backend);

// The differentiable condensed attention by SDPA (arguments already checked by the front).
at::Tensor sdpa_condensed_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const AttentionParams& p);

}  // namespace lckv::ops
