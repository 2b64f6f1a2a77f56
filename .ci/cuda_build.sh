#!/usr/bin/env bash
# CI without a GPU: build the CUDA module fusedrnn._cuda for sm_80 and sm_90 and check what can be checked
# here. In a fresh virtual environment (its build tree under a temporary directory, never build/):
#   1. install cuBLAS from its wheel, build with FUSEDRNN_CUDA=ON (a build that
#      cannot make the module fails) and ptxas's resource report on;
#   2. fail on any register spill (a kernel whose report shows spill stores or loads);
#   3. check kernels were compiled for both architectures, and that the module imports and reports them;
#   4. check that the CPU module _core links no CUDA library;
#   5. run the emulated device tests and the CUDA tests (which skip without a GPU), fusedrnn.jax's
#      included: its CUDA handlers compiled into _cuda (jaxlib's headers, its oldest supported version)
#      and exported, their device body run over the emulated device;
#   6. configure with FUSEDRNN_CUDA=ON where cuBLAS is missing (must fail) and AUTO (must say why not);
#   7. build again with FUSEDRNN_CUDA=OFF and check no _cuda module was installed.
# Needs nvcc (a CUDA 13 toolkit) on PATH; the GPU itself is not needed.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log() { printf '\n== %s\n' "$*"; }

command -v nvcc >/dev/null || { echo "cuda_build: nvcc not found on PATH" >&2; exit 1; }
"$python" -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "nvidia-cublas>=13,<14" \
  "scikit-build-core>=0.10" "pybind11>=2.13" "scipy-openblas32>=0.3.28" numpy tqdm \
  "pytest>=7" "pytest-timeout>=2.1" "hypothesis>=6.0" "jax==0.7.1" "jaxlib==0.7.1"

log "build with FUSEDRNN_CUDA=ON for sm_80 and sm_90, ptxas -v"
build_log="$work/build.log"
FUSEDRNN_CUDA=ON FUSEDRNN_CUDA_PTXAS_VERBOSE=ON python -m pip install -v --no-deps --no-build-isolation \
  --config-settings=build-dir="$work/build" --config-settings=cmake.define.FUSEDRNN_JAX_FFI=ON \
  --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES="80;90" . >"$build_log" 2>&1 ||
  { tail -50 "$build_log"; echo "cuda_build: the build failed" >&2; exit 1; }
grep "fusedrnn: CUDA module built" "$build_log"

log "register spills"
reports=$(grep -c "bytes spill stores" "$build_log" || true)
if [[ "$reports" -eq 0 ]]; then
  echo "cuda_build: no ptxas resource report in the build log" >&2
  exit 1
fi
if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$build_log"; then
  echo "cuda_build: a kernel spills registers (above)" >&2
  exit 1
fi
echo "no spills in $reports kernel reports"

log "the module"
cuda_module=$(python -c "import fusedrnn, os; print(os.path.join(os.path.dirname(fusedrnn.__file__), [f for f in os.listdir(os.path.dirname(fusedrnn.__file__)) if f.startswith('_cuda.')][0]))")
core_module=$(python -c "import fusedrnn._core as c; print(c.__file__)")
# ptxas names the architecture it compiles each kernel for; cuobjdump, where installed, lists the code.
for arch in sm_80 sm_90; do
  grep -q "for '$arch'" "$build_log" || { echo "cuda_build: no kernel compiled for $arch" >&2; exit 1; }
done
if command -v cuobjdump >/dev/null; then cuobjdump --list-elf "$cuda_module"; fi
(cd "$work" && python -c "
import fusedrnn
info = fusedrnn.build_info()['cuda']
print(info)
assert info['built'] and info['architectures'] == '80,90', info
import fusedrnn._cuda as cuda, fusedrnn._core as core
assert set(cuda.jax_ffi_targets) == set(core.jax_ffi_targets), cuda.jax_ffi_targets
assert cuda.jax_ffi_built_with_jaxlib == '0.7.1', cuda.jax_ffi_built_with_jaxlib
print('CUDA handlers of fusedrnn.jax:', sorted(cuda.jax_ffi_targets))
")
if readelf -d "$core_module" | grep -E "NEEDED.*(cuda|cublas)"; then
  echo "cuda_build: _core links a CUDA library" >&2
  exit 1
fi

log "tests: the emulated device backend and the CUDA tests (skipped without a GPU)"
python -m pytest -q -p no:cacheprovider tests/test_emulated_device.py tests/test_cuda.py tests/test_jax_cuda.py

log "FUSEDRNN_CUDA=ON without cuBLAS fails the configuration, AUTO says why it skips"
# A Python with the build's other needs but no nvidia-cublas wheel (the toolkit here has no cuBLAS).
"$python" -m venv "$work/bare"
"$work/bare/bin/python" -m pip install -q "scipy-openblas32>=0.3.28"
configure() {
  rm -rf "$work/configure"
  cmake -S . -B "$work/configure" -DPython_EXECUTABLE="$work/bare/bin/python" \
    -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" "$@" >"$work/configure.log" 2>&1
}
if configure -DFUSEDRNN_CUDA=ON; then
  echo "cuda_build: FUSEDRNN_CUDA=ON configured without cuBLAS" >&2
  exit 1
fi
grep -q "FUSEDRNN_CUDA=ON but the CUDA module cannot be built: no cuBLAS" "$work/configure.log"
configure -DFUSEDRNN_CUDA=AUTO
grep "fusedrnn: CUDA module not built (no cuBLAS" "$work/configure.log"

log "build with FUSEDRNN_CUDA=OFF"
FUSEDRNN_CUDA=OFF python -m pip install -q --no-deps --no-build-isolation \
  --config-settings=build-dir="$work/build-off" . >"$work/build-off.log" 2>&1 ||
  { tail -50 "$work/build-off.log"; exit 1; }
(cd "$work" && python -c "
import fusedrnn
info = fusedrnn.build_info()['cuda']
assert not info['built'], info
print('no CUDA module:', info)
")
echo "cuda_build: passed"
