"""The supported families on tiny random configs: fold error, N:M, verify, prune time.

For every family (the tiny random models of tests/conftest.py, float32, 2 layers, hidden 64):

- the largest relative logit difference (``nmperm_plugin.core.ops.function_error``) after folding random
  permutations of every site, exact and gather (tolerance 1e-5 in the tests);
- ``permute_`` with the default ``PermuteConfig`` (the learned method and its default objective) and
  with the RIA heuristic, exact and gather (where the family has it): whether every pruned linear is 2:4
  (gather: after ``apply_gather``), and whether the saved checkpoint passes ``nmperm verify``;
- the prune time of each learned run (``permute_``, seconds on this host).

Random weights say nothing about quality: this checks the plumbing of each adapter, end to end.

Run: ``python bench/architectures.py`` (about two minutes on 1 thread); writes
``bench/results/architectures-random-configs.{json,md}``. ``--families F ...`` runs a subset (with
``--output`` elsewhere, so as not to overwrite the full table). timm's ViT (``timm_vit``) is a family
only where timm imports, in its own environment (README, "timm tests"):
``python bench/architectures.py --families timm_vit --output bench/results/architectures-timm-vit-random-config``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny random models live with the tests

from conftest import FAMILIES, family_model, tiny_model  # noqa: E402
from test_fold import random_perms  # noqa: E402
from test_qwen_vl import FAMILIES as VL_FAMILIES  # noqa: E402
from test_qwen_vl import image_batch, packed, vl_model  # noqa: E402
from test_vision import VISION, vision_model  # noqa: E402

try:  # timm's ViT: only in an environment where timm imports (README, "timm tests")
    from test_timm_vit import timm_vit  # noqa: E402

    TIMM = ("timm_vit",)
except BaseException:  # noqa: BLE001 - the test module skips itself (pytest's Skipped) without timm
    TIMM = ()

from result_files import write_pair  # noqa: E402

from nmperm_plugin import PermuteConfig, permute_  # noqa: E402
from nmperm_plugin.core.nm import NMPattern, is_nm  # noqa: E402
from nmperm_plugin.core.ops import function_error  # noqa: E402
from nmperm_plugin.io.checkpoint import finish_sidecar  # noqa: E402
from nmperm_plugin.io.sidecar import Sidecar  # noqa: E402
from nmperm_plugin.io.verify import verify_checkpoint, verify_checksums, verify_model  # noqa: E402
from nmperm_plugin.learn.fold import apply_gather, fold_permutations_  # noqa: E402
from nmperm_plugin.learn.parts import permute_parts_  # noqa: E402
from nmperm_plugin.plugins.registry import get_adapter  # noqa: E402

TOWER_AND_TEXT = {f"{family} (tower + text)": family for family in VL_FAMILIES}  # permute_parts_, both parts
NAMES = ("llama (reference)", *FAMILIES, *VISION, *VL_FAMILIES, *TOWER_AND_TEXT, *TIMM)


def build(family: str):
    if family in TIMM:
        return timm_vit()
    if family in VISION:
        return vision_model(family)
    if family in VL_FAMILIES or family in TOWER_AND_TEXT:
        return vl_model(TOWER_AND_TEXT.get(family, family))
    return tiny_model("llama", 2) if family == "llama (reference)" else family_model(family)


def calibration_of(family: str, ids: torch.Tensor) -> torch.Tensor | list[dict]:
    """Token ids, or for a vision family as many random 16x16 images in batches of 4 (no labels); for
    a vision-language family as many 16-token prompts with one 16x16 image each, in batches of 4."""
    if family in VL_FAMILIES or family in TOWER_AND_TEXT:
        return [image_batch(4, seed) for seed in range(1, len(ids) // 4 + 1)]
    if family not in VISION and family not in TIMM:
        return ids
    images = torch.randn(len(ids), 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return [{"pixel_values": batch} for batch in images.split(4)]


def outputs(model, data) -> torch.Tensor:
    """What folding must keep (the adapter's ``outputs``: logits, CLIP's features) on all of ``data``."""
    if isinstance(data, list) and "image_grid_thw" in data[0]:  # vision-language: each batch packed
        return torch.cat([get_adapter(model).outputs(model(**packed(batch), use_cache=False)) for batch in data])
    adapter = get_adapter(model)
    inputs = {"input_ids": data} if isinstance(data, torch.Tensor) else adapter.model_inputs({"pixel_values": torch.cat(
        [batch["pixel_values"] for batch in data])})  # fmt: skip
    return adapter.outputs(model(**inputs))


def fold_exact_randomly_(model, tower_too: bool) -> None:
    """Fold random permutations of every exact site (``tower_too``: the vision tower's as well)."""
    parts = [model] + ([model.model.visual] if tower_too else [])
    for seed, part in enumerate(parts):
        adapter = get_adapter(part)
        sites = adapter.sites(part, "exact")
        fold_permutations_(part, sites, random_perms(sites, torch.Generator().manual_seed(seed)), adapter)


@torch.no_grad()
def fold_errors(model, ids, tower_too: bool = False) -> dict:
    """Relative logit difference after folding random permutations of every site (None: mode refused);
    ``tower_too``: a vision-language model's tower sites as well (gather: its ``serving_sites``)."""
    adapter, reference = get_adapter(model), outputs(model, ids)
    errors = {}
    folded = copy.deepcopy(model)
    fold_exact_randomly_(folded, tower_too)
    errors["exact"] = function_error(reference, outputs(folded, ids))
    try:
        sites = (adapter.serving_sites if tower_too else adapter.sites)(model, "gather")
    except ValueError as error:
        errors["gather"], errors["gather_refused"] = None, str(error)
        return errors
    perms = random_perms(sites, torch.Generator().manual_seed(1))
    frames = {name: site.name for site in sites for name in site.linears}
    sidecar = Sidecar("2:4", "wanda", "-", "gather", adapter.name, {k: v.tolist() for k, v in perms.items()}, frames)
    errors["gather"] = function_error(reference, outputs(apply_gather(copy.deepcopy(model), sidecar), ids))
    return errors


def prune(family: str, ids, method: str, fold: str) -> dict:
    """One ``permute_`` run (both parts: ``permute_parts_``): time, fold error, N:M of every pruned
    linear, ``nmperm verify``."""
    model = build(family)
    config = PermuteConfig(method=method, fold=fold)
    start = time.perf_counter()
    if family in TOWER_AND_TEXT:
        sidecar, _ = permute_parts_(model, ids, config, parts=("vision", "text"))
    else:
        sidecar, _ = permute_(model, ids, config)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as directory:
        report = saved_and_verified(model, sidecar, Path(directory))
    if fold == "gather":
        apply_gather(model, sidecar)
    pattern = NMPattern(2, 4)
    with get_adapter(model).linear_form(model):  # GPT-2's Conv1D, fused experts: [out, in] views
        nm = [is_nm(getattr(m, "linear", m).weight, pattern) for m in map(model.get_submodule, sidecar.frames)]
    failed = [c["check"] for c in report.checks if not c["ok"]]
    return {
        "seconds": round(seconds, 2),
        "fold_error": sidecar.verification["fold_relative_logit_error"],
        "linears": len(nm),
        "nm_linears": sum(nm),
        "verify": "passed" if report.ok else f"FAILED: {', '.join(failed)}",
    }


def saved_and_verified(model, sidecar: Sidecar, directory: Path):
    """Save ``model`` with its sidecar to ``directory`` and run ``nmperm verify``'s checks. A timm model
    has no ``save_pretrained``: its weights go to a safetensors file and the checks run on the model
    in memory (as ``tests/test_timm_vit.py`` does)."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory)
        finish_sidecar(directory, sidecar, verify=False)
        return verify_checkpoint(directory)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    finish_sidecar(directory, sidecar, verify=False)
    return verify_checksums(directory, sidecar, verify_model(model, sidecar))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "architectures-random-configs"))
    parser.add_argument("--families", nargs="+", choices=NAMES, default=NAMES, help="a subset (default: all)")
    args = parser.parse_args()
    started = time.time()
    torch.set_num_threads(1)  # many tiny matmuls: one thread is fastest on the 2-core host
    ids = torch.randint(0, 300, (args.sequences, args.seq_len), generator=torch.Generator().manual_seed(1))
    rows, start, default = [], time.perf_counter(), PermuteConfig()
    for family in args.families:
        model = build(family)
        row = {"family": family, "adapter": get_adapter(model).name, "model": type(model).__name__}
        row["fold_error"] = fold_errors(model, calibration_of(family, ids), family in TOWER_AND_TEXT)
        row["runs"] = {}
        for fold in ("exact", "gather"):
            if fold == "gather" and row["fold_error"]["gather"] is None:
                continue
            for method in ("learned", "ria"):
                row["runs"][f"{method}/{fold}"] = prune(family, calibration_of(family, ids), method, fold)
        rows.append(row)
        print(family, json.dumps(row["fold_error"]), {k: v["verify"] for k, v in row["runs"].items()}, flush=True)
    result = {
        "what": "tiny random configs (tests/conftest.py, tests/test_vision.py), float32, 2 layers, hidden 64; "
        f"{args.sequences} x {args.seq_len} random calibration tokens (vision: {args.sequences} random 16x16 "
        "images, no labels; vision-language: 16-token prompts with one 16x16 image each); "
        "learned = the default PermuteConfig "
        f"(objective {default.objective}, {default.total_steps} steps with fold exact, block {default.block_size}), "
        "ria = the heuristic alone",
        "host": f"{platform.machine()}, {torch.get_num_threads()} thread, torch {torch.__version__}",
        "seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    json_path, md_path = write_pair(args.output, result, markdown(result), seeds=[default.seed], started=started)
    print(f"wrote {json_path} and {md_path.name} in {result['seconds']} s")


def markdown(result: dict) -> str:
    lines = [
        "# Supported families on tiny random configs",
        "",
        f"{result['what']}. Host: {result['host']}; {result['seconds']} s in all. Written by `bench/architectures.py`.",
        "",
        "Fold error: the largest logit difference relative to the logits' scale after folding random "
        "permutations of every site (the tests allow 1e-5). N:M: pruned linears that are 2:4 (gather: after "
        "`apply_gather`), learned and RIA runs, exact and gather. Prune time: `permute_` with the learned method. "
        "Gemma 2 has a 16-token sliding window (shorter than the sequences), Gemma 3 a sliding and a global layer. "
        "Mixture-of-experts: 4 experts (top 2) per layer, each expert's down projection a site of its own "
        "(Qwen2-MoE: plus a shared expert, and a dense second layer); GPT-2: Conv1D weights read as [out, in]. "
        "Qwen-VL: 2 vision blocks and 2 text layers; plain rows prune the text decoder (`permute_`), "
        "'(tower + text)' rows the vision tower too (`permute_parts_`, both parts; fold errors with the "
        "tower's sites folded as well).",
        "",
        "| family | adapter | fold error exact | fold error gather | 2:4 linears | nmperm verify | prune time exact | "
        "prune time gather |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        errors, runs = row["fold_error"], row["runs"]
        gather = "refused (post-norm)" if errors["gather"] is None else f"{errors['gather']:.1e}"
        nm = f"{sum(r['nm_linears'] for r in runs.values())} / {sum(r['linears'] for r in runs.values())}"
        verdicts = {r["verify"] for r in runs.values()}
        verify = f"passed ({len(runs)} of {len(runs)})" if verdicts == {"passed"} else "; ".join(sorted(verdicts))
        times = [f"{runs[k]['seconds']:.2f} s" if k in runs else "-" for k in ("learned/exact", "learned/gather")]
        lines.append(
            f"| {row['family']} | {row['adapter']} | {errors['exact']:.1e} | {gather} | {nm} | {verify} | "
            f"{times[0]} | {times[1]} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
