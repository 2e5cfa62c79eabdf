// The arguments of condensed attention (docs/design.md §3) beyond q, k, v: the mask and the softmax
// scale. In a header of their own so that every implementation (ops/cpu, ops/cuda) includes just
// these, not the op's front header (condensed_attention.h).
//
// Queries sit at absolute positions q_offset + t, keys at positions s, with
//   causal: key s visible to query position P iff s <= P
//   strict: key s visible iff s < P (the diagonal is masked; a row with no key gives exact zeros)
//   window W > 0: additionally s > P - W
//   key_start (optional, [B] int64): keys s < key_start[b] are invisible to every query of batch
//   entry b (left padding of batched prompts with different lengths).
//   q_position (optional, [1] int64 on q's device): q_offset read on the device instead of the host,
//   for a static decode step whose kernels do not depend on the position (a CUDA graph replays it).
// A key or value that the mask hides from every query never reaches an output or a gradient, even
// when it holds NaN or inf (unwritten or padded cache slots); its dk and dv are exactly zero.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace lckv::ops {

struct AttentionMask {
  bool strict = false;    // mask the diagonal
  int64_t window = 0;     // sliding window in keys; <= 0 means unlimited
  int64_t q_offset = 0;   // absolute position of query row 0
  at::Tensor key_start;   // optional [B] int64: per-sequence first visible key; undefined = 0
  // Optional [1] int64 on q's device: the absolute position of query row 0 (then q_offset must be 0).
  // Only the SDPA backend's mask reads it, so condensed_attention sends such calls there on every device.
  at::Tensor q_position;

  // First visible key for query position p, and one past the last (before key_start).
  int64_t key_begin(int64_t p) const { return window > 0 ? std::max<int64_t>(0, p - window + 1) : 0; }
  int64_t key_end(int64_t p) const { return strict ? p : p + 1; }
};

// The CPU implementation of the forward (ops/cpu/condensed_attention_cpu.h). auto: rows for chunks of
// at most 4 queries (decode), blocked for fp64 (the exactness path), tiled where it applies
// (cpu::tiled_attention_applies: fp32, and bf16 on CPUs that compute it natively), else blocked for key_start
// and flash otherwise. auto's backward is the tiled one where it applies, else PyTorch's fused one for
// T > query_block under the masks that kernel's causal mask expresses (cpu::flash_backward_applies), else the
// blocked one. A forced path has its own backward (tiled) or the blocked one (rows, blocked, flash). Tests
// force each one.
enum class CpuAttentionPath { kAuto, kRows, kBlocked, kFlash, kTiled };

struct AttentionParams {
  AttentionMask mask;
  double scale = 0;          // softmax scale; <= 0 means 1/sqrt(head_dim)
  int64_t query_block = 256; // blocked CPU path: query rows per block, bounds the score matrix held at once
  CpuAttentionPath cpu_path = CpuAttentionPath::kAuto;
  // The caller guarantees every key and value is finite, also the hidden ones (a zero-initialised
  // static cache): the SDPA backend's masked path then skips zeroing the keys no query sees, a copy
  // of the whole K/V per call.
  bool keys_finite = false;
};

}  // namespace lckv::ops
