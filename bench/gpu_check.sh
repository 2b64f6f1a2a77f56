#!/usr/bin/env bash
# Everything about the CUDA backend that needs a GPU, in one call of under ten minutes, on a machine with
# no network: Python 3.12, torch (CUDA 13), CuPy, nvcc 13, nvidia-cublas and compute-sanitizer
# installed, one GPU. Steps (each logged with its time; the first failure stops the script):
#   1. build and install fusedrnn as users get it: the CPU package with FUSEDRNN_CUDA=OFF (as its
#      wheels), then the plugin fusedrnn-cuda13's wheel for this GPU's architecture (ptxas's report
#      kept) and that wheel with its dependencies (the machine's nvidia-cublas), all with
#      --no-build-isolation --no-index, so the builds use what is installed; build tools missing there
#      come from bench/wheelhouse, made on a machine with network by bench/gpu_wheels.sh and carried along;
#   2. the GPU tests (tests/test_cuda.py: CuPy and torch CUDA against the CPU path and cuDNN, streams,
#      the persistent kernel), the modules moved to the GPU (tests/test_device_modules.py) and the
#      emulated device tests; then fusedrnn.jax's CUDA handlers (tests/test_jax_cuda.py: against the
#      CPU handlers, the projected LSTM included, and a lax.scan reference, grads, jit, vmap, run-time
#      errors), in a process of their own with JAX's memory preallocation off;
#   3. compute-sanitizer memcheck, racecheck and synccheck on a small case of every kernel
#      (bench/gpu_small_case.py);
#   4. `fusedrnn bench --device cuda`: fusedrnn (auto, per step, per step replayed as CUDA Graphs)
#      against torch.nn on cuDNN with TF32 off and on, default shapes, then larger ones, then LSTMs with
#      a projection (--set projection).
# Logs and the benchmark's JSON go to $OUT (or ./gpu_check_out).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
out="${OUT:-$repo/gpu_check_out}"
mkdir -p "$out"
python="${PYTHON:-python3}"
start=$(date +%s)
log() { printf '\n== [%ss] %s\n' "$(($(date +%s) - start))" "$*" | tee -a "$out/steps.log"; }

log "machine"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
nvcc --version | tail -2
"$python" - <<'EOF' | tee -a "$out/gpu.txt"
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "cupy", "numpy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError:
        print(name, "not installed")
EOF
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.[:space:]')

log "build tools"
# A virtual environment that sees the machine's packages (torch, CuPy, nvidia-cublas), so nothing
# installed there changes; what the build or tests need and the machine lacks comes from the wheelhouse.
venv="$(mktemp -d)/venv"
"$python" -m venv --system-site-packages "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
missing=$(python - <<'EOF'
import importlib.util
wanted = {"scikit_build_core": "scikit-build-core", "pybind11": "pybind11", "scipy_openblas32": "scipy-openblas32",
          "tqdm": "tqdm", "pytest": "pytest", "pytest_timeout": "pytest-timeout", "hypothesis": "hypothesis",
          "cmake": "cmake"}
missing = [pip for module, pip in wanted.items() if importlib.util.find_spec(module) is None]
# The plugin's pyproject.toml needs scikit-build-core 0.12 or later.
if "scikit-build-core" not in missing:
    from importlib.metadata import version
    if tuple(int(part) for part in version("scikit-build-core").split(".")[:2]) < (0, 12):
        missing.append("scikit-build-core>=0.12")
print(" ".join(missing))
EOF
)
if ! command -v cmake >/dev/null && [[ "$missing" != *cmake* ]]; then missing="$missing cmake"; fi
if [[ -n "${missing// }" ]]; then
  echo "not installed here: $missing"
  if [[ ! -d bench/wheelhouse ]]; then
    echo "gpu_check: no bench/wheelhouse to install them from (make it with bench/gpu_wheels.sh)" >&2
    exit 1
  fi
  # shellcheck disable=SC2086
  python -m pip install -q --no-index --find-links bench/wheelhouse $missing
fi

log "the CPU package (FUSEDRNN_CUDA=OFF), then the plugin fusedrnn-cuda13 for sm_$arch"
scratch="$(dirname "$venv")"
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
export CMAKE_BUILD_PARALLEL_LEVEL
FUSEDRNN_CUDA=OFF python -m pip install -v --no-deps --no-build-isolation --no-index \
  --config-settings=build-dir="$scratch/build-cpu" --config-settings=cmake.define.FUSEDRNN_JAX_FFI=ON \
  . >"$out/build_cpu.log" 2>&1 ||
  { tail -40 "$out/build_cpu.log"; echo "gpu_check: the CPU package's build failed" >&2; exit 1; }
