// Autograd, checks and dispatch for the fused elementwise ops (fused_ops.h): CPU tensors go to the
// fused kernels of the widest runnable capability, other devices to the composed ATen ops.
#include "lckv/ops/fused_ops.h"

#include <ATen/Version.h>
#include <ATen/autocast_mode.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>

#include <atomic>

#include "lckv/ops/cpu/fused_kernels.h"
#include "lckv/ops/accumulate.h"

namespace lckv::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct CompiledVariant {
  const char* name;
  const cpu::FusedKernels& (*kernels)();
};

// Narrowest first.
const std::vector<CompiledVariant>& compiled_variants() {
  static const std::vector<CompiledVariant> v{
      {"DEFAULT", &cpu::DEFAULT::fused_kernels},
#if defined(__x86_64__)  // CMake compiles these variants on x86-64
      {"AVX2", &cpu::AVX2::fused_kernels},
      {"AVX512", &cpu::AVX512::fused_kernels},
#endif
  };
  return v;
}

// Index into compiled_variants() chosen by ScopedFusedCpuCapability; -1: the widest runnable.
std::atomic<int> g_override{-1};

int widest_runnable() {
  static const int index = static_cast<int>(runnable_fused_cpu_capabilities().size()) - 1;
  return index;
}

const cpu::FusedKernels& kernels() {
  const int o = g_override.load();
  return compiled_variants()[o >= 0 ? o : widest_runnable()].kernels();
}

// Our ops choose their own precisions; keep autocast from re-casting the ATen ops inside them.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// ---------------------------------------------------------------------------------------------

struct RMSNormFunction : public torch::autograd::Function<RMSNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps,
                            int64_t out_dtype) {
    NoAutocast no_autocast;
    const int64_t D = x.size(-1);
    const at::Tensor rows = x.reshape({-1, D}).contiguous();
    const at::Tensor w = weight.to(accumulate_dtype(x.scalar_type())).contiguous();
    at::Tensor out = at::empty(rows.sizes(), x.options().dtype(static_cast<at::ScalarType>(out_dtype)));
    at::Tensor rstd = at::empty({rows.size(0)}, x.options().dtype(accumulate_dtype(x.scalar_type())));
    kernels().rms_norm_forward(rows, w, eps, out, rstd);
    ctx->save_for_backward({rows, w, rstd});
    ctx->saved_data["weight_dtype"] = static_cast<int64_t>(weight.scalar_type());
    return out.view(x.sizes());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    NoAutocast no_autocast;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& rows = saved[0];
    const int64_t R = rows.size(0), D = rows.size(1);
    at::Tensor g = grads[0].reshape({R, D});
    // The kernel reads the gradient in its dtype unless that cannot share rows' accumulation type.
    if ((rows.scalar_type() == at::kDouble) != (g.scalar_type() == at::kDouble)) g = g.to(rows.scalar_type());
    g = g.contiguous();
    at::Tensor dx = at::empty_like(rows);
    const int64_t blocks = (R + cpu::kRMSNormRowsPerPartial - 1) / cpu::kRMSNormRowsPerPartial;
    at::Tensor partial = at::empty({blocks, D}, saved[1].options());
    kernels().rms_norm_backward(g, rows, saved[1], saved[2], dx, partial);
    const auto weight_dtype = static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt());
    return {dx.view(grads[0].sizes()), partial.sum(0).to(weight_dtype), at::Tensor(), at::Tensor()};
  }
};

