"""llm-compressor recipes with and without ``LearnedPermutationModifier``: perplexity and wall time.

On SmolLM2-135M (the embedded GGUF, rebuilt as a plain model and saved to a temporary directory,
because ``oneshot`` needs a saved model) it runs through ``llmcompressor.oneshot``:

- ``wanda``, ``sparsegpt``: the stock pruner at 2:4 (``WandaPruningModifier``, ``SparseGPTModifier``);
- ``wanda-unstructured``, ``sparsegpt-unstructured``: the same pruner at 50% without the N:M
  structure (the far end of the structural gap);
- ``wanda+learned``: recipes/wanda-2of4-learned.yaml (learned permutation and masks, Wanda after);
- ``sparsegpt+learned``: the learned permutation (sparsegpt scores, no masks applied), then stock
  ``SparseGPTModifier`` 2:4 choosing its own masks on the permuted model;
- ``learned+reconstruct``: recipes/sparsegpt-2of4-learned.yaml (learned permutation and masks, the
  kept weights updated by the modifier's reconstruction, no pruner after it);

each from the same dense model and the same ``num_samples x seq_len`` calibration windows of
``--calibration`` (default ``builtin:wiki-calibration``), and measures perplexity on the first
``eval_samples x eval_seq_len`` windows of ``--evaluation`` and the wall time of ``oneshot``.
``--set FIELD=VALUE`` overrides the permutation modifier's fields in every learned variant;
``--quantize RECIPE ...`` quantizes a copy of learned+reconstruct's model with each recipe file's
quantization stage (data-free) and records its perplexity and ``nmperm verify``'s checks.
Results go to ``bench/results/recipes-<model>-<time>.json``.

    python bench/recipes.py                          # SmolLM2-135M, every variant
    python bench/recipes.py --variants sparsegpt learned+reconstruct
    python bench/recipes.py --tiny                   # random tiny Llama: checks the script end to end in seconds
    python bench/recipes.py --from-json s0.json s1.json s2.json --output merged.json   # seeds side by side

Figures (bench/metrics.py, on each variant's median perplexity across seeds): the structural gap
closed by ``X+learned`` against ``X`` and ``X-unstructured`` (``learned+reconstruct`` against
SparseGPT's rows), and every row's penalty ``ln(ppl / ppl_dense)`` as a fraction of SparseGPT 2:4's;
a merged table also lists each seed's share and fraction as extra information. Every file carries
bench/result_files.py's provenance stamp; a merged file keeps each input's.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from loguru import logger
from metrics import (
    GAP_CLOSED_DEFINITION,
    PENALTY_DEFINITION,
    gap_closed_of_medians,
    gap_closed_per_seed,
    median,
    penalty_fraction,
)
from result_files import write_pair

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RECIPES = {
    "wanda+learned": ROOT / "recipes" / "wanda-2of4-learned.yaml",
    "learned+reconstruct": ROOT / "recipes" / "sparsegpt-2of4-learned.yaml",
}
PRUNERS = {"wanda": "WandaPruningModifier", "sparsegpt": "SparseGPTModifier"}
VARIANTS = (
    "wanda",
    "wanda-unstructured",
    "wanda+learned",
    "sparsegpt",
    "sparsegpt-unstructured",
    "sparsegpt+learned",
    "learned+reconstruct",
)
BASES = {"wanda+learned": "wanda", "sparsegpt+learned": "sparsegpt", "learned+reconstruct": "sparsegpt"}
REFERENCE = "sparsegpt"  # the penalty fractions' reference row: what llm-compressor users run for 2:4
UNSTRUCTURED = "-unstructured"  # the recipe's pruner at the same sparsity without the N:M structure (the gap's far end)
MODIFIER = "LearnedPermutationModifier"
QUANTIZED_AFTER = ("learned+reconstruct",)  # the variants whose model --quantize quantizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a random tiny Llama and small windows (smoke test)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--eval-samples", type=int, default=24, help="evaluation windows")
    parser.add_argument("--eval-seq-len", type=int, default=512, help="tokens per evaluation window")
    parser.add_argument("--calibration", default="builtin:wiki-calibration", help="calibration text (nmperm data)")
    parser.add_argument("--evaluation", default="builtin:wiki-evaluation", help="evaluation text (nmperm data)")
    parser.add_argument(
        "--also-evaluate", nargs="*", default=[], metavar="TEXT",
        help="more evaluation texts (the same number of windows), recorded as other_perplexity",
    )  # fmt: skip
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help=f"override {MODIFIER} fields")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quantize", nargs="*", type=Path, default=[], metavar="RECIPE",
        help="recipe files whose quantization stage is applied to learned+reconstruct's model, each in turn",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, help="result file (default bench/results/recipes-*.json)")
    parser.add_argument("--from-json", type=Path, nargs="+", help="merge per-seed result files (no runs)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.num_samples, args.seq_len, args.eval_samples, args.eval_seq_len = 8, 64, 4, 64
    return args


def tiny_model_and_tokenizer(texts: list[str]):
    """A random 2-layer Llama and a 300-token BPE tokenizer trained on the calibration text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        [t[:20000] for t in texts[:20]], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"])
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


