#!/usr/bin/env bash
# On a machine with network: fetch into bench/wheelhouse the wheels bench/gpu_check.sh installs when
# the GPU machine (no network, Python 3.12, x86-64) lacks them: the build tools and test tools. The
# directory is not committed (.gitignore); carry it to the GPU machine beside the sources.
set -euo pipefail
cd "$(dirname "$0")"
python="${PYTHON:-python3}"
# The OpenBLAS the package ships is the build requirement's exact pin (pyproject.toml).
openblas=$(grep -o '"scipy-openblas32==[^"]*"' ../pyproject.toml | tr -d '"')
"$python" -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --implementation cp -d wheelhouse \
  "scikit-build-core>=0.12" "pybind11>=2.13" "$openblas" "tqdm>=4.60" "pytest>=7" \
  "pytest-timeout>=2.1" "hypothesis>=6.0" cmake
du -sh wheelhouse
