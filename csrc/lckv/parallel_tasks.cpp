// Compiled with OpenMP (CMakeLists.txt): at::parallel_for is an OpenMP pragma in ATen's headers, and without
// the flag it silently runs everything on the calling thread.
#include "lckv/parallel_tasks.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

namespace lckv {

void parallel_tasks(int64_t n, const std::function<void(int64_t)>& task) {
  const at::ThreadLocalState state;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t i = begin; i < end; ++i) task(i);
  });
}

}  // namespace lckv
