"""Perplexity of a causal language model on token windows."""

from __future__ import annotations

import math

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
