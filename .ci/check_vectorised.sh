#!/usr/bin/env bash
# The pointwise loops of the recurrence (the loops of csrc/fusedrnn/cpu/kernels_isa.cpp marked
# FUSEDRNN_INDEPENDENT_ITERATIONS: the gates, the LSTM output pass, the backward's gate gradients) must be
# vectorised at full width at every SIMD level the build compiles, in every float instantiation (double
# keeps libm's scalar exp and tanh by design). Nothing else notices when they are not: results stay
# right and only those loops get several times slower.
# The kernels are compiled with the build's own commands (CMake's compile database, so every flag
# follows CMakeLists.txt) plus GCC's vectoriser report, and the report is read per function. GCC only.
# A fresh virtual environment holds the build requirements (the check's time: bench/NOTES.md, "CI's
# time, stage by stage").
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
python="${PYTHON:-python3}"
cxx="${CXX:-g++}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if ! "$cxx" --version | grep -q "Free Software Foundation"; then
  echo "check_vectorised: $cxx is not GCC; this check reads GCC's vectoriser report" >&2
  exit 1
fi

# The build requirements pyproject.toml names (jaxlib left out: the kernels do not include its headers).
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -c 'import tomllib' 2>/dev/null || "$work/venv/bin/python" -m pip install -qq tomli
mapfile -t reqs < <("$work/venv/bin/python" .ci/requirements.py --build --without jaxlib)
"$work/venv/bin/python" -m pip install -qq cmake ninja "${reqs[@]}"

"$work/venv/bin/cmake" -S "$repo" -B "$work/build" -G Ninja -DCMAKE_EXPORT_COMPILE_COMMANDS=ON \
  -DCMAKE_CXX_COMPILER="$(command -v "$cxx")" -DPython_EXECUTABLE="$work/venv/bin/python" \
  -DFUSEDRNN_JAX_FFI=OFF -DFUSEDRNN_CUDA=OFF \
  -Dpybind11_DIR="$("$work/venv/bin/python" -m pybind11 --cmakedir)" >"$work/configure.log" 2>&1 ||
  { tail -30 "$work/configure.log"; echo "check_vectorised: cmake could not configure" >&2; exit 1; }

"$work/venv/bin/python" - "$work" <<'EOF'
import json
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

work = Path(sys.argv[1])
source = Path("csrc/fusedrnn/cpu/kernels_isa.cpp").resolve()
lines = source.read_text().splitlines()
# The loop statement follows its marker (the #define lines themselves are not markers).
loops = [number + 1 for number, text in enumerate(lines, start=1)
         if text.strip() == "FUSEDRNN_INDEPENDENT_ITERATIONS"]
if not loops:
    sys.exit("check_vectorised: no FUSEDRNN_INDEPENDENT_ITERATIONS loop in kernels_isa.cpp")

commands = [entry for entry in json.loads((work / "build" / "compile_commands.json").read_text())
            if Path(entry["file"]).resolve() == source]
if not commands:
    sys.exit("check_vectorised: kernels_isa.cpp is not in the compile database")


def report(entry):
    """(level, vector bytes, GCC's vectoriser report) for one SIMD level's compile command."""
    args = shlex.split(entry["command"])
    defines = dict(a[2:].split("=", 1) for a in args if a.startswith("-D") and "=" in a)
    level, width = defines["FUSEDRNN_ISA_NAME"].strip('"\\'), int(defines["FUSEDRNN_VECTOR_BYTES"])
    dump = work / f"{level}.vect"
    out = args.index("-o")
    args[out + 1] = str(work / f"{level}.o")
    subprocess.run(args + [f"-fdump-tree-vect-details={dump}"], cwd=entry["directory"], check=True)
    return level, width, dump.read_text()


failures = []
with ThreadPoolExecutor(2) as pool:
    for level, width, text in pool.map(report, commands):
        vectorised = set()
        functions = 0
        for section in re.split(r"^;; Function ", text, flags=re.M)[1:]:
            name = section.split(" (", 1)[0]
            if not re.search(r"[<, ]float[,>]", name):
                continue
            for loop in loops:
                at = rf"kernels_isa\.cpp:{loop}:\d+: "
                if not re.search(at, section):
                    continue  # not instantiated (or inlined) here
                functions += 1
                if re.search(at + "missed: couldn't vectorize loop", section) or not re.search(
                        at + f"optimized: loop vectorized using {width} byte vectors", section):
                    failures.append(f"{level}: the loop at kernels_isa.cpp:{loop} is not vectorised with "
                                    f"{width}-byte vectors in {name}")
                else:
                    vectorised.add(loop)
        missing = sorted(set(loops) - vectorised)
        if missing:
            failures.append(f"{level}: no float function vectorises the loops at kernels_isa.cpp:{missing}")
        print(f"check_vectorised: {level}: {len(vectorised)} of {len(loops)} pointwise loops vectorised with "
              f"{width}-byte vectors ({functions} loop instances in float functions)")
if failures:
    print("\n".join(failures), file=sys.stderr)
    sys.exit(1)
EOF
