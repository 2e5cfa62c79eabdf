// The front of condensed attention: argument checks, dispatch and autograd. The implementations are
// ops/cpu/condensed_attention_cpu.h (the blocked ATen path; PyTorch's fused CPU attention with a
// boolean mask) and, in CUDA builds, ops/cuda/condensed_attention_cuda.h.
#include "lckv/ops/condensed_attention.h"

#include "lckv/ops/sdpa_attention.h"
#include "lckv/ops/cuda_routes.h"

#include <ATen/autocast_mode.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>

#include <cmath>
#include <optional>

#include "lckv/ops/accumulate.h"
#include "lckv/ops/cpu/condensed_attention_cpu.h"
#include "lckv/ops/cpu/fused_kernels.h"
#ifdef LCKV_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>

#include "lckv/ops/cuda/condensed_attention_cuda.h"
#endif

namespace lckv::ops {
namespace {

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionParams& p) {
  TORCH_CHECK(q.dim() == 4, "condensed_attention: q must be [B, Hq, T, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "condensed_attention: k must be [B, Hkv, S, D], got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "condensed_attention: v must have k's shape ", k.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0), "condensed_attention: batch of q (", q.size(0), ") and k (", k.size(0),
              ") differ");
  TORCH_CHECK(q.size(3) == k.size(3), "condensed_attention: head_dim of q (", q.size(3), ") and k (", k.size(3),
              ") differ");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "condensed_attention: query heads (", q.size(1),
              ") must be a multiple of KV heads (", k.size(1), ")");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "condensed_attention: q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
              ", ", v.scalar_type());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "condensed_attention: dtype must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(),
              "condensed_attention: q, k, v must be on one device, got ", q.device(), ", ", k.device(), ", ",
              v.device());
#ifdef LCKV_WITH_CUDA
  TORCH_CHECK(q.device().is_cpu() || q.device().is_cuda(), "condensed_attention: no kernel for device ", q.device());
#else
  TORCH_CHECK(q.device().is_cpu(), "condensed_attention: this build has no kernel for device ", q.device());
#endif
  TORCH_CHECK(p.mask.q_offset >= 0, "condensed_attention: q_offset must be >= 0, got ", p.mask.q_offset);
  if (p.mask.q_position.defined()) {
    const at::Tensor& qp = p.mask.q_position;
    TORCH_CHECK(qp.numel() == 1 && qp.dim() <= 1 && qp.scalar_type() == at::kLong,
                "condensed_attention: q_position must be an int64 tensor of one element, got ", qp.scalar_type(), " ",
                qp.sizes());
    TORCH_CHECK(qp.device() == q.device(), "condensed_attention: q_position must be on ", q.device(), ", got ",
                qp.device());
    TORCH_CHECK(p.mask.q_offset == 0, "condensed_attention: q_offset (", p.mask.q_offset,
                ") must be 0 when q_position gives the query position");
  }
  TORCH_CHECK(p.query_block > 0, "condensed_attention: query_block must be > 0, got ", p.query_block);
  if (p.mask.key_start.defined()) {
    const at::Tensor& ks = p.mask.key_start;
    TORCH_CHECK(ks.dim() == 1 && ks.size(0) == q.size(0) && ks.scalar_type() == at::kLong,
                "condensed_attention: key_start must be an int64 tensor [B = ", q.size(0), "], got ", ks.scalar_type(),
                " ", ks.sizes());
    TORCH_CHECK(ks.device() == q.device(), "condensed_attention: key_start must be on ", q.device(), ", got ",
                ks.device());
  }
}

// What the backward needs besides the forward's inputs: grad_out, and the forward's out and lse.
void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out,
                           const at::Tensor& lse) {
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "condensed_attention backward: grad_out must be ", q.sizes(),
              ", got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == q.sizes() && lse.sizes() == q.sizes().slice(0, 3),
              "condensed_attention backward: out must be ", q.sizes(), " and lse ", q.sizes().slice(0, 3), ", got ",
              out.sizes(), " and ", lse.sizes());
  TORCH_CHECK(at::isFloatingType(grad_out.scalar_type()) && at::isFloatingType(out.scalar_type()) &&
                  at::isFloatingType(lse.scalar_type()),
              "condensed_attention backward: grad_out, out and lse must be floating point, got ",
              grad_out.scalar_type(), ", ", out.scalar_type(), ", ", lse.scalar_type());
  TORCH_CHECK(grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
              "condensed_attention backward: grad_out, out and lse must be on ", q.device(), ", got ",
              grad_out.device(), ", ", out.device(), ", ", lse.device());
}

double softmax_scale(const at::Tensor& q, const AttentionParams& p) {
  return p.scale > 0 ? p.scale : 1.0 / std::sqrt(static_cast<double>(q.size(3)));
}

// Chunks of at most this many queries (decode) go to the direct-loop kernel (fused_kernels.h):
// one call for all heads instead of a dozen ATen ops per block, so a decode step pays no per-op
// overhead in attention. Longer chunks are compute-bound and go to the matmul-based paths.
constexpr int64_t kDirectRows = 4;

