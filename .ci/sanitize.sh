#!/usr/bin/env bash
# Sanitizer builds of the extension, each in its own virtual environment and build tree under a temporary
# directory (never the repository's build/):
#   1. AddressSanitizer + UndefinedBehaviorSanitizer: the test suite, every SIMD level the build compiles;
#      torch's two test files only with SANITIZE_TORCH=1 (see below).
#   2. ThreadSanitizer: the thread team's stress tests, test_concurrency.py and test_threads.py.
# Any sanitizer report or failing test fails the script; the last line sums up both parts.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

cxx="${CXX:-g++}"
python="${PYTHON:-python3}"
with_torch="${SANITIZE_TORCH:-0}"
work="$(mktemp -d)"
# A build still running in the background is waited for, not left writing into a removed directory.
trap 'wait; rm -rf "$work"' EXIT
mkdir -p "$work/logs"

log() { printf '\n== %s\n' "$*"; }
seconds_since() { echo $(($(date +%s) - $1)); }

# ---- toolchain --------------------------------------------------------------------------------------
# GCC's sanitizer runtimes. The interpreter is not instrumented, so the runtime is preloaded into every
# Python process (child interpreters inherit LD_PRELOAD). -print-file-name prints the bare name when a
# library is missing; Debian's libgcc-N-dev brings the runtimes of GCC N.
runtime() { "$cxx" -print-file-name="$1"; }
if ! command -v "$cxx" >/dev/null; then
  apt-get update -qq && apt-get install -y -qq g++ >/dev/null
fi
for lib in libasan.so libubsan.so libtsan.so; do
  if [[ ! -f "$(runtime "$lib")" ]]; then
    apt-get update -qq
    apt-get install -y -qq "libgcc-$("$cxx" -dumpversion | cut -d. -f1)-dev" >/dev/null
    break
  fi
done
libasan="$(runtime libasan.so)"
libtsan="$(runtime libtsan.so)"
libstdcxx="$(runtime libstdc++.so.6)"
if [[ ! -f "$libasan" || ! -f "$libtsan" || ! -f "$(runtime libubsan.so)" || ! -f "$libstdcxx" ]]; then
  echo "sanitize: $cxx has no ASan, UBSan or TSan runtime" >&2
  exit 1
fi

# ---- environments -------------------------------------------------------------------------------------
# The build requirements, the runtime dependencies and the test extra as pyproject.toml names them
# (.ci/requirements.py), torch only where asked for. Nor jax: its jaxlib is not built with the
# sanitizers, and the build's exact jaxlib (for the FFI headers) and the test extra's would clash in one
# install. Without it fusedrnn builds without the XLA FFI handlers and the test_jax files skip
# themselves. cmake and ninja come from PyPI because the build runs without isolation.
make_venv() {  # name with-torch
  local venv="$work/venv-$1" reqs
  "$python" -m venv "$venv"
  "$venv/bin/python" -c 'import tomllib' 2>/dev/null || "$venv/bin/python" -m pip install -qq tomli
  local without=jax,jaxlib,flax,optax
  [[ "$2" == 1 ]] || without+=,torch
  mapfile -t reqs < <("$venv/bin/python" .ci/requirements.py --build --runtime --test --without "$without")
  # -qq: errors only; pip's warnings about this machine's package indexes say nothing about the project.
  "$venv/bin/python" -m pip install -qq cmake ninja "${reqs[@]}"
}

# Builds and installs the package into venv-NAME with the given compiler flags, the compiler's output in
# build-NAME.log. RelWithDebInfo with -g1 keeps the symbols and line tables the reports need (no local
# variables: a quarter less compile time than -g); the targets' own -O3 still applies, so the code
# checked is the code that ships.
build() {  # name flags
  "$work/venv-$1/bin/python" -m pip install -v --no-build-isolation \
    -C cmake.build-type=RelWithDebInfo \
    -C "cmake.define.CMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -g1 -DNDEBUG" \
    -C "build-dir=$work/build-$1" \
    -C "cmake.define.CMAKE_CXX_COMPILER=$(command -v "$cxx")" \
    -C "cmake.define.CMAKE_CXX_FLAGS=$2" \
    "$repo" >"$work/build-$1.log" 2>&1
}

build_failed() {  # name
  tail -n 80 "$work/build-$1.log"
  echo "sanitize: the $1 build failed" >&2
  exit 1
}

# "passed failed" from pytest's JUnit XML (failed counts errors too); "0 1" when pytest died before
# writing it (a sanitizer halting the pytest process itself).
counts() {  # xml
  "$python" - "$1" <<'EOF'
import sys
import xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print(0, 1)
    raise SystemExit
suites = [root] if root.tag == "testsuite" else list(root)
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print(n["tests"] - n["failures"] - n["errors"] - n["skipped"], n["failures"] + n["errors"])
EOF
}

