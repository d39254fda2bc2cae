"""``nmperm demo``: the main job on the embedded default (SmolLM2-135M and the shipped Wikipedia text)."""

from __future__ import annotations

import argparse
import copy
import time

from loguru import logger

from ..api import permute_
from ..data.text import load_texts, token_windows
from ..eval.perplexity import perplexity
from ..io.checkpoint import check_output_dir, save_checkpoint
from ..io.models import default_model_path, load_model
from .options import config_from_args, resolve_device


def _table(rows: list[tuple[str, float, float | None]]) -> str:
    width = max(len(name) for name, _, _ in rows) + 2
    lines = [f"{'model':<{width}} {'perplexity':>10} {'seconds':>8}", "-" * (width + 20)]
    for name, ppl, seconds in rows:
        lines.append(f"{name:<{width}} {ppl:>10.2f} {'' if seconds is None else f'{seconds:8.0f}'}")
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    """Dense, 2:4 without permutation and 2:4 with learned permutations (each fold mode) side by side;
    writes the pruned model of the first fold mode (``exact`` by default: a standard checkpoint)."""
    for method, fold in [("identity", "exact")] + [(args.method, fold) for fold in args.folds]:
        config_from_args(args, method=method, fold=fold)  # a bad --pattern, number or regex: before the load
    check_output_dir(args.output, args.overwrite)
    device = resolve_device(args.device)
    start = time.monotonic()
    dense, tokenizer = load_model(default_model_path())
    dense.to(device)
    calibration = token_windows(tokenizer, load_texts("builtin:wiki-calibration"), args.num_samples, args.seq_len, 0)
    evaluation = token_windows(tokenizer, load_texts("builtin:wiki-evaluation"), args.eval_samples, args.seq_len)
    logger.info(f"calibration {tuple(calibration.shape)} tokens, evaluation {tuple(evaluation.shape)} tokens")
    rows = [("dense", perplexity(dense, evaluation, desc="dense perplexity"), None)]
    runs = [("identity", "exact")] + [(args.method, fold) for fold in args.folds]
    for method, fold in runs:
        model = copy.deepcopy(dense)
        t = time.monotonic()
        sidecar, _ = permute_(model, calibration, config_from_args(args, method=method, fold=fold))
        seconds = time.monotonic() - t
        label = f"{args.scorer} {args.pattern}, " + (
            "no permutation" if method == "identity" else f"{sidecar.method} ({fold})"
        )
        rows.append((label, perplexity(model, evaluation, desc=f"{label} perplexity"), seconds))
        if method != "identity" and fold == args.folds[0]:
            sidecar.figures |= {
                "perplexity": rows[-1][1],
                "dense_perplexity": rows[0][1],
                "unpermuted_perplexity": rows[1][1],
            }
            save_checkpoint(model, tokenizer, args.output, sidecar, args.overwrite)
        del model
    print()
    print(_table(rows))
    print(
        f"\ntotal time {time.monotonic() - start:.0f} s; pruned model ({args.folds[0]} fold) written to {args.output}"
    )
    return 0
