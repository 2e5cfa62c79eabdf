#!/usr/bin/env bash
# The one prepared run for the GPU device machine (H100/H200 image: nvcc, cmake, ninja and a
# python3 whose torch has CUDA; no network). It
#   1. unpacks the build dependencies the image lacks from third_party/debs (dpkg -x, no root
#      install; scripts/fetch_gpu_debs.sh downloads them beforehand on a machine with network),
#   2. builds with the CUDA kernels (sm_90 only there, to save time) and lists the cubins,
#   3. runs the [cuda] tests with LCKV_REQUIRE_CUDA=1 (a test that cannot reach the GPU fails
#      rather than skips),
#   4. runs lckv-bench-attention (kernels vs SDPA flash and decode bandwidth vs SDPA; then TinyLlama
#      end to end, with decode steps dynamic vs static vs CUDA-graph replay), each under a time limit,
#      and turns its kernel rows into $OUT/cuda_routes_measured.inc (scripts/make_cuda_routes.py: the
#      shapes where `auto` should use our kernels on this card; copy it into csrc/lckv/ops/ to adopt it),
#   5. runs the whole ctest suite (CUDA required),
#   6. builds the Python extension against this machine's torch and runs pytest (GPU_CHECK_PYTHON=0 skips),
#   7. runs the paper's generation scenarios (5 + 8187, 512 + 1024) at the largest batch that fits,
# and writes its logs and JSON to $OUT (the device tool's output folder; bench/results/ when unset)
# and the JSON to bench/results/. Exit status: non-zero if any step failed.
#
# From a session with a GPU lent:
#   scripts/fetch_gpu_debs.sh   # once, here
#   run(command="bash scripts/gpu_check.sh", carry=["third_party/debs", "third_party/sdist"], timeout_s=600)
# then copy the returned bench_attention_*.json into bench/results/. Total: about 8 minutes.
# GPU_CHECK_CTEST=0 skips the full ctest run; GPU_CHECK_E2E=0 skips the end-to-end benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR" bench/results
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
BUILD=build-gpu
JOBS=$(nproc)
status=0

say() { echo; echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }
# Runs a command, appending its output to the log (and printing it); returns its status.
logged() { "$@" 2>&1 | tee -a "$LOG"; return "${PIPESTATUS[0]}"; }
fail() { echo "FAILED: $*" | tee -a "$LOG"; status=1; }

command -v nvcc >/dev/null || export PATH="$PATH:/usr/local/cuda/bin"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
say "card: ${card:-none}; python: $(command -v python3)"
logged python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"

say "build dependencies"
extra_cmake=()
missing=0
for h in catch2/catch.hpp nlohmann/json.hpp CLI/CLI.hpp pcre2.h; do
  [ -e "/usr/include/$h" ] || missing=1
