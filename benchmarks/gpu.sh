#!/usr/bin/env bash
# Run the benchmark suite on CUDA, in bf16 and in fp32, adding absolute throughput (tokens/s in each
# row's "extra"; peak memory from torch.cuda). Results: benchmarks/results/<name>-cuda-<dtype>.json.
#
#   benchmarks/gpu.sh                 # full suite
#   benchmarks/gpu.sh --quick         # extra arguments go to run.py (e.g. --cases 3 4 5)
#
# Environment: PYTHON (default .venv/bin/python), NAME (default: the host name).
# FAISS stays on the CPU (faiss-cpu); case 8 measures the CPU index either way.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NAME=${NAME:-$(hostname)}
"$PY" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu.sh: torch sees no CUDA device (torch %s)" % torch.__version__)
print("CUDA device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
status=0
for dtype in bf16 fp32; do
  # One CPU thread drives the GPU; the thread count only affects host-side work.
  "$PY" benchmarks/run.py --device cuda --dtype "$dtype" --threads 1 \
    --name "$NAME-cuda-$dtype" "$@" || status=$?
done
exit $status
