#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run (at most 9 minutes):
#   1. tests/test_export.py, GPU tests included (pytest -m "gpu or not gpu");
#   2. bench/serve_speed.py: dense vs 2:4 linears (bf16 cuSPARSELt, CUTLASS on SM 8.x, FP8 on SM 9.x) and the
#      gather-norm cost;
#   3. the whole-model greedy-token check on a SmolLM2-135M-shaped 2:4 checkpoint. Its weights are random
#      (the real model does not fit the device machine's transfer limit); the tied embedding is scaled so
#      greedy decoding has wide logit margins and a kernel difference shows as a changed token.
# Usage: bash bench/gpu_checks.sh OUTPUT_DIR        (results and logs land in OUTPUT_DIR)
set -uo pipefail
out=${1:?usage: bash bench/gpu_checks.sh OUTPUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
status=0

$python - <<'EOF' 2>&1 | tee "$out/environment.txt"
import torch, torchao, transformers
print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cusparselt", torch.backends.cusparselt.is_available())
print("torchao", torchao.__version__, "transformers", transformers.__version__)
EOF

timeout 150 $python -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/test_export.py -rs 2>&1 \
    | tee "$out/pytest-export.txt" || status=1

timeout 270 $python bench/serve_speed.py --repeats 30 --out "$out" 2>&1 | tee "$out/serve_speed.log" || status=1

$python - "$out/smollm2-shaped" <<'EOF' 2>&1 | tee "$out/model_check_build.log" || status=1
import sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from nmperm_plugin.nm import NMPattern, nm_mask
from nmperm_plugin.sidecar import Sidecar

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
timeout 120 $python bench/serve_speed.py --skip-bench --check-model "$out/smollm2-shaped" --out "$out" 2>&1 \
    | tee "$out/model_check.log" || status=1
rm -rf "$out/smollm2-shaped"
exit $status
