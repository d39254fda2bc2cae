"""Hashes of what a run produces on tiny random models, for every objective x fold x method: the
permutations, the weights after folding and masking, and the sidecar's frames.

A refactor that claims "behaviour unchanged" runs this before and after and compares the files:
``python bench/fingerprint.py --output /tmp/before.json`` on the old tree,
``python bench/fingerprint.py --output /tmp/after.json --compare /tmp/before.json`` on the new one.
Only the public API is used (``permute_``, ``PermuteConfig``), so the same script runs on both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from nmperm_plugin import PermuteConfig, permute_

OBJECTIVES = ("retained", "layerwise", "window", "end_to_end", "staged", "auto")
FOLDS = ("exact", "gather")
HEURISTICS = ("identity", "allocation", "ria", "swap")


def tiny_llama(seed: int, tied: bool) -> torch.nn.Module:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def digest(obj) -> str:
    hasher = hashlib.sha256()
    if isinstance(obj, dict):
        for key in sorted(obj):
            hasher.update(key.encode())
            hasher.update(digest(obj[key]).encode())
    elif isinstance(obj, torch.Tensor):
        hasher.update(obj.detach().contiguous().cpu().numpy().tobytes())
    else:
        hasher.update(json.dumps(obj, sort_keys=True).encode())
    return hasher.hexdigest()[:16]


def case(method: str, objective: str | None, fold: str, tied: bool) -> dict:
    model = tiny_llama(0, tied)
    torch.manual_seed(1)
    input_ids = torch.randint(0, 300, (4, 32))
    options = dict(method=method, fold=fold, seed=0, block_size=8)
    if objective is not None:
        learning = dict(steps_per_layer=12, end_to_end_steps=12, select_every=1, select_from=0, lr=0.05)
        options |= dict(objective=objective, **learning)
    sidecar, result = permute_(model, input_ids, PermuteConfig(**options))
    return {
        "permutations": digest(sidecar.permutations),
        "weights": digest(dict(model.state_dict())),
        "frames": digest(sidecar.frames),
        "objective": result.objective,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--compare", help="an earlier output: exit 1 unless every case is identical")
    args = parser.parse_args()
    torch.set_num_threads(1)  # bit-identical across runs on one host
    cases = {}
    for tied in (False, True):
        for fold in FOLDS:
            for objective in OBJECTIVES:
                cases[f"learned/{objective}/{fold}/tied={tied}"] = case("learned", objective, fold, tied)
            for method in HEURISTICS:
                cases[f"{method}/{fold}/tied={tied}"] = case(method, None, fold, tied)
    Path(args.output).write_text(json.dumps({"argv": sys.argv, "cases": cases}, indent=1) + "\n")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())["cases"]
        differ = sorted(name for name in before.keys() | cases.keys() if before.get(name) != cases.get(name))
        print(f"{len(cases)} cases, {len(differ)} differ" + (": " + ", ".join(differ) if differ else ""))
        return 1 if differ else 0
    print(f"{len(cases)} cases written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
