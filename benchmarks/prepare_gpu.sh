#!/usr/bin/env bash
# Prepare the device call of benchmarks/gpu.py, on this (CPU) machine: the wheels the device lacks in .whl/
# (PyAV, kornia, kornia_rs, at the versions of this checkout's .venv, for the device's CPython 3.12) and the
# generated videos in .gpu_data/ (the device has no encoder). Both are gitignored and travel with `carry`.
#     benchmarks/prepare_gpu.sh            (PYTHON=... to use another interpreter than .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
version() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }
wheels=("av==$(version av)" "kornia==$(version kornia)" "kornia_rs==$(version kornia_rs)")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${wheels[@]}"
if [ "$(ls .whl/*.whl | wc -l)" -ne "${#wheels[@]}" ]; then
    echo "prepare_gpu.sh: .whl/ holds other wheels than ${wheels[*]}: two versions of one stop the install there" >&2
    ls .whl >&2
    exit 1
fi
"$PY" -m benchmarks.gpu --prepare .gpu_data
du -sh .whl .gpu_data
echo "to carry: .whl .gpu_data ($(du -sm .whl .gpu_data | awk '{s += $1} END {print s}') MiB of the 64 MiB a device call takes)"