# Sanitizer reports: a log file per process that reported (ASan and TSan write to log_path, so reports
# from child interpreters, whose stderr the tests capture, are kept whole), plus the distinct UBSan
# diagnostics in the output (UBSan beside ASan writes to stderr whatever log_path says).
reports() {  # log-prefix pytest-output
  local files=0 ubsan f
  for f in "$work/logs/$1".*; do
    [[ -e "$f" ]] || continue
    files=$((files + 1))
    printf '\n---- %s\n' "$f" >&2
    cat "$f" >&2
  done
  ubsan=$(grep -oE '[[:alnum:]_./-]+:[0-9]+:[0-9]+: runtime error: [a-z ]+' "$2" | sort -u | wc -l || true)
  echo $((files + ubsan))
}

status=0
start=$(date +%s)
log "virtual environments"
make_venv asan "$with_torch" &
asan_venv=$!
make_venv tsan 0 &
tsan_venv=$!
wait "$asan_venv"
wait "$tsan_venv"
echo "ready in $(seconds_since "$start") s"

# ---- 1. AddressSanitizer + UndefinedBehaviorSanitizer -------------------------------------------------
log "AddressSanitizer + UndefinedBehaviorSanitizer: build"
part=$(date +%s)
build asan "-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer" || build_failed asan
echo "built in $(seconds_since "$part") s"

# detect_leaks=0: CPython, numpy and the other extension modules leave much allocated at exit on purpose
# (interned strings, static types, module state, caches): thousands of leak reports that are not ours.
# Use-after-free, overflows and the rest are still reported. PYTHONMALLOC=malloc sends the interpreter's
# own objects through malloc, so ASan guards them too instead of pymalloc's arenas hiding them.
# libstdc++ is preloaded right after ASan: the interpreter does not link it, and ASan looks up the real
# __cxa_throw when it starts; without it, the first C++ exception thrown in any extension module (one of
# matplotlib's, for one) stops the process with an ASan CHECK failure.
asan_env=(
  LD_PRELOAD="$libasan:$libstdcxx"
  ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:log_path=$work/logs/asan"
  UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:print_summary=1"
  PYTHONMALLOC=malloc
  PYTHONDONTWRITEBYTECODE=1
)

