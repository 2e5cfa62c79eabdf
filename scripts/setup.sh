#!/usr/bin/env bash
# One-time (and idempotent) set-up on Debian 12 as root: system packages through apt, the
# project's Python environment in .venv with the pinned PyPI torch, then the C++ build.
# Re-running it only does what is missing; the build is incremental (ccache outside the tree).
#   scripts/setup.sh            everything
#   LCKV_SKIP_BUILD=1 ...       packages and .venv only
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0   # the GPU machine has torch 2.11 + CUDA 13; this wheel is cu130 too
# (scripts/fuzz.sh installs clang and its libFuzzer runtime itself: only fuzzing needs them.)
APT_PACKAGES=(cmake ninja-build ccache g++ catch2 nlohmann-json3-dev libcli11-dev python3-venv python3-dev bible-kjv libpcre2-dev)
CONSTRAINTS=scripts/constraints.txt   # every Python package pinned (transformers included)
SPM_VERSION=0.2.1                      # SentencePiece's source (PyPI sdist), built by CMakeLists.txt

say() { printf '\n== %s\n' "$*"; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q "${missing[@]}"
else
  say "system packages present"
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  python3 -m venv .venv
fi
# Reinstalled when the constraints change (a stamp in .venv records the ones installed).
stamp=.venv/.lckv-constraints.sha256
want=$(sha256sum "$CONSTRAINTS" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] ||
   ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  say "installing Python packages into .venv (pinned by $CONSTRAINTS; pip caches downloads in ~/.cache/pip)"
  .venv/bin/pip install --progress-bar off -c "$CONSTRAINTS" "torch==$TORCH_VERSION" numpy pytest pybind11 \
    safetensors sentencepiece protobuf transformers tokenizers lm-eval accelerate matplotlib wheel
  echo "$want" > "$stamp"
else
  say "Python packages present (torch $TORCH_VERSION, $CONSTRAINTS)"
fi
if [ ! -s "third_party/sdist/sentencepiece-$SPM_VERSION.tar.gz" ]; then
  say "fetching SentencePiece $SPM_VERSION's source (PyPI sdist) into third_party/sdist/"
  .venv/bin/pip download --progress-bar off --no-binary :all: --no-deps "sentencepiece==$SPM_VERSION" -d third_party/sdist
fi
.venv/bin/python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

if [ "${LCKV_SKIP_BUILD:-0}" != 1 ]; then
  say "building (build/, ninja -j2)"
  # One position-independent build serves the programs, the tests and the Python extension
  # (target lckv_python), so the library compiles once; setup.py is pointed at it below.
  venv_python="$PWD/.venv/bin/python"
  if ! grep -qsx "LCKV_PIC:BOOL=ON" build/CMakeCache.txt ||
     ! grep -qsxF "LCKV_PYTHON:FILEPATH=$venv_python" build/CMakeCache.txt; then
    cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLCKV_PIC=ON -DLCKV_PYTHON="$venv_python" -Wno-dev
  fi
  cmake --build build -j2
  # The Python package lckv: an editable install whose extension lckv._C setup.py copies from
  # build/. Once installed, refreshing the extension in place is enough.
  export LCKV_PY_BUILD_DIR="$PWD/build"
  if .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('lckv') is None)"; then
    say "Python package lckv: refreshing lckv._C (from build/)"
    .venv/bin/python setup.py -q build_ext --inplace
  else
    say "Python package lckv: pip install -e . (lckv._C from build/)"
    .venv/bin/pip install --no-build-isolation --no-deps -e .
  fi
fi
say "set-up done"
