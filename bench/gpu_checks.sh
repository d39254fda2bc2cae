#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run that stops itself before 8 minutes (so a rerun fits in 15):
#   1. tests/test_export.py and tests/test_compat.py with the GPU tests (pytest -m "gpu or not gpu"): sparsify_
#      bf16/FP8, CusparseltLinear (alg_id tuning, graph replay), serve() on a tiny Llama (cuda_graph and compile);
#   2. bench/serve_speed.py on the Llama-3.2-1B shapes: whole-model prefill/decode for dense bf16, 2:4 bf16,
#      FP8 dense, FP8 2:4 with CUDA graphs, then the per-linear table;
#   3. if time is left, the whole-model table on the Llama-3-8B shapes (no per-linear table);
#   4. if time is left, the whole-model greedy-token check on a SmolLM2-135M-shaped 2:4 checkpoint (random
#      weights: the real model does not fit the device machine's transfer limit; the tied embedding is scaled
#      so greedy decoding has wide logit margins and a kernel difference shows as a changed token).
# Usage: bash bench/gpu_checks.sh [OUTPUT_DIR]    (default: $OUT if set, else bench/results/gpu-checks)
# Exit status: 0 when every step that ran passed, 1 otherwise. Steps skipped for time are listed in skipped.txt.
set -uo pipefail
out=${1:-${OUT:-bench/results/gpu-checks}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
budget=${GPU_CHECKS_BUDGET_S:-460}  # seconds for the whole script
status=0
: >"$out/skipped.txt"

left() { echo $((budget - SECONDS)); }
# step NAME MAX_SECONDS MIN_SECONDS COMMAND...: run COMMAND with a timeout of min(MAX, time left), or skip it
step() {
    local name=$1 max=$2 min=$3
    shift 3
    local limit
    limit=$(left)
    ((limit > max)) && limit=$max
    if ((limit < min)); then
        echo "$name: skipped, $(left) s left of $budget" | tee -a "$out/skipped.txt"
        return 0
    fi
    echo "== $name (timeout $limit s, $SECONDS s elapsed)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    ((rc != 0)) && { echo "$name: exit $rc" | tee -a "$out/failed.txt"; status=1; }
    return 0
}

$python - <<'EOF' 2>&1 | tee "$out/environment.txt"
import torch, torchao, transformers
print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cusparselt", torch.backends.cusparselt.is_available(),
      torch.backends.cusparselt.version(), "max alg id", torch.backends.cusparselt.get_max_alg_id())
print("torchao", torchao.__version__, "transformers", transformers.__version__)
EOF

step pytest 150 60 $python -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/test_export.py \
    tests/test_compat.py -rs
step serve-1b 170 90 $python bench/serve_speed.py --models llama-3.2-1b --out "$out"
step serve-8b 150 90 $python bench/serve_speed.py --models llama-3-8b --no-linear --out "$out"

if (($(left) >= 60)); then
    $python - "$out/smollm2-shaped" <<'EOF' 2>&1 | tee "$out/model_check_build.log" || status=1
import sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from nmperm_plugin.core.nm import NMPattern, nm_mask
from nmperm_plugin.io.sidecar import Sidecar

torch.manual_seed(0)
config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
model = LlamaForCausalLM(config).eval()
names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
with torch.no_grad():
    model.model.embed_tokens.weight.mul_(20.0)
    for n in names:
        w = model.get_submodule(n).weight
        w.mul_(nm_mask(w.abs(), NMPattern(2, 4)))
model.save_pretrained(sys.argv[1])
Sidecar(pattern="2:4", scorer="magnitude", method="identity", fold="exact", architecture="llama",
        permutations={}, frames={n: None for n in names}).save(sys.argv[1])
print("wrote", sys.argv[1], len(names), "pruned linears")
EOF
    step model-check 90 40 $python bench/serve_speed.py --skip-bench --check-model "$out/smollm2-shaped" --out "$out"
    rm -rf "$out/smollm2-shaped"
else
    echo "model-check: skipped, $(left) s left of $budget" | tee -a "$out/skipped.txt"
fi
echo "gpu_checks: done in $SECONDS s, status $status"
exit $status
