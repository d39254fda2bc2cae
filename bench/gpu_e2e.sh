#!/usr/bin/env bash
# Issue 15's GPU check, in one run that stops itself before 8 minutes (so a rerun fits in 15 minutes
# of device time): seconds per end_to_end learning step and peak GPU memory on random-weight models,
# bf16 weights and bf16 autocast, 4 x 2048 tokens per step, for the whole-run projection in
# docs/scaling.md:
#   0. tests/test_onload.py on the GPU: a model kept on the CPU learns on the GPU like a GPU-resident one,
#      at a fraction of its weights' memory (one layer onloaded at a time);
#   1. Llama-3.2-1B shapes, layer checkpointing on and off;
#   2. only with 2 CUDA GPUs or more, and if time is left: layer-sharded learning (shard_weights) under
#      torchrun with NCCL on 2 ranks, against the replicated mode (bench/sharded_learning.py --backend nccl:
#      the 306M-parameter random Llama, onloaded from the CPU, one GPU per rank) -> sharded-learning-nccl2.*;
#      with fewer GPUs (the lent machines have one) it is skipped, saying so;
#   3. if time is left, Llama-3-8B shapes with checkpointing on.
# Usage: bash bench/gpu_e2e.sh [OUTPUT_DIR]   (default: $OUT if set, else bench/results/gpu-e2e)
# Steps skipped (for time, or step 2 for want of a second GPU) are listed, with the reason, in skipped.txt.
set -uo pipefail
out=${1:-${OUT:-bench/results/gpu-e2e}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
budget=${GPU_E2E_BUDGET_S:-450}
status=0
: >"$out/skipped.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
timeout 90 "$python" -m pytest -q -p no:cacheprovider tests/test_onload.py 2>&1 | tee "$out/onload-tests.log" || status=1
common=(--device cuda --dtype bfloat16 --train-dtype bfloat16 --sequences 4 --seq-len 2048 --steps 3)
timeout $((budget - SECONDS - 150)) "$python" bench/e2e_scaling.py "${common[@]}" --shapes llama-3.2-1b \
    --checkpointing on off --output "$out/e2e-scaling-h200-1b.json" 2>&1 | tee "$out/1b.log" || status=1
gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null | tail -n 1)
[[ $gpus =~ ^[0-9]+$ ]] || gpus=0
left=$((budget - SECONDS))
if ((gpus < 2)); then
    echo "sharded-nccl: skipped, it needs 2 GPUs and this machine has $gpus" | tee -a "$out/skipped.txt"
elif ((left < 100)); then
    echo "sharded-nccl: skipped, $left s left of $budget" | tee -a "$out/skipped.txt"
else
    limit=$((left - 10))
    ((limit > 240)) && limit=240
    echo "== sharded-nccl: 2 NCCL ranks on $gpus GPUs (timeout $limit s, $SECONDS s elapsed)"
    timeout "$limit" "$python" bench/sharded_learning.py --backend nccl \
        --output "$out/sharded-learning-nccl2.json" 2>&1 | tee "$out/sharded-nccl.log" || status=1
fi
left=$((budget - SECONDS))
if ((left > 120)); then
    timeout $((left - 10)) "$python" bench/e2e_scaling.py "${common[@]}" --shapes llama-3-8b --checkpointing on \
        --output "$out/e2e-scaling-h200-8b.json" 2>&1 | tee "$out/8b.log" || status=1
else
    echo "8b: skipped, $left s left" | tee -a "$out/skipped.txt"
fi
exit $status
