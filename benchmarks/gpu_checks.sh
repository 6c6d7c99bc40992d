#!/usr/bin/env bash
# Every GPU check of issue 6 in one script, < 10 min on one H100/H200 (run from the repo root):
#   bash benchmarks/gpu_checks.sh [OUT_DIR]
# 1. train step, ViT-B/16 12 x 224, batch 128, bf16 + cuDNN attention, DMAE and meanP: steps/s,
#    clips/s, TFLOP/s, MFU (target >= 40% for DMAE), max batch per device; DMAE with remat.
# 2. train step, ViT-B/32 bf16 + cuDNN (DMAE, meanP), and DMAE float32 (XLA attention).
# (The whole grid of benchmarks/train_step.py without flags takes longer than 10 min: run it apart.)
# 3. evaluation of the MSVD-sized test set, encoding included (target < 10 s), bf16 + cuDNN.
# 4. input pipeline at the training shape with the decoded-frame cache, against the measured step.
# Each part has its own timeout so one slow part cannot eat the others' time; logs go to OUT_DIR.
set -u
OUT=${1:-${OUT:-benchmark-logs}}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
run() {  # run NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "== $name: $*" | tee "$OUT/$name.log"
  timeout "$secs" "$@" 2>&1 | tee -a "$OUT/$name.log" | grep -E "^summary|^\[|Error" || true
}
run train_b16 220 $PY -m benchmarks.train_step --clips ViT-B/16 --heads dmae,meanP \
  --dtypes bfloat16 --remats false --attention_impl cudnn --batch_size 128 --repeats 10 --max_batch
run train_b16_remat 60 $PY -m benchmarks.train_step --clips ViT-B/16 --heads dmae \
  --dtypes bfloat16 --remats true --attention_impl cudnn --batch_size 128 --repeats 5
run train_b32 90 $PY -m benchmarks.train_step --clips ViT-B/32 --heads dmae,meanP \
  --dtypes bfloat16 --remats false --attention_impl cudnn --batch_size 128 --repeats 10
run train_b32_f32 60 $PY -m benchmarks.train_step --clips ViT-B/32 --heads dmae \
  --dtypes float32 --remats false --batch_size 128 --repeats 5
run evaluate 60 $PY -m benchmarks.evaluate --dtype bfloat16 --attention_impl cudnn --batch 64 \
  --repeats 2
STEP=$(grep -hoE "ViT-B/16 dmae bfloat16 [0-9.]+ steps/s" "$OUT/train_b16.log" | head -1 | \
  grep -oE "[0-9.]+ steps/s" | cut -d' ' -f1)
run input_pipeline 80 $PY -m benchmarks.input_pipeline --videos 256 --batches 5 \
  --workers 0,8 ${STEP:+--step_rate $STEP}
grep -h "^summary" "$OUT"/*.log
