// What the C++ tests compare against, in one place (as llm.c's dev/cuda/common.h): the naive
// attention reference, written from the definition of the mask, and the comparison helpers.
#pragma once

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace lckv::testing {

// max |a - b|, in fp64.
inline double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

// max |a - b| / max(1, max |b|), in fp64.
inline double rel_err(const torch::Tensor& a, const torch::Tensor& b) {
  const torch::Tensor bd = b.to(torch::kDouble);
  const double scale = std::max(1.0, bd.abs().max().item<double>());
  return (a.to(torch::kDouble) - bd).abs().max().item<double>() / scale;
}

// max |got - want| <= tol * max(1, max |want|), on any device; no NaN; -inf entries (empty rows'
// lse) must match exactly.
inline void check_close(const torch::Tensor& got_in, const torch::Tensor& want_in, double tol,
                        const std::string& what) {
  const torch::Tensor got = got_in.to(torch::kCPU, torch::kDouble), want = want_in.to(torch::kCPU, torch::kDouble);
  INFO(what);
  REQUIRE(got.sizes() == want.sizes());
  REQUIRE_FALSE(got.isnan().any().item<bool>());
  const torch::Tensor want_inf = want.isinf();
  CHECK(torch::equal(got.isinf(), want_inf));
  const torch::Tensor g = got.masked_fill(want_inf, 0), w = want.masked_fill(want_inf, 0);
  const double scale = std::max(1.0, w.abs().max().item<double>());
  const double err = (g - w).abs().max().item<double>();
  INFO("max error " << err << ", scale " << scale);
  CHECK(err <= tol * scale);
}

// [B, 1, T, S] bool, built entry by entry from the definition: key s is visible to query t of
// sequence b (at position q_offset + t) iff s <= pos (s < pos when strict), s > pos - window when
// window > 0, and s >= key_start[b] (key_start empty: no padding).
inline torch::Tensor naive_visible(int64_t B, int64_t T, int64_t S, bool strict, int64_t window, int64_t q_offset,
                                   const std::vector<int64_t>& key_start = {}) {
  torch::Tensor visible = torch::zeros({B, 1, T, S}, torch::kBool);
  auto acc = visible.accessor<bool, 4>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t pos = q_offset + t;
      for (int64_t s = 0; s < S; ++s) {
        bool ok = strict ? s < pos : s <= pos;
        if (window > 0) ok = ok && s > pos - window;
        if (!key_start.empty()) ok = ok && s >= key_start[b];
        acc[b][0][t][s] = ok;
      }
    }
  }
  return visible;
}

// [B, 1, S, 1] bool: no query of sequence b sees key s (naive_visible's arguments), so the key may
// hold anything (an unwritten cache slot, a pad).
inline torch::Tensor keys_no_query_sees(int64_t B, int64_t T, int64_t S, bool strict, int64_t window,
                                        int64_t q_offset, const std::vector<int64_t>& key_start = {}) {
  return naive_visible(B, T, S, strict, window, q_offset, key_start).any(2).logical_not().unsqueeze(-1);
}

// Naive attention: repeat K/V per query head, softmax over the visible keys of naive_visible()
// with scale 1/sqrt(D); a row with no visible key gives zeros. Differentiable.
inline torch::Tensor naive_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                     bool strict, int64_t window, int64_t q_offset,
                                     const std::vector<int64_t>& key_start = {}) {
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  torch::Tensor kr = k.repeat_interleave(Hq / Hkv, 1), vr = v.repeat_interleave(Hq / Hkv, 1);
  torch::Tensor scores = torch::matmul(q, kr.transpose(-1, -2)) / std::sqrt(static_cast<double>(D));
  const torch::Tensor visible = naive_visible(B, T, S, strict, window, q_offset, key_start).to(q.device());
  torch::Tensor masked = scores.masked_fill(visible.logical_not(), -std::numeric_limits<double>::infinity());
  torch::Tensor probs = torch::softmax(masked, -1);
  probs = torch::where(visible.any(-1, true), probs, torch::zeros_like(probs));  // empty rows -> 0, not NaN
  return torch::matmul(probs, vr);
}

}  // namespace lckv::testing