struct RotaryFunction : public torch::autograd::Function<RotaryFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
    NoAutocast no_autocast;
    const at::Tensor xs = x.stride(3) == 1 ? x : x.contiguous();
    const auto acc = accumulate_dtype(x.scalar_type());
    const at::Tensor c = cos.to(acc).contiguous().expand(x.sizes());
    const at::Tensor s = sin.to(acc).contiguous().expand(x.sizes());
    at::Tensor out = at::empty_like(xs);
    kernels().rotary(xs, c, s, out, /*transpose=*/false);
    ctx->save_for_backward({c, s});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    NoAutocast no_autocast;
    const auto saved = ctx->get_saved_variables();
    at::Tensor g = grads[0];
    if (g.stride(3) != 1) g = g.contiguous();
    at::Tensor dx = at::empty_like(g);
    kernels().rotary(g, saved[0], saved[1], dx, /*transpose=*/true);
    return {dx, at::Tensor(), at::Tensor()};
  }
};

struct SwiGLUFunction : public torch::autograd::Function<SwiGLUFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    const at::Tensor g = gate.contiguous(), u = up.contiguous();
    at::Tensor out = at::empty_like(g);
    kernels().swiglu_forward(g, u, out);
    ctx->save_for_backward({g, u});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor d = grads[0].to(saved[0].scalar_type()).contiguous();
    at::Tensor dgate = at::empty_like(saved[0]), dup = at::empty_like(saved[1]);
    kernels().swiglu_backward(d, saved[0], saved[1], dgate, dup);
    return {dgate, dup};
  }
};

struct ResidualAddFunction : public torch::autograd::Function<ResidualAddFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& branch) {
    const at::Tensor hc = h.contiguous(), bc = branch.contiguous();
    at::Tensor out = at::empty_like(hc);
    kernels().residual_add(hc, bc, out);
    ctx->saved_data["branch_dtype"] = static_cast<int64_t>(branch.scalar_type());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto branch_dtype = static_cast<at::ScalarType>(ctx->saved_data["branch_dtype"].toInt());
    return {grads[0], grads[0].to(branch_dtype)};
  }
};

struct ResidualAddRMSNormFunction : public torch::autograd::Function<ResidualAddRMSNormFunction> {
  // h fp32, branch bf16/fp16 of one shape, weight [D]; returns {h + branch (fp32), rms_norm of it (out_dtype)}.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& branch,
                               const at::Tensor& weight, double eps, int64_t out_dtype) {
    NoAutocast no_autocast;
    const int64_t D = h.size(-1);
    const at::Tensor hr = h.reshape({-1, D}).contiguous(), br = branch.reshape({-1, D}).contiguous();
    const at::Tensor w = weight.to(at::kFloat).contiguous();
    at::Tensor sum = at::empty(hr.sizes(), hr.options());
    at::Tensor out = at::empty(hr.sizes(), hr.options().dtype(static_cast<at::ScalarType>(out_dtype)));
    at::Tensor rstd = at::empty({hr.size(0)}, hr.options());
    kernels().residual_add_rms_norm_forward(hr, br, w, eps, sum, out, rstd);
    ctx->save_for_backward({sum, w, rstd});
    ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined: no zeros to add or norm
    ctx->saved_data["branch_dtype"] = static_cast<int64_t>(branch.scalar_type());
    ctx->saved_data["weight_dtype"] = static_cast<int64_t>(weight.scalar_type());
    return {sum.view(h.sizes()), out.view(h.sizes())};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    NoAutocast no_autocast;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& sum = saved[0];
    const int64_t R = sum.size(0), D = sum.size(1);
    const auto branch_dtype = static_cast<at::ScalarType>(ctx->saved_data["branch_dtype"].toInt());
    const auto weight_dtype = static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt());
    const at::Tensor sum_grad =
        grads[0].defined() ? grads[0].reshape({R, D}).to(at::kFloat).contiguous() : at::Tensor();
    if (!grads[1].defined()) {  // only the sum was used
      const at::Tensor dh = sum_grad.defined() ? sum_grad.view(grads[0].sizes()) : at::Tensor();
      return {dh, dh.defined() ? dh.to(branch_dtype) : dh, at::Tensor(), at::Tensor(), at::Tensor()};
    }
    const at::Tensor g = grads[1].reshape({R, D}).contiguous();
    at::Tensor dh = at::empty_like(sum);
    at::Tensor dbranch = at::empty(sum.sizes(), sum.options().dtype(branch_dtype));
    const int64_t blocks = (R + cpu::kRMSNormRowsPerPartial - 1) / cpu::kRMSNormRowsPerPartial;
    at::Tensor partial = at::empty({blocks, D}, sum.options());
    kernels().residual_add_rms_norm_backward(g, sum_grad, sum, saved[1], saved[2], dh, dbranch, partial);
    const auto sizes = grads[1].sizes();
    return {dh.view(sizes), dbranch.view(sizes), partial.sum(0).to(weight_dtype), at::Tensor(), at::Tensor()};
  }
};

