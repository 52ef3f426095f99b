#!/usr/bin/env bash
# The GPU checks of the project on one H100, about 7 minutes in all (each step has its own time limit):
#   (1) the CUDA tests (python -m pytest -m cuda -q; skipped where there is no GPU),
#   (2) benchmarks/ensemble_cnn.py --device cuda: resnet18 and airbench at K = 1, 8, 32 against the
#       one-model loop, bf16 on/off, channels_last on/off, torch.compile on/off (one at a time, from the
#       engine's CUDA default of bf16), on CIFAR-100-shaped files,
#   (3) the projected GPU-hours of the 2,000-model CIFAR-100 plan (ResNet-18, 50 epochs, 25,000 training
#       images per model at ratio 0.5, 60,000 images predicted per model), from the best models/hour of (2).
# Output goes to stdout and, when $OUT is set, to $OUT/gpu_report.txt. Run from anywhere:
#   benchmarks/gpu.sh            # on the GPU machine
#   benchmarks/gpu.sh --smoke    # tiny sizes on the CPU (--device cpu, torch.compile with the aot_eager
#                                # backend: no code generation), about 2 minutes: the script end to end
# PYTHON overrides the interpreter (default: .venv/bin/python if present, else python3).
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2

SMOKE=0
case "${1:-}" in
  --smoke) SMOKE=1 ;;
  "") ;;
  *) echo "usage: benchmarks/gpu.sh [--smoke]" >&2; exit 2 ;;
esac
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT

# step NAME LIMIT_SECONDS COMMAND...: runs the command under `timeout`, its output also kept in $LOGS/NAME.
step() {
  local name=$1 limit=$2 started=$SECONDS rc
  shift 2
  echo
  if [ "$limit" = 0 ]; then
    echo "== $name: skipped in smoke mode (its airbench twin checks the compiled path)"
    return
  fi
  echo "== $name (limit ${limit} s): $*"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | grep -v -E '^(USDT:|ERROR:.*gpuGetDeviceCount)' | tee "$LOGS/$name"
  rc=${PIPESTATUS[0]}
  case $rc in
    124|137) echo "== $name: stopped at its limit of ${limit} s" ;;
    *) echo "== $name: exit status $rc after $((SECONDS - started)) s" ;;
  esac
}

main() {
  # 1280 training images: each model's 640 are 20 full batches of 32, so compiled code sees one batch shape.
  local device=cuda n_train=1280 n_test=500 sizes="1 8 32" compile_size=8 alone="2 2" backend=inductor
  local widths="--resnet_width 64 --airbench_width 1.0" limits="60 130 70 70 90"
  if [ "$SMOKE" = 1 ]; then  # resnet width 8: at 4 and 6, oneDNN crashes on the channels_last rows at K=1 (CPU)
    device=cpu n_train=128 n_test=40 sizes="1 2" compile_size=2 alone="1 1" backend=aot_eager
    widths="--resnet_width 8 --airbench_width 0.125" limits="120 90 60 120 0"  # 0: skipped
  fi
  local l_tests l_resnet l_airbench l_compile_airbench l_compile_resnet
  read -r l_tests l_resnet l_airbench l_compile_airbench l_compile_resnet <<< "$limits"
  echo "benchmarks/gpu.sh$([ "$SMOKE" = 1 ] && echo " --smoke"): $(date -u '+%Y-%m-%d %H:%M UTC'), $(hostname)," \
       "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  "$PYTHON" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA",
                torch.cuda.is_available() and torch.cuda.get_device_name(0) or "not available")'
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if [ "$SMOKE" = 0 ] && ! "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    echo "no CUDA device here: run benchmarks/gpu.sh --smoke on a CPU machine"
    return 2
  fi
  local plan=(--classes 100 --n_train "$n_train" --n_test "$n_test" --alone_models $alone --repeats 1
              --plan_models 2000 --plan_epochs 50 --plan_images 25000 --plan_eval_images 60000)
  # shellcheck disable=SC2086  # $sizes and $widths are lists of words
  {
    step "1-cuda-tests" "$l_tests" "$PYTHON" -m pytest -m cuda -q
    step "2-resnet18" "$l_resnet" "$PYTHON" benchmarks/ensemble_cnn.py --device "$device" --backbones resnet18 \
      $widths --sizes $sizes --variant_sizes $sizes --variants fp32 bf16 bf16+channels_last "${plan[@]}"
    step "2-airbench" "$l_airbench" "$PYTHON" benchmarks/ensemble_cnn.py --device "$device" --backbones airbench \
      $widths --sizes $sizes --variant_sizes $sizes --variants fp32 bf16 bf16+channels_last "${plan[@]}"
    step "2-compile-airbench" "$l_compile_airbench" "$PYTHON" benchmarks/ensemble_cnn.py --device "$device" \
      --backbones airbench $widths --sizes "$compile_size" --variants bf16+compile --compile_backend "$backend" \
      "${plan[@]}"
    step "2-compile-resnet18" "$l_compile_resnet" "$PYTHON" benchmarks/ensemble_cnn.py --device "$device" \
      --backbones resnet18 $widths --sizes "$compile_size" --variants bf16+compile --compile_backend "$backend" \
      "${plan[@]}"
  }
  echo
  echo "== 3: projected $([ "$device" = cuda ] && echo GPU-)hours of the 2,000-model CIFAR-100 plan" \
       "(ResNet-18, 50 epochs, 25,000 training images per model, 60,000 predicted), at the best measured rate"
  { cat "$LOGS/2-resnet18" "$LOGS/2-compile-resnet18" 2>/dev/null || true; } | grep -E '^  resnet18: ' \
    || echo "  no projection: the resnet18 steps did not finish (see above)"
  [ "$SMOKE" = 1 ] && echo "  (smoke mode: tiny widths on the CPU, so these hours say nothing about the plan)"
  echo
  echo "benchmarks/gpu.sh: done after $SECONDS s"
}

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  main 2>&1 | tee "$OUT/gpu_report.txt"
else
  main 2>&1
fi
