#include "lckv/openmp_policy.h"

#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <initializer_list>

namespace lckv {

namespace {

// Whether an OpenMP runtime is already loaded (and so has read its environment).
bool openmp_runtime_loaded() {
  for (const char* soname : {"libgomp.so.1", "libomp.so", "libomp.so.5", "libiomp5.so"}) {
    if (void* handle = dlopen(soname, RTLD_LAZY | RTLD_NOLOAD)) {
      dlclose(handle);
      return true;
    }
  }
  return false;
}

}  // namespace

void ensure_passive_openmp(int argc, char** argv) {
  if (argc < 1 || argv == nullptr || std::getenv("OMP_WAIT_POLICY") != nullptr) return;
  if (setenv("OMP_WAIT_POLICY", "PASSIVE", /*overwrite=*/0) != 0) return;
  // A runtime loaded later (or none at all) reads the value set above; one loaded already needs a fresh start.
  if (openmp_runtime_loaded()) execv("/proc/self/exe", argv);
}

}  // namespace lckv
