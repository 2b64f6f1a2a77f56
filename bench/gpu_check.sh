#!/usr/bin/env bash
# Everything about the CUDA backend that needs a GPU, in one call of under ten minutes, on a machine with
# no network: Python 3.12, torch (CUDA 13), CuPy, JAX with CUDA, nvcc 13, nvidia-cublas and
# compute-sanitizer installed, one GPU. `bench/gpu_check.sh [CHECK...]` builds and installs fusedrnn,
# then runs the checks named (default: all, in the order below: correctness first, then the figures,
# the CPU thread curve last). The build is the only step whose failure stops the script; the build and
# each check run under a time limit, never past GPU_CHECK_SECONDS (default 420) from the start; each
# check's outcome is written to steps.log as it ends, and the script ends with what passed, failed or
# was not reached, exiting non-zero unless all passed. GPU_CHECK_INSTALLED=1 skips the build, for a
# second call on the same machine.
#   build: fusedrnn's wheels as users get them, both with --no-build-isolation --no-index so the builds
#      use what is installed: the CPU package with FUSEDRNN_CUDA=OFF, then the plugin fusedrnn-cuda13
#      for this GPU's architecture (ptxas's report kept, register spills fail the build); both installed
#      (the plugin's dependency nvidia-cublas is the machine's). Build and test tools the machine lacks
#      come from bench/wheelhouse, made on a machine with network by bench/gpu_wheels.sh, carried along;
#   tests: the GPU tests (tests/test_cuda.py: CuPy and torch CUDA against the CPU path and cuDNN,
#      streams, the persistent kernel), the modules moved to the GPU (tests/test_device_modules.py) and
#      the emulated device tests;
#   bench: `fusedrnn bench --device cuda`: fusedrnn (auto, per step, per step replayed as CUDA Graphs)
#      against torch.nn on cuDNN with TF32 off and on, default shapes;
#   jax: fusedrnn.jax's CUDA handlers (tests/test_jax_cuda.py: against the CPU handlers, the projected
#      LSTM included, and a lax.scan reference, grads, jit, vmap, run-time errors), in a process of
#      their own with JAX's memory preallocation off;
#   persistent: the persistent kernels forced, against the per-step path and cuDNN, at batch sizes
#      around their threshold, and B=16, H=768 (a forward step against FlashRNN's published figure);
#   threads: the CPU kernels on 1, 2, 4, 8 and 16 threads (up to the machine's cores) against torch.nn
#      on as many, the GPU idle;
#   large, projection: larger shapes, then LSTMs with a projection (--set projection), against cuDNN;
#   memcheck, racecheck, synccheck: compute-sanitizer's tools on a small case of every kernel
#      (bench/gpu_small_case.py); "not run" where the machine's GPU is not one compute-sanitizer supports
#      (a sandboxed GPU answers "Device not supported");
#   per_sample: per-sample gradients through fusedrnn.jax on the GPU (jit(vmap(grad)), the samples
#      folded into one layer call) against a call a sample, jit over lax.scan and one batched step
#      (bench/bench_jax.py's per-sample section, two of its rows).
# $OUT (or ./gpu_check_out) gets three files, so that a run cut short still brings back what it did:
# steps.log (every step and check's outcome as it ends), gpu.txt (the machine) and results.tgz (the
# logs and the benchmarks' JSON and text, packed again after each check). The files packed, and the two
# wheels, are written in GPU_CHECK_FILES (default: a new temporary directory).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
report="${OUT:-$repo/gpu_check_out}"
mkdir -p "$report"
report="$(cd "$report" && pwd)"
out="${GPU_CHECK_FILES:-$(mktemp -d)}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
python="${PYTHON:-python3}"
start=$(date +%s)
deadline=$((start + ${GPU_CHECK_SECONDS:-420}))
log() { printf '\n== [%ss] %s\n' "$(($(date +%s) - start))" "$*" | tee -a "$report/steps.log"; }
pack() { tar czf "$report/results.tgz" -C "$out" --exclude='*.whl' . 2>/dev/null || true; }
export repo out python
export PYTHONFAULTHANDLER=1  # a crash shows where in Python it happened