std::tuple<at::Tensor, at::Tensor> forward_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const AttentionParams& p) {
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(q.sizes().slice(0, 3), q.options().dtype(accumulate_dtype(q.scalar_type())));
  AttentionMask mask = p.mask;
  if (mask.key_start.defined()) mask.key_start = mask.key_start.contiguous();
  auto unit_d = [](const at::Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); };
  cpu::active_fused_kernels().attention_rows(unit_d(q), unit_d(k), unit_d(v), mask, softmax_scale(q, p), out, lse);
  return {out, lse};
}

// Our kernels take the query position from the host; a device one is the SDPA backend's alone.
void check_host_position(const AttentionParams& p) {
  TORCH_CHECK(!p.mask.q_position.defined(),
              "condensed_attention: q_position (a device query position) is read only by the SDPA backend; "
              "call condensed_attention, which routes such calls there");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> condensed_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, const AttentionParams& p) {
  check_inputs(q, k, v, p);
  check_host_position(p);
#ifdef LCKV_WITH_CUDA
  if (q.is_cuda()) return cuda::condensed_attention_forward_cuda(q, k, v, p, softmax_scale(q, p));
#endif
  CpuAttentionPath path = p.cpu_path;
  if (path == CpuAttentionPath::kAuto) {
    path = q.size(2) <= kDirectRows               ? CpuAttentionPath::kRows
           : q.scalar_type() == at::kDouble      ? CpuAttentionPath::kBlocked
           : cpu::tiled_attention_applies(q)     ? CpuAttentionPath::kTiled
           : p.mask.key_start.defined()          ? CpuAttentionPath::kBlocked
                                                 : CpuAttentionPath::kFlash;
  }
  if (path == CpuAttentionPath::kRows) return forward_rows(q, k, v, p);
  if (path == CpuAttentionPath::kTiled) return cpu::condensed_attention_forward_tiled(q, k, v, p, softmax_scale(q, p));
  if (path == CpuAttentionPath::kFlash) {
    TORCH_CHECK(!p.mask.key_start.defined(), "condensed_attention: the flash CPU path takes no key_start");
    if (auto r = cpu::condensed_attention_forward_flash(q, k, v, p, softmax_scale(q, p))) return *r;
  }
  return cpu::condensed_attention_forward_blocked(q, k, v, p, softmax_scale(q, p));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> condensed_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const AttentionParams& p) {
  check_inputs(q, k, v, p);
  check_host_position(p);
  check_backward_inputs(grad_out, q, out, lse);
#ifdef LCKV_WITH_CUDA
  if (q.is_cuda()) return cuda::condensed_attention_backward_cuda(grad_out, q, k, v, out, lse, p, softmax_scale(q, p));
#endif
  // Auto: the tiled backward where it applies; else PyTorch's fused backward for sequences longer than one query
  // block under the masks its causal mask expresses (the blocked backward streams its [rows, keys] intermediates
  // through memory there), the blocked backward elsewhere (far faster at T <= one block) and for an explicitly
  // chosen forward path other than tiled.
  const bool tiled = p.cpu_path == CpuAttentionPath::kTiled ||
                     (p.cpu_path == CpuAttentionPath::kAuto && cpu::tiled_attention_applies(q));
  if (tiled) return cpu::condensed_attention_backward_tiled(grad_out, q, k, v, out, lse, p, softmax_scale(q, p));
  if (p.cpu_path == CpuAttentionPath::kAuto && q.size(2) > p.query_block && cpu::flash_backward_applies(q, k, p)) {
    return cpu::condensed_attention_backward_flash(grad_out, q, k, v, out, lse, p, softmax_scale(q, p));
  }
  return cpu::condensed_attention_backward_blocked(grad_out, q, k, v, out, lse, p, softmax_scale(q, p));
}

namespace {

// Autograd over condensed_attention_forward/backward (on CPU: the forward of the shape's path, the
// backward of condensed_attention_backward's choice from its lse; CUDA).
struct CondensedAttentionFunction : public torch::autograd::Function<CondensedAttentionFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const std::optional<at::Tensor>& key_start, bool strict,
                            int64_t window, int64_t q_offset, double scale, int64_t query_block,
                            int64_t cpu_path) {
    AttentionParams p{{strict, window, q_offset, key_start.value_or(at::Tensor())}, scale, query_block,
                      static_cast<CpuAttentionPath>(cpu_path)};
    auto [out, lse] = condensed_attention_forward(q, k, v, p);
    ctx->save_for_backward({q, k, v, out, lse});
    if (p.mask.key_start.defined()) ctx->saved_data["key_start"] = p.mask.key_start;
    ctx->saved_data["strict"] = strict;
    ctx->saved_data["window"] = window;
    ctx->saved_data["q_offset"] = q_offset;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["query_block"] = query_block;
    ctx->saved_data["cpu_path"] = cpu_path;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto key_start = ctx->saved_data.find("key_start");
    AttentionParams p{{ctx->saved_data["strict"].toBool(), ctx->saved_data["window"].toInt(),
                       ctx->saved_data["q_offset"].toInt(),
                       key_start == ctx->saved_data.end() ? at::Tensor() : key_start->second.toTensor()},
                      ctx->saved_data["scale"].toDouble(),
                      ctx->saved_data["query_block"].toInt(),
                      static_cast<CpuAttentionPath>(ctx->saved_data["cpu_path"].toInt())};
    auto [dq, dk, dv] = condensed_attention_backward(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], p);
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

