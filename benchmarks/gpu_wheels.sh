#!/usr/bin/env bash
# Download, on a machine with network, the wheels that benchmarks/gpu_check.sh installs on a GPU
# machine that has none: the project's dependencies missing from that machine's CUDA image
# (its torch, transformers, lightning, peft, torchmetrics and sentence-transformers are used).
#
#   benchmarks/gpu_wheels.sh            # into .whl/ (git-ignored), about 30 MB; carry it: carry=[".whl"]
#
# Environment: PY_VERSION (default 3.12, the image's python3), PYTHON (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
"$PY" -m pip download -q --dest .whl --no-deps --only-binary=:all: \
  --python-version "${PY_VERSION:-3.12}" --implementation cp --platform manylinux2014_x86_64 \
  --platform manylinux_2_28_x86_64 \
  "faiss-cpu==1.15.1" "omegaconf==2.4.0" "nevergrad==1.0.12" "cma==4.5.0" \
  "bayesian-optimization==1.4.0" directsearch
ls -la .whl
du -sh .whl