def saved_model(directory: Path, tiny: bool, texts: list[str]) -> tuple[Path, object]:
    """Save the benchmark model and its tokenizer to ``directory`` (``oneshot`` loads from there)."""
    from nmperm_plugin.io.models import default_model_path, load_model

    model, tokenizer = tiny_model_and_tokenizer(texts) if tiny else load_model(default_model_path())
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, tokenizer


def pruner_stage(pruner: str, structure: str) -> dict:
    """A stock llm-compressor pruner at 50% with ``structure`` ("2:4", or "0:0": unstructured)."""
    args = {"sparsity": 0.5, "mask_structure": structure, "ignore": ["re:.*lm_head"]}
    return {PRUNERS[pruner]: args}


def shipped_modifier() -> dict:
    """The permutation modifier's fields as recipes/wanda-2of4-learned.yaml ships them."""
    recipe = yaml.safe_load(RECIPES["wanda+learned"].read_text())
    return dict(recipe["sparsity_stage"]["sparsity_modifiers"][MODIFIER])


def recipe_for(variant: str, overrides: dict) -> str:
    """The recipe of ``variant`` as YAML, ``overrides`` applied to its permutation modifier."""
    if variant in RECIPES:
        recipe = yaml.safe_load(RECIPES[variant].read_text())
    elif variant == "sparsegpt+learned":  # the permutation alone; SparseGPT chooses its masks on it
        modifier = shipped_modifier() | {"scorer": "sparsegpt", "apply_mask": False}
        stage = {MODIFIER: modifier} | pruner_stage("sparsegpt", "2:4")
        recipe = {"sparsity_stage": {"sparsity_modifiers": stage}}
    else:
        pruner = variant.removesuffix(UNSTRUCTURED)
        structure = "0:0" if variant.endswith(UNSTRUCTURED) else "2:4"
        recipe = {"sparsity_stage": {"sparsity_modifiers": pruner_stage(pruner, structure)}}
    for stage in recipe.values():
        for group in stage.values():
            if MODIFIER in group:
                args = group[MODIFIER]
                for pair in (("steps", "epochs"), ("epochs", "steps")):  # one replaces the other
                    if pair[0] in overrides:
                        args.pop(pair[1], None)
                args.update(overrides)
    return yaml.safe_dump(recipe, sort_keys=False)


def learned_train_dtype(overrides: dict) -> str:
    """The ``train_dtype`` the permutation modifier is given: ``--set``, else the recipe's, else the default."""
    if "train_dtype" in overrides:
        return str(overrides["train_dtype"])
    return str(shipped_modifier().get("train_dtype", "auto"))


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        field, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set takes FIELD=VALUE, got {pair!r}")
        overrides[field] = yaml.safe_load(value)
    return overrides


def run_variant(
    variant: str, model_dir: Path, calibration, evaluation, args, overrides: dict, other: dict | None = None
) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot

    from nmperm_plugin.core.nm import NMPattern, is_nm
    from nmperm_plugin.eval.perplexity import perplexity
    from nmperm_plugin.llmcompressor.compress import sidecar_of

    dataset = Dataset.from_dict(
        {"input_ids": calibration.tolist(), "attention_mask": torch.ones_like(calibration).tolist()}
    )
    recipe = recipe_for(variant, overrides)
    torch.manual_seed(args.seed)
    start = time.monotonic()
    model = oneshot(
        model=str(model_dir),
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=len(calibration),
        max_seq_length=calibration.shape[1],
        shuffle_calibration_samples=False,
        precision="float32",
    )
    seconds = time.monotonic() - start
    with torch.no_grad():
        value = perplexity(model, evaluation, desc=variant)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    sidecar = sidecar_of(model)
    result = {
        "variant": variant,
        "perplexity": value,
        "oneshot_seconds": round(seconds, 1),
        "linears_2of4": sum(is_nm(m.weight.detach(), NMPattern(2, 4)) for _, m in linears),
        "linears": len(linears),
        "recipe": yaml.safe_load(recipe),
    }
    if sidecar is not None:
        result["permutation_seconds"] = sidecar.figures.get("permutation_seconds")
        result["retained_ratio"] = sidecar.figures.get("retained_ratio")
    logger.info(f"{variant}: perplexity {value:.2f}, oneshot {seconds:.0f} s")
    with torch.no_grad():  # the same model on text of another kind than its calibration (--also-evaluate)
        result["other_perplexity"] = {
            text: perplexity(model, windows, desc=text) for text, windows in (other or {}).items()
        }
    if variant in QUANTIZED_AFTER:
        result["quantized"] = [quantized_row(model, recipe, evaluation) for recipe in args.quantize]
    return result


