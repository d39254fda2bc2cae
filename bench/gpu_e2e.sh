#!/usr/bin/env bash
# Issue 15's GPU check, in one run that stops itself before 8 minutes (so a rerun fits in 15 minutes
# of device time): seconds per end_to_end learning step and peak GPU memory on random-weight models,
# bf16 weights and bf16 autocast, 4 x 2048 tokens per step, for the whole-run projection in
# docs/scaling.md:
#   0. tests/test_onload.py on the GPU: a model kept on the CPU learns on the GPU like a GPU-resident one,
#      at a fraction of its weights' memory (one layer onloaded at a time);
#   1. Llama-3.2-1B shapes, layer checkpointing on and off;
#   2. if time is left, Llama-3-8B shapes with checkpointing on.
# Usage: bash bench/gpu_e2e.sh [OUTPUT_DIR]   (default: $OUT if set, else bench/results/gpu-e2e)
set -uo pipefail
out=${1:-${OUT:-bench/results/gpu-e2e}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
budget=${GPU_E2E_BUDGET_S:-450}
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
timeout 90 "$python" -m pytest -q -p no:cacheprovider tests/test_onload.py 2>&1 | tee "$out/onload-tests.log" || status=1
common=(--device cuda --dtype bfloat16 --train-dtype bfloat16 --sequences 4 --seq-len 2048 --steps 3)
timeout $((budget - SECONDS - 150)) "$python" bench/e2e_scaling.py "${common[@]}" --shapes llama-3.2-1b \
    --checkpointing on off --output "$out/e2e-scaling-h200-1b.json" 2>&1 | tee "$out/1b.log" || status=1
left=$((budget - SECONDS))
if ((left > 120)); then
    timeout $((left - 10)) "$python" bench/e2e_scaling.py "${common[@]}" --shapes llama-3-8b --checkpointing on \
        --output "$out/e2e-scaling-h200-8b.json" 2>&1 | tee "$out/8b.log" || status=1
else
    echo "8b: skipped, $left s left" | tee "$out/skipped.txt"
fi
exit $status