const std::vector<CudaRoutePoint>& measured_cuda_routes() {
  static const std::vector<CudaRoutePoint> points = {
#include "lckv/ops/cuda_routes_measured.inc"
  };
  return points;
}

bool cuda_route_prefers_ours(const std::vector<CudaRoutePoint>& points, CudaRouteKind kind, int sm,
                             c10::ScalarType dtype, int64_t head_dim, int64_t size) {
  const CudaRoutePoint* below = nullptr;  // the nearest measured size <= size
  const CudaRoutePoint* above = nullptr;  // the nearest measured size >= size
  for (const CudaRoutePoint& pt : points) {
    if (pt.kind != kind || pt.sm != sm || pt.dtype != dtype || pt.head_dim != head_dim) continue;
    if (pt.size <= size && (below == nullptr || pt.size > below->size)) below = &pt;
    if (pt.size >= size && (above == nullptr || pt.size < above->size)) above = &pt;
  }
  return below != nullptr && above != nullptr && below->ours_faster && above->ours_faster;
}

namespace {

// auto on CUDA: our kernels where measured faster for every part this call runs (the forward, with
// autograd also the backward; T = 1 the decode kernel), SDPA otherwise.
bool auto_prefers_our_cuda_kernels(const at::Tensor& q, const at::Tensor& k, bool needs_grad) {
#ifdef LCKV_WITH_CUDA
  const auto* prop = at::cuda::getDeviceProperties(q.get_device());
  const int sm = prop->major * 10 + prop->minor;
  const auto& points = measured_cuda_routes();
  const int64_t D = q.size(3), T = q.size(2);
  if (T == 1 && !needs_grad) return cuda_route_prefers_ours(points, CudaRouteKind::kDecode, sm, q.scalar_type(), D, k.size(2));
  return cuda_route_prefers_ours(points, CudaRouteKind::kForward, sm, q.scalar_type(), D, T) &&
         (!needs_grad || cuda_route_prefers_ours(points, CudaRouteKind::kBackward, sm, q.scalar_type(), D, T));
#else
  (void)q, (void)k, (void)needs_grad;
  return false;
#endif
}

}  // namespace

at::Tensor condensed_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const AttentionParams& p) {
  RECORD_FUNCTION("lckv::condensed_attention", std::vector<c10::IValue>());  // profilers see the op as one
  at::Tensor qc = q, kc = k, vc = v;
  const auto device_type = q.device().type();
  if (at::autocast::is_autocast_enabled(device_type)) {
    const auto dt = at::autocast::get_autocast_dtype(device_type);
    qc = q.to(dt), kc = k.to(dt), vc = v.to(dt);
  }
  // The op picks its own precisions; keep autocast from re-casting its internal matmuls.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_inputs(qc, kc, vc, p);
  const AttentionBackend backend = attention_backend();
  const bool needs_grad = at::GradMode::is_enabled() && (qc.requires_grad() || kc.requires_grad() || vc.requires_grad());
  // A device query position (a static decode step) only the SDPA backend's mask can read: every backend
  // sends it there (with lckv too: a correct fallback rather than an error in a step that must not sync).
  if (backend == AttentionBackend::kSdpa || p.mask.q_position.defined() ||
      (backend == AttentionBackend::kAuto && qc.is_cuda() && !auto_prefers_our_cuda_kernels(qc, kc, needs_grad))) {
    return sdpa_condensed_attention(qc, kc, vc, p);
  }
  AttentionParams pc = p;
  if (backend == AttentionBackend::kLckv && pc.cpu_path == CpuAttentionPath::kAuto && qc.size(2) > kDirectRows &&
      qc.is_cpu()) {  // our own implementations only
    pc.cpu_path = cpu::tiled_attention_applies(qc) ? CpuAttentionPath::kTiled : CpuAttentionPath::kBlocked;
  }
  if (!needs_grad) return std::get<0>(condensed_attention_forward(qc, kc, vc, pc));  // no autograd node to build
  std::optional<at::Tensor> key_start;
  if (pc.mask.key_start.defined()) key_start = pc.mask.key_start;
  return CondensedAttentionFunction::apply(qc, kc, vc, key_start, pc.mask.strict, pc.mask.window,
                                           pc.mask.q_offset, pc.scale, pc.query_block,
                                           static_cast<int64_t>(pc.cpu_path));
}

}  // namespace lckv::ops
