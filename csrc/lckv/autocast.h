// RAII scope for torch autocast from C++ (what `with torch.autocast(...)` does in Python):
// enables it for a device type with a dtype, and on exit restores the previous state and drops
// the cast-weight cache so the next step sees updated weights. Also the choice of the compute dtype
// "auto": bf16 only where the device computes bf16 natively.
#pragma once

#include <ATen/autocast_mode.h>
#include <ATen/cpu/Utils.h>
#include <c10/core/Device.h>

#include <stdexcept>
#include <string>

#include "lckv/dtype.h"

namespace lckv {

// Whether bf16 matmuls run natively on `device`: CUDA (the sm_80/sm_90 GPUs the kernels are built
// for), or a CPU with AMX-BF16 or AVX512-BF16. Elsewhere (an AVX2-only x86 such as AMD Zen 3) oneDNN
// emulates them: 11 GFLOP/s against fp32's 70, and a bf16 training step of the quickstart model took
// 15x an fp32 one (28.3 vs 1.83 s).
// Whether this CPU has the feature `name` as torch's cpuinfo reports it ("avx2", "avx512_bf16", "amx_bf16", ...).
inline bool cpu_has_capability(const char* name) {
  const auto caps = at::cpu::get_cpu_capabilities();
  const auto it = caps.find(name);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

inline bool native_bf16(const c10::Device& device) {
  if (device.is_cuda()) return true;
  if (!device.is_cpu()) return false;
  static const bool cpu = cpu_has_capability("avx512_bf16") || cpu_has_capability("amx_bf16");
  return cpu;
}

// A compute-dtype option's value for `device`: "auto" is "bf16" where native_bf16, else "fp32";
// "bf16" and "fp32" stay as given. `what` names the option in the error for any other value.
inline std::string resolve_compute_dtype(const std::string& name, const c10::Device& device,
                                         const std::string& what = "dtype") {
  if (name == "auto") return native_bf16(device) ? "bf16" : "fp32";
  if (is_compute_dtype_name(name)) return name;
  throw std::invalid_argument(compute_dtype_error(what, name));
}

class AutocastScope {
 public:
  AutocastScope(at::DeviceType device, at::ScalarType dtype, bool enabled = true)
      : device_(device),
        prev_enabled_(at::autocast::is_autocast_enabled(device)),
        prev_dtype_(at::autocast::get_autocast_dtype(device)) {
    at::autocast::set_autocast_enabled(device_, enabled);
    at::autocast::set_autocast_dtype(device_, dtype);
    at::autocast::increment_nesting();
  }
  ~AutocastScope() {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(device_, prev_enabled_);
    at::autocast::set_autocast_dtype(device_, prev_dtype_);
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  at::DeviceType device_;
  bool prev_enabled_;
  at::ScalarType prev_dtype_;
};

}  // namespace lckv