struct CrossEntropyFunction : public torch::autograd::Function<CrossEntropyFunction> {
  // logits [B, T, V] (unit stride in V), targets [B, T] int64 contiguous, count = #non-ignored.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& targets,
                            int64_t ignore_index, int64_t count) {
    NoAutocast no_autocast;
    const auto acc = accumulate_dtype(logits.scalar_type());
    at::Tensor lse = at::empty(targets.sizes(), logits.options().dtype(acc));
    at::Tensor loss = at::empty(targets.sizes(), logits.options().dtype(acc));
    kernels().cross_entropy_forward(logits, targets, ignore_index, lse, loss);
    ctx->save_for_backward({logits, targets, lse});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["count"] = count;
    // Mean over the counted targets; 0 / 0 = nan when every target is ignored, as F.cross_entropy.
    return loss.sum() / static_cast<double>(count);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    NoAutocast no_autocast;
    const auto saved = ctx->get_saved_variables();
    const double scale = grads[0].item<double>() / static_cast<double>(ctx->saved_data["count"].toInt());
    const at::Tensor& logits = saved[0];
    at::Tensor dlogits = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
    kernels().cross_entropy_backward(logits, saved[1], ctx->saved_data["ignore_index"].toInt(), saved[2], scale,
                                     dlogits);
    return {dlogits, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

void check_floating(const at::Tensor& t, const char* op, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", dt);
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::ScalarType out_dtype) {
  check_floating(x, "rms_norm", "x");
  check_floating(weight, "rms_norm", "weight");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "rms_norm: weight must be [", x.dim() >= 1 ? x.size(-1) : 0, "] (x's last dim), got ", weight.sizes());
  TORCH_CHECK(x.device() == weight.device(), "rms_norm: x is on ", x.device(), ", weight on ", weight.device());
  TORCH_CHECK(eps >= 0, "rms_norm: eps must be >= 0, got ", eps);
  TORCH_CHECK(at::isFloatingType(out_dtype), "rms_norm: out_dtype must be floating, got ", out_dtype);
  if (x.device().is_cpu() && x.numel() > 0 &&
      (x.scalar_type() == at::kDouble) == (out_dtype == at::kDouble)) {
    return RMSNormFunction::apply(x, weight, eps, static_cast<int64_t>(out_dtype));
  }
  const auto acc = accumulate_dtype(x.scalar_type());
  const at::Tensor xs = x.to(acc);
  return (weight.to(acc) * (xs * at::rsqrt(xs.pow(2).mean(-1, true) + eps))).to(out_dtype);
}

at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_floating(x, "apply_rotary", "x");
  TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "apply_rotary: x must be [B, H, T, D] with even D, got ",
              x.sizes());
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 4 && cos.size(3) == x.size(3),
              "apply_rotary: cos and sin must be [B or 1, 1, T, ", x.size(3), "], got ", cos.sizes(), " and ",
              sin.sizes());
  TORCH_CHECK(!cos.requires_grad() && !sin.requires_grad(), "apply_rotary: cos/sin are constants (no gradient)");
  if (x.device().is_cpu() && cos.device().is_cpu() && x.numel() > 0) return RotaryFunction::apply(x, cos, sin);
  const int64_t half = x.size(-1) / 2;
  const at::Tensor rotated = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos.to(x.scalar_type()) + rotated * sin.to(x.scalar_type());
}