# Every SIMD level the build compiles that this CPU can run must run under the sanitizers: the simd_level
# fixture runs its tests (test_reference.py, parts of test_errors.py and test_threads.py) once per level
# the core reports as supported. That report is checked against the CPU's flags as the kernel lists them,
# so a level wrongly refused fails here rather than going unchecked; a compiled level this CPU lacks
# (AVX-512 on many hosts) cannot run here and is named.
read -r compiled supported < <(env "${asan_env[@]}" "$work/venv-asan/bin/python" -c '
import fusedrnn
info = fusedrnn.build_info()
print(",".join(info["simd_compiled"]), ",".join(info["simd_supported"]))') || true
runnable=$("$python" - "${compiled:-}" <<'EOF'
import sys
flags = set()
with open("/proc/cpuinfo") as f:
    for line in f:
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            break
# The features each level's kernels are compiled for (x86-64-v3, x86-64-v4), as kernels.cpp tests them.
needs = {"avx2": {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"}}
needs["avx512"] = needs["avx2"] | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
print(",".join(level for level in sys.argv[1].split(",") if level and needs.get(level, set()) <= flags))
EOF
)
echo "SIMD levels compiled: $compiled; supported by this CPU: $supported"
if [[ -z "${compiled:-}" || "$supported" != "$runnable" ]]; then
  echo "sanitize: the core reports SIMD levels '${supported:-}' as supported; the CPU's flags allow '$runnable'" >&2
  exit 1
fi
if [[ "$compiled" != "$supported" ]]; then
  echo "compiled but not run (this CPU lacks them): $(comm -23 <(tr , '\n' <<<"$compiled" | sort) \
    <(tr , '\n' <<<"$supported" | sort) | paste -sd, -)"
fi

# OPENBLAS_NUM_THREADS=1: numpy's own OpenBLAS (the tests' float64 reference, not the BLAS fusedrnn
# calls) hands work to its thread pool through its own spin flags, which TSan cannot see in uninstrumented
# code, so its memsets on memory the main thread allocated read as races. One thread means no pool to
# misreport; fusedrnn's BLAS runs single-threaded inside the team's jobs either way.
# die_after_fork=0: test_fork_while_another_thread_computes forks while the team's threads run and the
# child starts a fresh team; TSan otherwise kills any child that starts threads after a multi-threaded
# fork. TSan does not vouch for such a child, so a report from one needs checking against that.
# FUSEDRNN_TEST_SIMD_LEVELS: the SIMD-parametrized tests on this CPU's best level alone (the ASan run
# below takes every level). What the ranks share (rows and units of h, c, y and the gate gradients) is
# split the same on every level; a level changes only the sizes of each rank's own tiles and panels.
# suppressions: one report of glibc's own, explained in .ci/tsan.supp.
tsan_env=(
  LD_PRELOAD="$libtsan"
  FUSEDRNN_TEST_SIMD_LEVELS="${supported##*,}"
  TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:die_after_fork=0:log_path=$work/logs/tsan:suppressions=$repo/.ci/tsan.supp"
  OPENBLAS_NUM_THREADS=1
  PYTHONDONTWRITEBYTECODE=1
)

# The ThreadSanitizer build, then its tests (test_concurrency.py and test_threads.py), run beside the
# ASan tests, which mostly keep one core busy; their output is shown once the ASan tests end.
tsan_start=$(date +%s)
(
  build tsan "-fsanitize=thread -fno-omit-frame-pointer" || { echo build >"$work/tsan.failed"; exit 1; }
  date +%s >"$work/build-tsan.end"
  tsan_rc=0
  env "${tsan_env[@]}" "$work/venv-tsan/bin/python" -m pytest -p no:cacheprovider -q --capture=sys \
    --junitxml="$work/tsan.xml" tests/test_concurrency.py tests/test_threads.py >"$work/tsan.out" 2>&1 \
    || tsan_rc=$?
  date +%s >"$work/tests-tsan.end"
  exit "$tsan_rc"
) &
tsan_job=$!

# torch's own test files (test_torch_parity.py, test_torch_dropin.py: ~1,560 tests) run only with
# SANITIZE_TORCH=1: they pass under ASan, but add about a minute of tests and the 190 MB wheel's install
# to a script that has ~10 minutes in all. Without torch, the tests elsewhere that compare with it skip
# themselves; the kernels' SIMD levels are still covered by test_reference.py.
torch_files=()
[[ "$with_torch" == 1 ]] || torch_files=(--ignore=tests/test_torch_parity.py --ignore=tests/test_torch_dropin.py)
# Also left to the main job: the command line's files (the calls they make run in the other files) and
# the longest stress case, resizing the team while layers run: test_concurrent_callers_while_the_team_is_resized
# takes the same path here, and TSan runs the case itself.
asan_skips=(--ignore=tests/test_cli.py --ignore=tests/test_bench_cli.py
            --deselect=tests/test_concurrency.py::test_resizing_while_a_layer_runs_gives_the_planned_answer)
log "AddressSanitizer + UndefinedBehaviorSanitizer: tests"
part=$(date +%s)
asan_rc=0
env "${asan_env[@]}" "$work/venv-asan/bin/python" -m pytest -p no:cacheprovider -q --capture=sys \
  --junitxml="$work/asan.xml" "${torch_files[@]}" "${asan_skips[@]}" 2>&1 | tee "$work/asan.out" || asan_rc=$?
asan_seconds=$(seconds_since "$part")
read -r asan_passed asan_failed < <(counts "$work/asan.xml") || true
asan_reports=$(reports asan "$work/asan.out")
echo "asan+ubsan: $asan_passed passed, $asan_failed failed, $asan_reports sanitizer reports, tests $asan_seconds s"
[[ $asan_rc -eq 0 && $asan_reports -eq 0 ]] || status=1

# ---- 2. ThreadSanitizer ---------------------------------------------------------------------------------
log "ThreadSanitizer: build, then tests (beside the ASan tests)"
tsan_rc=0
wait "$tsan_job" || tsan_rc=$?
[[ -e "$work/tsan.failed" ]] && build_failed tsan
echo "built in $(($(cat "$work/build-tsan.end") - tsan_start)) s"
cat "$work/tsan.out"
tsan_seconds=$(($(cat "$work/tests-tsan.end") - $(cat "$work/build-tsan.end")))
read -r tsan_passed tsan_failed < <(counts "$work/tsan.xml") || true
tsan_reports=$(reports tsan "$work/tsan.out")
echo "tsan: $tsan_passed passed, $tsan_failed failed, $tsan_reports sanitizer reports, tests $tsan_seconds s"
[[ $tsan_rc -eq 0 && $tsan_reports -eq 0 ]] || status=1

echo "total $(seconds_since "$start") s"
echo "sanitizers: asan+ubsan $asan_passed passed, tsan $tsan_passed passed, $((asan_reports + tsan_reports)) reports"
exit $status