def quantization_stages(recipe: Path) -> dict:
    """The stages of a shipped recipe file other than its sparsity stage: what it quantizes with."""
    stages = yaml.safe_load(recipe.read_text())
    return {name: stage for name, stage in stages.items() if not name.startswith("sparsity")}


def quantized_row(pruned, recipe: Path, evaluation) -> dict:
    """``pruned`` (a copy) quantized by ``recipe``'s quantization stage (data-free: round to nearest),
    saved compressed and checked by ``nmperm verify``'s checks, with its perplexity."""
    import copy

    from llmcompressor import oneshot

    from nmperm_plugin.eval.perplexity import perplexity
    from nmperm_plugin.io.verify import verify_checkpoint
    from nmperm_plugin.llmcompressor.compress import install_save_hook

    model = copy.deepcopy(pruned)
    model.__dict__.pop("save_pretrained", None)  # the copied wrapper would save the original model
    install_save_hook(model)  # the sidecar of the copy, written beside its checkpoint
    model = oneshot(model=model, recipe=yaml.safe_dump(quantization_stages(recipe)))
    with torch.no_grad():
        value = perplexity(model, evaluation, desc=recipe.stem)
    with tempfile.TemporaryDirectory(prefix="nmperm-quantized-") as out:
        model.save_pretrained(out, save_compressed=True)
        report = verify_checkpoint(out)
    logger.info(f"{recipe.stem}: perplexity {value:.2f}, nmperm verify {'passed' if report.ok else 'FAILED'}")
    return {"scheme": recipe.stem, "perplexity": value, "verified": report.ok, "checks": report.checks}


def seed_of(run: dict) -> int:
    """The calibration seed of a per-seed result file (older files name it only in ``calibration``)."""
    if "seed" in run:
        return int(run["seed"])
    return int(run["calibration"].rsplit("seed ", 1)[1].rstrip(")"))