at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) {
  check_floating(gate, "swiglu", "gate");
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type() && gate.device() == up.device(),
              "swiglu: gate and up must share shape, dtype and device, got ", gate.sizes(), " ", gate.scalar_type(),
              " ", gate.device(), " and ", up.sizes(), " ", up.scalar_type(), " ", up.device());
  if (gate.device().is_cpu() && gate.numel() > 0) return SwiGLUFunction::apply(gate, up);
  return at::silu(gate) * up;
}

at::Tensor residual_add(const at::Tensor& h, const at::Tensor& branch) {
  TORCH_CHECK(h.sizes() == branch.sizes() && h.device() == branch.device(),
              "residual_add: h and branch must share shape and device, got ", h.sizes(), " on ", h.device(), " and ",
              branch.sizes(), " on ", branch.device());
  const auto b = branch.scalar_type();
  if (h.device().is_cpu() && h.scalar_type() == at::kFloat && (b == at::kBFloat16 || b == at::kHalf)) {
    return ResidualAddFunction::apply(h, branch);
  }
  return h + branch;
}

std::pair<at::Tensor, at::Tensor> residual_add_rms_norm(const at::Tensor& h, const at::Tensor& branch,
                                                         const at::Tensor& weight, double eps,
                                                         at::ScalarType out_dtype) {
  TORCH_CHECK(h.sizes() == branch.sizes() && h.device() == branch.device(),
              "residual_add_rms_norm: h and branch must share shape and device, got ", h.sizes(), " on ", h.device(),
              " and ", branch.sizes(), " on ", branch.device());
  check_floating(weight, "residual_add_rms_norm", "weight");
  TORCH_CHECK(h.dim() >= 1 && weight.dim() == 1 && weight.size(0) == h.size(-1), "residual_add_rms_norm: weight must be [",
              h.dim() >= 1 ? h.size(-1) : 0, "] (h's last dim), got ", weight.sizes());
  TORCH_CHECK(h.device() == weight.device(), "residual_add_rms_norm: h is on ", h.device(), ", weight on ",
              weight.device());
  TORCH_CHECK(eps >= 0, "residual_add_rms_norm: eps must be >= 0, got ", eps);
  TORCH_CHECK(at::isFloatingType(out_dtype), "residual_add_rms_norm: out_dtype must be floating, got ", out_dtype);
  const auto b = branch.scalar_type();
  if (h.device().is_cpu() && h.scalar_type() == at::kFloat && (b == at::kBFloat16 || b == at::kHalf) &&
      out_dtype != at::kDouble && h.numel() > 0) {
    const auto outs = ResidualAddRMSNormFunction::apply(h, branch, weight, eps, static_cast<int64_t>(out_dtype));
    return {outs[0], outs[1]};
  }
  at::Tensor sum = residual_add(h, branch);
  return {sum, rms_norm(sum, weight, eps, out_dtype)};
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  const auto dt = x.scalar_type();
  const bool small = x.device().is_cpu() && x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1) &&
                     x.numel() <= cpu::kSmallLinearRows * x.size(-1) && x.numel() > 0 && weight.scalar_type() == dt &&
                     (dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble) &&
                     weight.device().is_cpu() && (!bias.defined() || (bias.scalar_type() == dt && bias.dim() == 1 &&
                                                                     bias.size(0) == weight.size(0) &&
                                                                     bias.device().is_cpu())) &&
                     !at::autocast::is_autocast_enabled(at::kCPU);
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || weight.requires_grad() || (bias.defined() && bias.requires_grad()));
  if (!small || grad) return at::linear(x, weight, bias);
  RECORD_FUNCTION("lckv::linear", std::vector<c10::IValue>());  // profilers see the kernel
  const int64_t K = x.size(-1), N = weight.size(0);
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = N;
  at::Tensor out = at::empty(sizes, x.options().memory_format(at::MemoryFormat::Contiguous));
  kernels().small_linear(x.reshape({-1, K}).contiguous(), weight.contiguous(),
                         bias.defined() ? bias.contiguous() : bias, out.view({-1, N}));
  return out;
}

