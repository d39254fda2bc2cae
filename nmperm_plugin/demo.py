"""``nmperm demo``: the main job on the embedded default (SmolLM2-135M and the shipped Wikipedia text)."""

from __future__ import annotations

import argparse
import copy
import time

from loguru import logger

from .api import permute_
from .checkpoint import check_output_dir, save_checkpoint
from .data import load_texts, token_windows
from .evaluate import perplexity
from .models import default_model_path, load_model


def _table(rows: list[tuple[str, float, float | None]]) -> str:
    lines = [f"{'model':<44} {'perplexity':>10} {'seconds':>8}", "-" * 64]
    for name, ppl, seconds in rows:
        lines.append(f"{name:<44} {ppl:>10.2f} {'' if seconds is None else f'{seconds:8.0f}'}")
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    from .cli import _config

    check_output_dir(args.output, args.overwrite)
    start = time.monotonic()
    model, tokenizer = load_model(default_model_path())
    calibration = token_windows(tokenizer, load_texts("builtin:wiki-calibration"), args.num_samples, args.seq_len, 0)
    evaluation = token_windows(tokenizer, load_texts("builtin:wiki-evaluation"), args.eval_samples, args.seq_len)
    logger.info(f"calibration {tuple(calibration.shape)} tokens, evaluation {tuple(evaluation.shape)} tokens")
    rows = [("dense", perplexity(model, evaluation, desc="dense perplexity"), None)]

    baseline = copy.deepcopy(model)
    t = time.monotonic()
    permute_(baseline, calibration, _config(argparse.Namespace(**{**vars(args), "method": "identity"})))
    label = f"{args.scorer} {args.pattern}, no permutation"
    rows.append((label, perplexity(baseline, evaluation, desc="unpermuted perplexity"), time.monotonic() - t))
    del baseline

    config = _config(args)
    t = time.monotonic()
    sidecar, _ = permute_(model, calibration, config)
    seconds = time.monotonic() - t
    ppl = perplexity(model, evaluation, desc="pruned perplexity")
    label = f"{args.scorer} {args.pattern}, {sidecar.method} permutation ({args.fold})"
    rows.append((label, ppl, seconds))
    sidecar.figures |= {"perplexity": ppl, "dense_perplexity": rows[0][1], "unpermuted_perplexity": rows[1][1]}
    save_checkpoint(model, tokenizer, args.output, sidecar, args.overwrite)
    print()
    print(_table(rows))
    print(f"\ntotal time {time.monotonic() - start:.0f} s; pruned model written to {args.output}")
    return 0
