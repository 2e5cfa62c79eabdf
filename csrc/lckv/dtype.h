// The floating dtypes the project reads and writes, under each spelling it uses: command-line flags
// and run files ("bf16"), Hugging Face config.json `torch_dtype` / `dtype` ("bfloat16") and
// safetensors headers ("BF16"). One table, so the spellings cannot drift apart.
#pragma once

#include <c10/core/ScalarType.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

namespace lckv {

struct FloatDtype {
  c10::ScalarType type;
  const char* flag;         // "fp32"
  const char* hf;           // "float32"
  const char* safetensors;  // "F32"
};

inline constexpr FloatDtype kFloatDtypes[] = {
    {c10::kDouble, "fp64", "float64", "F64"},
    {c10::kFloat, "fp32", "float32", "F32"},
    {c10::kBFloat16, "bf16", "bfloat16", "BF16"},
    {c10::kHalf, "fp16", "float16", "F16"},
};

// The entry of a floating dtype; std::invalid_argument for any other dtype.
inline const FloatDtype& float_dtype(c10::ScalarType type) {
  for (const FloatDtype& d : kFloatDtypes) {
    if (d.type == type) return d;
  }
  throw std::invalid_argument(std::string("expected a floating dtype (float64, float32, bfloat16, float16), got ") +
                              c10::toString(type));
}

// Parses a flag ("bf16") or Hugging Face ("bfloat16") spelling; `what` names the option or field.
inline c10::ScalarType parse_float_dtype(const std::string& name, const std::string& what) {
  for (const FloatDtype& d : kFloatDtypes) {
    if (name == d.flag || name == d.hf) return d.type;
  }
  throw std::invalid_argument(what + ": unknown dtype \"" + name +
                              "\" (expected fp64, fp32, bf16, fp16 or float64, float32, bfloat16, float16)");
}

// The values of every compute-dtype option (lckv-train's dtype, lckv-eval, the CPU benchmarks, the
// Python CLIs through _C.compute_dtype_names): "auto" (resolve_compute_dtype, autocast.h: bf16 where
// the device computes it natively, else fp32), "bf16" (fp32 weights, bf16 autocast) or "fp32".
inline const std::vector<std::string>& compute_dtype_names() {
  static const std::vector<std::string> names{"auto", "bf16", "fp32"};
  return names;
}
inline bool is_compute_dtype_name(const std::string& name) {
  const auto& names = compute_dtype_names();
  return std::find(names.begin(), names.end(), name) != names.end();
}
// The error for any other value of the option `what`.
inline std::string compute_dtype_error(const std::string& what, const std::string& got) {
  const auto& names = compute_dtype_names();
  std::string expected;  // "auto", "bf16" or "fp32"
  for (size_t i = 0; i < names.size(); ++i) {
    expected += (i == 0 ? "" : i + 1 == names.size() ? " or " : ", ") + ("\"" + names[i] + "\"");
  }
  return what + " must be " + expected + ", got \"" + got + "\"";
}

}  // namespace lckv
