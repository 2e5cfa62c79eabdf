// The dtype the ops and the model compute statistics, tables and logits in: fp64 for fp64 tensors
// (the exactness path), fp32 for fp32/bf16/fp16.
#pragma once

#include <c10/core/ScalarType.h>

namespace lckv::ops {

inline at::ScalarType accumulate_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace lckv::ops