at::Tensor cross_entropy(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  check_floating(logits, "cross_entropy", "logits");
  TORCH_CHECK((logits.dim() == 3 || logits.dim() == 2) && targets.dim() == logits.dim() - 1 &&
                  targets.sizes() == logits.sizes().slice(0, logits.dim() - 1),
              "cross_entropy: logits [B, T, V] with targets [B, T] (or [N, V] with [N]) expected, got ",
              logits.sizes(), " and ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt,
              "cross_entropy: targets must be int64 or int32 ids, got ", targets.scalar_type());
  TORCH_CHECK(logits.device() == targets.device(), "cross_entropy: logits on ", logits.device(), ", targets on ",
              targets.device());
  const int64_t V = logits.size(-1);
  const at::Tensor t = targets.to(at::kLong);
  const at::Tensor counted = t.ne(ignore_index);
  const at::Tensor out_of_range = counted.logical_and(t.lt(0).logical_or(t.ge(V)));
  if (out_of_range.any().item<bool>()) {
    TORCH_CHECK(false, "cross_entropy: target ", t.masked_select(out_of_range)[0].item<int64_t>(),
                " is outside [0, vocab_size = ", V, ") and is not ignore_index (", ignore_index, ")");
  }
  if (!logits.device().is_cpu() || logits.numel() == 0) {
    const auto acc = accumulate_dtype(logits.scalar_type());
    return at::cross_entropy_loss(logits.reshape({-1, V}).to(acc), t.reshape({-1}), {}, at::Reduction::Mean,
                                  ignore_index, 0.0);
  }
  at::Tensor l3 = logits.dim() == 3 ? logits : logits.unsqueeze(0);
  if (l3.stride(2) != 1) l3 = l3.contiguous();
  const at::Tensor t2 = (logits.dim() == 3 ? t : t.unsqueeze(0)).contiguous();
  return CrossEntropyFunction::apply(l3, t2, ignore_index, counted.sum().item<int64_t>());
}

namespace cpu {
const FusedKernels& active_fused_kernels() { return kernels(); }
}  // namespace cpu

std::string fused_cpu_capability() {
  const int o = g_override.load();
  return compiled_variants()[o >= 0 ? o : widest_runnable()].name;
}

std::vector<std::string> runnable_fused_cpu_capabilities() {
  // ATen has detected what this CPU runs (and honours ATEN_CPU_CAPABILITY): our variants up to it.
  const std::string aten = at::get_cpu_capability();
  std::vector<std::string> out;
  for (const auto& v : compiled_variants()) {
    const std::string name = v.name;
    const bool runnable = name == "DEFAULT" || (name == "AVX2" && (aten == "AVX2" || aten == "AVX512")) ||
                          (name == "AVX512" && aten == "AVX512");
    if (runnable) out.push_back(name);
  }
  return out;
}

ScopedFusedCpuCapability::ScopedFusedCpuCapability(const std::string& capability)
    : previous_(g_override.load()) {
  const auto runnable = runnable_fused_cpu_capabilities();
  TORCH_CHECK(std::find(runnable.begin(), runnable.end(), capability) != runnable.end(), "fused CPU kernels: '",
              capability, "' is not a variant this build has and this CPU runs (", c10::Join(", ", runnable), ")");
  const auto& variants = compiled_variants();
  for (size_t i = 0; i < variants.size(); ++i) {
    if (capability == variants[i].name) g_override = static_cast<int>(i);
  }
}

ScopedFusedCpuCapability::~ScopedFusedCpuCapability() { g_override = previous_; }

}  // namespace lckv::ops