done
[ -s third_party/sdist/sentencepiece-0.2.1.tar.gz ] || fail "third_party/sdist/sentencepiece-0.2.1.tar.gz is missing (scripts/setup.sh fetches it; carry third_party/sdist)"
if [ "$missing" = 1 ]; then
  if ! ls third_party/debs/*.deb >/dev/null 2>&1; then
    fail "build dependencies are missing and third_party/debs has no .deb files (run scripts/fetch_gpu_debs.sh and carry third_party/debs)"
    exit 1
  fi
  DEPS=/tmp/lckv-gpu-deps
  rm -rf "$DEPS"
  for f in third_party/debs/*.deb; do dpkg -x "$f" "$DEPS"; done
  export CMAKE_PREFIX_PATH="$DEPS/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
  export LD_LIBRARY_PATH="$DEPS/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # The packages' .pc files say prefix=/usr: the sysroot points them at the unpacked tree.
  export PKG_CONFIG_LIBDIR="$DEPS/usr/lib/x86_64-linux-gnu/pkgconfig"
  export PKG_CONFIG_SYSROOT_DIR="$DEPS"
  extra_cmake+=("-DPKG_CONFIG_EXECUTABLE=$DEPS/usr/bin/pkgconf")
  echo "unpacked $(ls third_party/debs/*.deb | wc -l) packages into $DEPS" | tee -a "$LOG"
fi

say "configure and build ($JOBS jobs)"
build_start=$(date +%s)
# PIC, so step 6 builds the Python extension in this same tree instead of compiling the library again.
logged cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLCKV_PYTHON="$(command -v python3)" -DLCKV_PIC=ON \
  -DLCKV_WITH_CUDA=ON -DLCKV_CUDA_ARCHS=90 "${extra_cmake[@]}" -Wno-dev || { fail "cmake configure"; exit 1; }
logged cmake --build "$BUILD" -j"$JOBS" --target lckv_unit_tests lckv_torch_tests lckv-bench-attention ||
  { fail "build"; exit 1; }
echo "build took $(( $(date +%s) - build_start )) s" | tee -a "$LOG"
logged "$(command -v cuobjdump || echo /usr/local/cuda/bin/cuobjdump)" --list-elf "$BUILD/liblckv_cuda_kernels.a" || fail "cuobjdump"

say "CUDA tests (required to run)"
cuda_tests=passed
LCKV_REQUIRE_CUDA=1 logged timeout 240 "$BUILD/lckv_torch_tests" "[cuda]~[emulated]" --durations yes ||
  { fail "[cuda] tests"; cuda_tests=failed; }

# Benchmarks before the full suite, so their JSON comes back even if the run is cut short.
slug=$(echo "${card:-gpu}" | tr -c 'A-Za-z0-9\n' '_' | tr -s '_' | sed 's/_$//')
day=$(date -u +%Y%m%d)
bench() {  # bench NAME PARTS TIMEOUT_S
  local json="bench_attention_${1}_${slug}_${day}.json"
  say "benchmark: $1"
  logged timeout "$3" "$BUILD/lckv-bench-attention" --parts "$2" --threads "$JOBS" --card "${card:-unknown}" --out "$OUT_DIR/$json" ||
    fail "lckv-bench-attention --parts $2"
  if [ -f "$OUT_DIR/$json" ] && [ "$OUT_DIR" != bench/results ]; then cp "$OUT_DIR/$json" bench/results/; fi
}
bench kernels kernels 200
# The routes `auto` takes on this card (csrc/lckv/ops/cuda_routes.h): copy the .inc into csrc/lckv/ops/ to adopt them.
kernels_json="$OUT_DIR/bench_attention_kernels_${slug}_${day}.json"
if [ -f "$kernels_json" ]; then
  logged python3 scripts/make_cuda_routes.py "$kernels_json" --cuda-tests "$cuda_tests" \
    --out "$OUT_DIR/cuda_routes_measured.inc" || fail "make_cuda_routes"
fi
[ "${GPU_CHECK_E2E:-1}" != 0 ] && bench e2e e2e 210

if [ "${GPU_CHECK_CTEST:-1}" != 0 ]; then
  say "ctest (everything, CUDA required)"
  LCKV_REQUIRE_CUDA=1 logged ctest --test-dir "$BUILD" -j"$JOBS" --output-on-failure --timeout 150 || fail "ctest"
fi

# The Python package against this machine's own torch (issue 6: the same pytest suite must pass here).
if [ "${GPU_CHECK_PYTHON:-1}" != 0 ]; then
  say "Python package lckv against $(command -v python3)'s torch, then pytest"
  if python3 -c "import pytest" 2>/dev/null; then
    LCKV_PY_BUILD_DIR="$PWD/$BUILD" LCKV_BUILD_JOBS="$JOBS" logged python3 setup.py -q build_ext --inplace ||
      fail "building lckv._C"
    LCKV_REQUIRE_CUDA=1 logged timeout 300 python3 -m pytest -q tests/python || fail "pytest"
  else
    fail "pytest is not installed for $(command -v python3): the Python suite did not run"
  fi
fi

# Last, as the longest and least essential: the paper's scenarios at the largest batch that fits (GPU_CHECK_SCENARIOS=0 skips).
[ "${GPU_CHECK_SCENARIOS:-1}" != 0 ] && bench scenarios scenarios 180

say "done: status $status"
exit "$status"
