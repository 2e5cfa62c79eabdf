// Coarse tasks on torch's intra-op threads: one OpenMP region for a whole piece of work (e.g. a model iteration
// per slice of the batch) instead of one per op inside it.
#pragma once

#include <cstdint>
#include <functional>

namespace lckv {

// Runs task(i) for i in [0, n) on torch's intra-op threads, contiguous runs of i per thread, in one parallel
// region. Each thread runs with the caller's thread-local state (grad mode, autocast and its dtype, inference
// mode: ATen's parallel_for gives its workers none of it). ATen ops inside a task run on that thread alone.
// The first exception of a task is rethrown here. Autocast's cache of weight casts is one map shared by all
// threads in torch 2.11 (mutex-guarded), so the casts a task makes are dropped with the caller's autocast
// scope, as the caller's own are (a test checks that updated weights are seen).
void parallel_tasks(int64_t n, const std::function<void(int64_t)>& task);

}  // namespace lckv