def merge(paths: list[Path], output: Path) -> int:
    """Per-seed files side by side: each variant's perplexity per seed and median, the gap closed and
    the penalty fraction (bench/metrics.py: on the medians; each seed's listed beside them)."""
    started = time.time()
    runs = [json.loads(p.read_text()) for p in paths]
    per_seed: dict[int, dict[str, dict]] = {}
    dense: dict[int, float] = {}
    for run, path in zip(runs, paths, strict=True):
        rows = per_seed.setdefault(seed_of(run), {})  # a later file's variant replaces an earlier one's
        rows.update({v["variant"]: v | {"file": path.name, "overrides": run["overrides"]} for v in run["variants"]})
        dense[seed_of(run)] = run["dense_perplexity"]
    seeds = sorted(per_seed)
    variants = sorted({v for rows in per_seed.values() for v in rows}, key=lambda v: VARIANTS.index(v))
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"| variant | {head} | median | gap closed | per seed | penalty / {REFERENCE}'s | per seed |"]
    lines.append("|---" * (len(seeds) + 6) + "|")
    lines.append(f"| dense | {' | '.join(f'{dense[s]:.2f}' for s in seeds)} | {median(dense.values()):.2f} | | | | |")
    summary = {"dense": {"perplexities": [dense[s] for s in seeds], "seeds": seeds, "median": median(dense.values())}}

    def ppl(variant: str) -> dict[int, float]:
        return {s: per_seed[s][variant]["perplexity"] for s in seeds if variant in per_seed[s]}

    reference = ppl(REFERENCE)
    for variant in variants:
        values = ppl(variant)
        entry = {"perplexities": list(values.values()), "seeds": list(values), "median": median(values.values())}
        base = BASES.get(variant)
        bound = f"{base}{UNSTRUCTURED}"
        gap = shares = fraction = fractions = ""
        if base and ppl(base) and ppl(bound):
            entry["gap_closed"] = gap_closed_of_medians(ppl(base).values(), values.values(), ppl(bound).values())
            entry["gap_closed_per_seed"] = gap_closed_per_seed(ppl(base), values, ppl(bound))
            gap = f"{entry['gap_closed']:.1%}"
            shares = ", ".join(f"{g:.1%}" for g in entry["gap_closed_per_seed"].values())
        if reference:
            entry["penalty_fraction"] = penalty_fraction(
                entry["median"], median(reference.values()), median(dense[s] for s in values)
            )
            entry["penalty_fraction_per_seed"] = {
                s: penalty_fraction(values[s], reference[s], dense[s]) for s in values if s in reference
            }
            entry["beats_reference_every_seed"] = all(values[s] < reference[s] for s in values if s in reference)
            fraction = f"{entry['penalty_fraction']:.2f}"
            fractions = ", ".join(f"{f:.2f}" for f in entry["penalty_fraction_per_seed"].values())
        summary[variant] = entry
        cells = " | ".join(f"{values[s]:.2f}" if s in values else "" for s in seeds)
        lines.append(f"| {variant} | {cells} | {entry['median']:.2f} | {gap} | {shares} | {fraction} | {fractions} |")
    lines += [
        "",
        f"{GAP_CLOSED_DEFINITION}; for learned+reconstruct, base and unstructured are SparseGPT's. "
        f"{PENALTY_DEFINITION}; the reference row is {REFERENCE} (2:4). Per seed: each seed against its own rows.",
    ]
    result = {"files": [p.name for p in paths], "runs": runs, "summary": summary}
    write_pair(output, result, "\n".join(lines) + "\n", seeds=seeds, started=started, train_dtype=None, inputs=paths)
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = parse_args(argv)
    if args.from_json:
        return merge(args.from_json, args.output or RESULTS / "recipes-merged.json")
    sys.path.insert(0, str(ROOT))
    from transformers import AutoModelForCausalLM

    import nmperm_plugin  # noqa: F401 - registers LearnedPermutationModifier
    from nmperm_plugin.data.text import load_texts, token_windows
    from nmperm_plugin.eval.perplexity import perplexity

    overrides = parse_overrides(args.set)
    calibration_texts = load_texts(args.calibration)
    results = {
        "model": "tiny-random-llama" if args.tiny else "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
        "seed": args.seed,
        "calibration": f"{args.num_samples} x {args.seq_len} tokens of {args.calibration} (seed {args.seed})",
        "evaluation": f"first {args.eval_samples} x {args.eval_seq_len} tokens of {args.evaluation}",
        "overrides": overrides,
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "variants": [],
    }
    with tempfile.TemporaryDirectory(prefix="nmperm-bench-") as work:
        model_dir, tokenizer = saved_model(Path(work) / "model", args.tiny, calibration_texts)
        calibration = token_windows(tokenizer, calibration_texts, args.num_samples, args.seq_len, seed=args.seed)
        evaluation = token_windows(tokenizer, load_texts(args.evaluation), args.eval_samples, args.eval_seq_len)
        with torch.no_grad():
            dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            results["dense_perplexity"] = perplexity(dense, evaluation)
            other = {
                text: token_windows(tokenizer, load_texts(text), args.eval_samples, args.eval_seq_len)
                for text in args.also_evaluate
            }
            results["dense_other_perplexity"] = {text: perplexity(dense, w) for text, w in other.items()}
        for variant in args.variants:
            results["variants"].append(run_variant(variant, model_dir, calibration, evaluation, args, overrides, other))
    slug = "tiny" if args.tiny else "smollm2-135m"
    path = args.output or RESULTS / f"recipes-{slug}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    lines = [
        f"{results['model']}; calibration {results['calibration']}; evaluation {results['evaluation']}; "
        f"overrides {overrides}; dense perplexity {results['dense_perplexity']:.2f}",
        "",
        "| variant | perplexity | oneshot (s) | learning (s) | 2:4 linears |",
        "|---|---|---|---|---|",
    ]
    for row in results["variants"]:
        learning = row.get("permutation_seconds")
        lines.append(
            f"| {row['variant']} | {row['perplexity']:.2f} | {row['oneshot_seconds']:.1f} | "
            f"{'' if learning is None else f'{learning:.0f}'} | {row['linears_2of4']}/{row['linears']} |"
        )
    path, _ = write_pair(
        path,
        results,
        "\n".join(lines) + "\n",
        seeds=[args.seed],
        started=started,
        train_dtype=learned_train_dtype(overrides),
    )
    print("\n".join(lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
