#!/usr/bin/env bash
# The GPU checks of issue 18, in one go, for a lent GPU (e.g. an H200): at most 300 s of time limits.
# Run on an H200 on 2026-12-04 (219 s; logs in bench/results/gpu_h200/).
#   1. the Triton policy-loss kernel against the torch path, bf16, on (4,1000,32000) and on
#      (1,70000,256) (70,000 > 65,535 rows: the grid's axis-0 case), forward loss and dlogits
#   2. kernel vs torch (naive and chunked) vs Liger (when liger_kernel imports), bf16, fwd + bwd
#   3. a `small`-preset VLM pretrain step, bf16 autocast + torch.compile, with MFU
#   4. one RL step (GRPO, shared prefix and per row) on the `small` VLM, with MFU
#
#   bash bench/gpu_check.sh            # on a machine with CUDA: everything, each part under a time limit
#   bash bench/gpu_check.sh --cpu      # the CPU-safe parts only, scaled down (what runs without a GPU)
#   PYTHON=python3.11 bash bench/gpu_check.sh
#
# Each part runs under `timeout`; a part that fails or runs out of time is reported and the
# next one still runs; the exit status is the number of failed parts. Output: one log per
# part under $LOG_DIR (default bench/results/gpu_check/) and a summary at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
LOG_DIR=${LOG_DIR:-bench/results/gpu_check}
MODE=gpu
case "${1:-}" in
  --cpu) MODE=cpu ;;
  -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
  "") ;;
  *) echo "unknown flag $1 (see --help)" >&2; exit 2 ;;
esac
if [ "$MODE" = gpu ] && ! $PYTHON -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device here: run 'bash bench/gpu_check.sh --cpu' for the CPU-safe parts" >&2; exit 2
fi
mkdir -p "$LOG_DIR"
FAILED=0
SUMMARY=()

part() {  # part NAME SECONDS CMD... : run with a time limit, keep the log, remember the outcome
  local name=$1 limit=$2; shift 2
  local log="$LOG_DIR/$name.log" t0=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  tail -n 15 "$log"
  if [ "$rc" = 0 ]; then SUMMARY+=("ok      $name ($((SECONDS - t0)) s)")
  elif [ "$rc" = 124 ]; then SUMMARY+=("TIMEOUT $name (${limit} s), see $log"); FAILED=$((FAILED + 1))
  else SUMMARY+=("FAILED  $name (exit $rc), see $log"); FAILED=$((FAILED + 1)); fi
}

$PYTHON -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
if [ "$MODE" = gpu ]; then
  part kernel_check_and_loss_timing 80 $PYTHON bench/bench_loss.py --device cuda
  part pretrain_step_mfu 120 $PYTHON bench/bench_mfu.py --device cuda
  part rl_step_mfu 100 $PYTHON bench/bench_rl_step.py --device cuda --preset small --vocab 32000 --reps 2 --mfu
else
  # the kernel in Triton's interpreter (a small shape: the interpreter runs one program per row in Python)
  part kernel_check_interpreted 120 env TRITON_INTERPRET=1 $PYTHON -m pytest -q tests/test_kernels.py -k "reference or grid or bf16"
  part loss_timing_cpu 120 $PYTHON bench/bench_loss.py --device cpu --shapes 2x128x8192 --iters 1
  part pretrain_step_mfu_cpu 120 $PYTHON bench/bench_mfu.py --device cpu --batch 4 --seq 96
  part rl_step_mfu_cpu 300 $PYTHON bench/bench_rl_step.py --device cpu --prompts 2 --new 16 --reps 1 --mfu
fi
echo "== summary ($MODE)"
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