log "machine"
# nvcc and compute-sanitizer live beside the toolkit, which not every image puts on PATH.
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm --format=csv | tee "$report/gpu.txt"
nvcc --version | tail -2
{ lscpu | grep -E "Model name|^CPU\(s\)" || true; } | tee -a "$report/gpu.txt"
"$python" - <<'EOF' | tee -a "$report/gpu.txt"
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "cupy", "numpy", "jax", "jaxlib", "scikit_build_core", "pybind11"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError:
        print(name, "not installed")
EOF
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.[:space:]')

checks=("$@")
((${#checks[@]})) || checks=(tests memcheck racecheck bench jax persistent synccheck per_sample large projection
  threads)

if [[ "${GPU_CHECK_INSTALLED:-0}" != 1 ]]; then
  log "build tools"
  # The machine's own Python, not a virtual environment: the image's python3 is itself a virtual
  # environment, and one made from it would not see its packages (torch, CuPy, JAX, nvidia-cublas). The
  # machine is discarded after the run, so what is installed here changes nothing that lasts.
  missing=$("$python" - <<'EOF'
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
    "$python" -m pip install -q --no-index --find-links bench/wheelhouse $missing
  fi

  log "the CPU package's wheel (FUSEDRNN_CUDA=OFF), then the plugin fusedrnn-cuda13's for sm_$arch"
  scratch="$(mktemp -d)"
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
  export CMAKE_BUILD_PARALLEL_LEVEL
  # A build that hangs must not take the whole lease: each stops at the deadline, less a minute.
  build_limit() { local left=$((deadline - $(date +%s) - 60)); echo $((left > 30 ? left : 30)); }
  FUSEDRNN_CUDA=OFF timeout -k 5 "$(build_limit)" "$python" -m pip wheel -v --no-deps --no-build-isolation --no-index --wheel-dir "$scratch/dist" \
    --config-settings=build-dir="$scratch/build-cpu" --config-settings=cmake.define.FUSEDRNN_JAX_FFI=ON \
    . >"$out/build_cpu.log" 2>&1 ||
    { tail -40 "$out/build_cpu.log"; pack; echo "gpu_check: the CPU package's build failed" >&2; exit 1; }
  FUSEDRNN_CUDA_PTXAS_VERBOSE=ON timeout -k 5 "$(build_limit)" "$python" -m pip wheel -v --no-deps --no-build-isolation --no-index \
    --wheel-dir "$scratch/dist" --config-settings=build-dir="$scratch/build-plugin" \
    --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" --config-settings=cmake.define.FUSEDRNN_JAX_FFI=ON \
    plugins/cuda13 >"$out/build.log" 2>&1 ||
    { tail -40 "$out/build.log"; pack; echo "gpu_check: the plugin's build failed" >&2; exit 1; }
  grep "fusedrnn: CUDA module" "$out/build.log"
  grep "fusedrnn: XLA FFI handlers for fusedrnn.jax in _cuda" "$out/build.log"
  if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$out/build.log"; then
    echo "gpu_check: a kernel spills registers (above)" >&2
    pack
    exit 1
  fi
  "$python" -m pip install -q --no-index --no-deps --force-reinstall "$scratch"/dist/fusedrnn-*.whl
  "$python" -m pip install -q --no-index "$scratch"/dist/fusedrnn_cuda13-*.whl
  cp "$scratch"/dist/*.whl "$out"/
  pack
fi
cd "$out"  # from here on `import fusedrnn` is the installed package, never the source tree
# What each module exports (its init function and a few template instances, nothing of a static
# libstdc++) and which shared libraries it needs.
for so in $("$python" -c "import fusedrnn._core as a, fusedrnn_cuda13._cuda as b; print(a.__file__, b.__file__)"); do
  echo "$(basename "$so"): $(nm -D --defined-only "$so" | wc -l) symbols exported; needs" \
    "$(readelf -d "$so" | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
done || true
"$python" -c "import fusedrnn; info = fusedrnn.cuda_info(); print(info)
assert info['source'] == 'fusedrnn-cuda13 ' + fusedrnn.__version__ and info['devices'] > 0, info"

# check NAME SECONDS FUNCTION: runs FUNCTION (below) in a shell of its own for at most SECONDS, fewer
# when the deadline is nearer, and goes on whatever its outcome; skips it when under 20 s are left. A
# FUNCTION that exits 77 could not run on this machine (not a failure of the code).
passed=() failed=() not_run=()
check() {
  local name=$1 cap=$2 fn=$3 left status
  left=$((deadline - $(date +%s)))
  if ((left < 20)); then
    log "$name: not run (${left}s left)"
    not_run+=("$name")
    return
  fi
  ((cap > left)) && cap=$left
  log "$name (at most ${cap}s)"
  status=0
  timeout -k 5 "$cap" bash -c "set -euo pipefail; $(declare -f "$fn"); $fn" || status=$?
  if ((status == 0)); then
    passed+=("$name")
    log "$name: passed"
  elif ((status == 77)); then
    not_run+=("$name (cannot run on this machine)")
    log "$name: not run (cannot run on this machine)"
  else
    failed+=("$name (exit $status)")
    log "$name: FAILED (exit $status)"
  fi
  pack
}

# A pytest run whose log is kept; the tail is shown, and a run that skipped a GPU test fails.
run_pytest() {
  local name=$1 skip_pattern=$2 status=0
  shift 2
  "$python" -m pytest -q -p no:cacheprovider --timeout=120 -rs "$@" >"$out/$name.log" 2>&1 || status=$?
  tail -15 "$out/$name.log"
  if grep -q "$skip_pattern" "$out/$name.log"; then
    echo "gpu_check: GPU tests were skipped on a GPU machine (see $name.log)" >&2
    return 1
  fi
  return "$status"
}
check_tests() {
  run_pytest tests "SKIPPED.*needs a GPU" "$repo/tests/test_cuda.py" "$repo/tests/test_device_modules.py" \
    "$repo/tests/test_emulated_device.py"
}
check_jax() {
  XLA_PYTHON_CLIENT_PREALLOCATE=false run_pytest tests_jax "SKIPPED.*needs a jax GPU device" \
    "$repo/tests/test_jax_cuda.py"
}
sanitize() {
  local tool=$1
  compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all \
    "$python" "$repo/bench/gpu_small_case.py" >"$out/sanitizer_$tool.log" 2>&1 ||
    {
      tail -30 "$out/sanitizer_$tool.log"
      if grep -q "Device not supported" "$out/sanitizer_$tool.log"; then return 77; fi
      return 1
    }
  tail -2 "$out/sanitizer_$tool.log"
}
check_memcheck() { sanitize memcheck; }
check_racecheck() { sanitize racecheck; }
check_synccheck() { sanitize synccheck; }
bench() {
  local name=$1
  shift
  "$python" -m fusedrnn bench --no-progress --json "$out/$name.json" "$@" | tee "$out/$name.txt"
}
check_bench() {
  bench bench_cuda --device cuda --peers fusedrnn-cuda fusedrnn-cuda-per-step fusedrnn-cuda-graphs torch-cudnn torch-cudnn-tf32 \
    --rounds 5 --repeats 10
}
# The persistent kernels forced (inference times the forward's, training both) at batch sizes around
# their threshold (persistent.h, kPersistentMaxBatch and kPersistentMaxHidden), and B=16, H=768.
check_persistent() {
  bench bench_cuda_persistent --device cuda --peers fusedrnn-cuda-persistent fusedrnn-cuda-per-step fusedrnn-cuda torch-cudnn \
    --cell lstm gru --shape 100,1,256,256 100,4,256,256 100,16,256,256 100,64,256,256 100,4,1024,1024 \
    256,16,768,768 --rounds 3 --repeats 5
}
check_large() {
  bench bench_cuda_large --device cuda --peers fusedrnn-cuda torch-cudnn torch-cudnn-tf32 --cell lstm gru \
    --shape 50,16,512,512 25,64,1024,1024 200,32,1024,1024 --rounds 3 --repeats 5
}
check_projection() {
  bench bench_cuda_projection --device cuda --set projection --peers fusedrnn-cuda torch-cudnn torch-cudnn-tf32 --rounds 3 \
    --repeats 5
}
# The CPU kernels' thread curve: fusedrnn's team and torch's intra-op pool of the same size, after the
# split the layers' recurrence takes at each size (ranks, rows or units).
check_threads() {
  local n
  "$python" - <<'EOF' | tee "$out/threads_splits.txt"
import numpy as np
import fusedrnn
from fusedrnn import _core
print("L2", fusedrnn.build_info()["l2_cache_bytes"], "bytes")
for n in (1, 2, 4, 8, 16):
    fusedrnn.set_num_threads(n)
    print(n, "threads:", *(f"{cell} B={b} H={h} {_core.layer_split(cell, b, h, np.float32)}"
                           for cell in ("lstm", "gru") for b, h in ((32, 256), (64, 512))))
EOF
  for n in 1 2 4 8 16; do
    ((n <= $(nproc))) || break
    bench "bench_threads_$n" --device cpu --peers fusedrnn torch --threads "$n" --cell lstm gru \
      --shape 100,32,256,256 50,64,512,512 --rounds 3 --repeats 5
  done
}
check_per_sample() {
  XLA_PYTHON_CLIENT_PREALLOCATE=false "$python" - <<'EOF' | tee "$out/per_sample_jax.txt"
import json, os, sys
sys.path.insert(0, os.path.join(os.environ["repo"], "bench"))
import jax
import bench_jax
print("jax's default device:", jax.devices()[0])
bench_jax.PER_SAMPLE_CASES = [case for case in bench_jax.PER_SAMPLE_CASES if case[1:] == (50, 32, 1, 128)]
with open(os.path.join(os.environ["out"], "per_sample_jax.json"), "w") as f:
    json.dump(bench_jax.per_sample_gradients(3, 3), f, indent=1)
EOF
}
export -f run_pytest sanitize bench

declare -A titles=(
  [tests]="GPU tests and emulated device tests" [bench]="benchmark against cuDNN, default shapes"
  [jax]="fusedrnn.jax on the GPU" [memcheck]="compute-sanitizer memcheck"
  [persistent]="the persistent kernels against cuDNN" [threads]="CPU threads against torch.nn"
  [racecheck]="compute-sanitizer racecheck" [synccheck]="compute-sanitizer synccheck"
  [large]="larger shapes against cuDNN" [projection]="LSTMs with a projection against cuDNN"
  [per_sample]="per-sample gradients through fusedrnn.jax on the GPU")
declare -A limits=([tests]=200 [bench]=120 [jax]=90 [memcheck]=90 [persistent]=90 [threads]=240 [racecheck]=90
  [synccheck]=60 [large]=60 [projection]=60 [per_sample]=90)
for name in "${checks[@]}"; do
  [[ -n "${titles[$name]:-}" ]] || { echo "gpu_check: no check named $name" >&2; exit 2; }
  check "$name: ${titles[$name]}" "${limits[$name]}" "check_$name"
done

log "summary"
{
  for name in "${passed[@]}"; do echo "passed: $name"; done
  for name in "${failed[@]}"; do echo "FAILED: $name"; done
  for name in "${not_run[@]}"; do echo "not run: $name"; done
} | tee -a "$report/steps.log"
pack
((${#failed[@]} == 0 && ${#not_run[@]} == 0))
