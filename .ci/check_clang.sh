#!/usr/bin/env bash
# The README promises GCC or Clang: the CPU package's extension modules (_core and _cuda_emulated, every
# source of the core, the kernels at each SIMD level) built with Clang, as CMakeLists.txt builds them.
# Clang's warnings are counted, not fatal (most say that the float64 pointwise loops, which call libm's
# scalar exp and tanh as GCC's build does too, are not vectorised). Installs the Debian package clang
# when clang++ is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if ! command -v clang++ >/dev/null; then
  sudo=()
  ((EUID == 0)) || sudo=(sudo)
  { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq clang; } >/dev/null 2>&1 || true
  if ! command -v clang++ >/dev/null; then
    echo "check_clang: clang++ is missing and 'apt-get install clang' failed" >&2
    exit 1
  fi
fi
clang++ --version | head -1

# The build requirements pyproject.toml names (jaxlib left out, as in check_vectorised.sh).
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -c 'import tomllib' 2>/dev/null || "$work/venv/bin/python" -m pip install -qq tomli
mapfile -t reqs < <("$work/venv/bin/python" .ci/requirements.py --build --without jaxlib)
"$work/venv/bin/python" -m pip install -qq cmake ninja "${reqs[@]}"

"$work/venv/bin/cmake" -S "$repo" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_COMPILER="$(command -v clang++)" -DCMAKE_C_COMPILER="$(command -v clang)" \
  -DPython_EXECUTABLE="$work/venv/bin/python" -DFUSEDRNN_JAX_FFI=OFF -DFUSEDRNN_CUDA=OFF \
  -Dpybind11_DIR="$("$work/venv/bin/python" -m pybind11 --cmakedir)" >"$work/configure.log" 2>&1 ||
  { tail -30 "$work/configure.log"; echo "check_clang: cmake could not configure with Clang" >&2; exit 1; }
"$work/venv/bin/cmake" --build "$work/build" --target _core _cuda_emulated >"$work/build.log" 2>&1 ||
  { grep -E "error|Error" "$work/build.log" | head -40; echo "check_clang: the Clang build failed" >&2; exit 1; }
echo "check_clang: built with Clang ($(grep -c "warning:" "$work/build.log" || true) warnings)"
