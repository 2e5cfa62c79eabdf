// Where the `auto` backend sends condensed attention on CUDA tensors: our kernels only for the shapes a
// GPU run measured them faster than PyTorch's SDPA (scripts/gpu_check.sh runs lckv-bench-attention and
// the [cuda] tests), SDPA everywhere else. The measured points are data, cuda_routes_measured.inc,
// written by scripts/make_cuda_routes.py from that run's JSON; with no points (no GPU run has been made)
// every shape goes to SDPA. Device-agnostic, so the choice is tested on CPU.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <vector>

namespace lckv::ops {

// forward / backward: T > 1, by T; decode: T = 1, by the cached keys S.
enum class CudaRouteKind { kForward, kBackward, kDecode };

// One measurement: on a card of compute capability `sm` (major * 10 + minor), in `dtype`, with `head_dim`,
// at `size` (T, or S for decode), whether our kernel beat SDPA on the same work (its results checked too).
struct CudaRoutePoint {
  CudaRouteKind kind;
  int sm;
  c10::ScalarType dtype;
  int64_t head_dim;
  int64_t size;
  bool ours_faster;
};

// The points of cuda_routes_measured.inc.
const std::vector<CudaRoutePoint>& measured_cuda_routes();

// Whether `auto` uses our kernel for this shape: only inside the range measured for this kind, card,
// dtype and head_dim, and only if the measured sizes that bracket `size` (the nearest at or below and at
// or above it) both had ours faster. Anything unmeasured goes to SDPA.
bool cuda_route_prefers_ours(const std::vector<CudaRoutePoint>& points, CudaRouteKind kind, int sm,
                             c10::ScalarType dtype, int64_t head_dim, int64_t size);

}  // namespace lckv::ops