FUSEDRNN_CUDA_PTXAS_VERBOSE=ON python -m pip wheel -v --no-deps --no-build-isolation --no-index \
  --wheel-dir "$scratch/dist" --config-settings=build-dir="$scratch/build-plugin" \
  --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" --config-settings=cmake.define.FUSEDRNN_JAX_FFI=ON \
  plugins/cuda13 >"$out/build.log" 2>&1 ||
  { tail -40 "$out/build.log"; echo "gpu_check: the plugin's build failed" >&2; exit 1; }
grep "fusedrnn: CUDA module" "$out/build.log"
grep "fusedrnn: XLA FFI handlers for fusedrnn.jax in _cuda" "$out/build.log"
if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$out/build.log"; then
  echo "gpu_check: a kernel spills registers (above)" >&2
  exit 1
fi
python -m pip install --no-index "$scratch"/dist/fusedrnn_cuda13-*.whl
cd "$out"  # from here on `import fusedrnn` is the installed package, never the source tree
python -c "import fusedrnn; info = fusedrnn.cuda_info(); print(info)
assert info['source'] == 'fusedrnn-cuda13 ' + fusedrnn.__version__ and info['devices'] > 0, info"

log "GPU tests and emulated device tests"
if ! python -m pytest -q -p no:cacheprovider -x --timeout=300 -rs "$repo/tests/test_cuda.py" \
    "$repo/tests/test_device_modules.py" "$repo/tests/test_emulated_device.py" >"$out/tests.log" 2>&1; then
  tail -40 "$out/tests.log"
  echo "gpu_check: tests failed" >&2
  exit 1
fi
tail -8 "$out/tests.log"
if grep -q "SKIPPED.*needs a GPU" "$out/tests.log"; then
  echo "gpu_check: GPU tests were skipped on a GPU machine (see tests.log)" >&2
  exit 1
fi

log "fusedrnn.jax on the GPU"
if ! XLA_PYTHON_CLIENT_PREALLOCATE=false python -m pytest -q -p no:cacheprovider -x --timeout=300 -rs \
    "$repo/tests/test_jax_cuda.py" >"$out/tests_jax.log" 2>&1; then
  tail -40 "$out/tests_jax.log"
  echo "gpu_check: fusedrnn.jax GPU tests failed" >&2
  exit 1
fi
tail -8 "$out/tests_jax.log"
if grep -q "SKIPPED.*needs a jax GPU device" "$out/tests_jax.log"; then
  echo "gpu_check: fusedrnn.jax GPU tests were skipped on a GPU machine (see tests_jax.log)" >&2
  exit 1
fi

log "compute-sanitizer on a small case"
for tool in memcheck racecheck synccheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all \
    python "$repo/bench/gpu_small_case.py" >"$out/sanitizer_$tool.log" 2>&1 ||
    { tail -30 "$out/sanitizer_$tool.log"; echo "gpu_check: compute-sanitizer $tool failed" >&2; exit 1; }
  tail -2 "$out/sanitizer_$tool.log"
done

log "benchmark against cuDNN"
fusedrnn bench --device cuda --peers fusedrnn-cuda fusedrnn-cuda-per-step fusedrnn-cuda-graphs torch-cudnn \
  torch-cudnn-tf32 \
  --rounds 5 --repeats 10 --no-progress --json "$out/bench_cuda.json" | tee "$out/bench_cuda.txt"
# The persistent kernels, forced (inference times the forward's, training both), against the per-step
# path and cuDNN at batch sizes around their threshold (persistent.h, kPersistentMaxBatch).
fusedrnn bench --device cuda --peers fusedrnn-cuda-persistent fusedrnn-cuda-per-step torch-cudnn --cell lstm gru \
  --shape 100,1,256,256 100,4,256,256 100,16,256,256 100,64,256,256 100,4,1024,1024 --rounds 3 --repeats 5 \
  --no-progress --json "$out/bench_cuda_persistent.json" | tee "$out/bench_cuda_persistent.txt"
fusedrnn bench --device cuda --peers fusedrnn-cuda torch-cudnn torch-cudnn-tf32 --cell lstm gru \
  --shape 50,16,512,512 25,64,1024,1024 --rounds 3 --repeats 5 --no-progress \
  --json "$out/bench_cuda_large.json" | tee "$out/bench_cuda_large.txt"
fusedrnn bench --device cuda --set projection --peers fusedrnn-cuda torch-cudnn torch-cudnn-tf32 --rounds 3 \
  --repeats 5 --no-progress --json "$out/bench_cuda_projection.json" | tee "$out/bench_cuda_projection.txt"

log "passed"
