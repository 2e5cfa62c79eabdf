#!/usr/bin/env bash
# Fuzzes the readers of untrusted files with libFuzzer and clang's AddressSanitizer and UBSan:
# tests/fuzz/fuzz_{safetensors,config,shards,tokenizer_json}.cpp, each for N minutes (default 1), one after the
# other (libFuzzer's fork mode: a crash is saved and fuzzing goes on). Each starts from its checked-in corpus (tests/fuzz/corpus/<target>/, which ctest replays
# without clang); new inputs go to build-fuzz/corpus/<target>/, crashes to build-fuzz/findings/<target>/.
#   scripts/fuzz.sh [minutes] [target...]
#   CLANGXX=clang++-14 LCKV_PYTHON=.venv/bin/python scripts/fuzz.sh 5 safetensors
# Needs clang and its libFuzzer runtime (Debian: clang, libclang-rt-14-dev); the safetensors target
# links LibTorch from LCKV_PYTHON's torch. Exits non-zero when a target found a crash.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-1}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(config shards safetensors tokenizer_json)
CXX=${CLANGXX:-clang++}
if ! command -v "$CXX" >/dev/null || ! ls /usr/lib/llvm-14/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then
  echo "== installing clang and its libFuzzer runtime (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q clang libclang-rt-14-dev
fi
PY=${LCKV_PYTHON:-.venv/bin/python}
OUT=build-fuzz
mkdir -p "$OUT"

FLAGS=(-std=c++17 -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -Icsrc)
build() {  # target, extra sources and flags
  local target=$1
  shift
  echo "== building $OUT/fuzz_$target"
  "$CXX" "${FLAGS[@]}" "tests/fuzz/fuzz_$target.cpp" "$@" -o "$OUT/fuzz_$target"
}

status=0
for target in "${TARGETS[@]}"; do
  case $target in
    config) build config csrc/lckv/config.cpp csrc/lckv/json_fields.cpp csrc/lckv/files.cpp ;;
    shards) build shards csrc/lckv/data/shards.cpp csrc/lckv/files.cpp ;;
    tokenizer_json) build tokenizer_json csrc/lckv/data/hf_tokenizer.cpp csrc/lckv/json_fields.cpp csrc/lckv/files.cpp \
      -lpcre2-8 ;;
    safetensors)
      torch_dir=$("$PY" -c "import os, torch; print(os.path.dirname(torch.__file__))")
      # libstdc++ first in DT_NEEDED, as CMakeLists.txt does for the library (libtorch's own
      # std::filesystem copies crash when called from this compiler's code).
      build safetensors csrc/lckv/io/safetensors.cpp csrc/lckv/files.cpp -isystem "$torch_dir/include" \
        -isystem "$torch_dir/include/torch/csrc/api/include" -L"$torch_dir/lib" -Wl,-rpath,"$torch_dir/lib" \
        -Wl,--push-state,--no-as-needed,-lstdc++,--pop-state -ltorch_cpu -lc10 ;;
    *) echo "unknown target '$target' (expected config, shards, safetensors or tokenizer_json)" >&2; exit 2 ;;
  esac
  dict=()
  [ -f "tests/fuzz/$target.dict" ] && dict=(-dict="tests/fuzz/$target.dict")
  mkdir -p "$OUT/corpus/$target" "$OUT/findings/$target"
  echo "== fuzzing $target for $MINUTES minute(s)"
  # LibTorch keeps allocations alive until exit on purpose: its leak reports would be noise.
  leaks=1
  [ "$target" != safetensors ] || leaks=0
  ASAN_OPTIONS=detect_leaks=$leaks:allocator_may_return_null=1 UBSAN_OPTIONS=print_stacktrace=1 \
    "$OUT/fuzz_$target" "$OUT/corpus/$target" "tests/fuzz/corpus/$target" "${dict[@]}" \
    -max_total_time=$((MINUTES * 60)) -timeout=10 -rss_limit_mb=4096 -max_len=65536 \
    -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
    -artifact_prefix="$OUT/findings/$target/" >"$OUT/fuzz_$target.log" 2>&1 || true
  # The last status line: executions, coverage (cov: edges, ft: features), corpus size, findings.
  grep -E "^#[0-9]+: cov" "$OUT/fuzz_$target.log" | tail -1 || tail -5 "$OUT/fuzz_$target.log"
  if [ -n "$(find "$OUT/findings/$target" -type f)" ]; then
    echo "== $target: findings in $OUT/findings/$target/" >&2
    status=1
  fi
done
exit $status
