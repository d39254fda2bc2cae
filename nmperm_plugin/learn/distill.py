"""``distill_steps``: a short distillation of the kept weights once the masks are applied.

The masks stay fixed (a weight is trained as ``W * keep``, so a pruned weight gets no gradient and
Adam never moves it: the N:M pattern is kept exactly). The loss is end_to_end's without labels: the
KL divergence of the pruned model's next-token distribution from the dense model's, plus ``alpha``
times the distance of every layer's output to the dense one, on the same calibration sequences.
The result is kept only if it ranks better than the weights it started from (``select``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import torch
from loguru import logger
from tqdm.auto import tqdm

from ..runtime import distributed
from .losses import WindowObjective, layer_checkpointing, training_dtype
from .run import Run
from .window import layer_stack


class MaskedWeights(Mapping):
    """``{parameter name: W * keep}`` of trainable ``W``, computed when a layer asks for it."""

    def __init__(self, trainable: dict[str, torch.Tensor], keep: dict[str, torch.Tensor]) -> None:
        self.trainable, self.keep = trainable, keep

    def compute(self, name: str) -> torch.Tensor:
        return self.trainable[name] * self.keep[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.compute(name)

    def __iter__(self):
        return iter(self.trainable)

    def __len__(self) -> int:
        return len(self.trainable)


def check_distillable(run: Run) -> None:
    """Refuse, before any work, a distillation that cannot run."""
    if run.onloading or run.sharded or distributed.world_size() > 1:
        raise ValueError(
            "distill_steps trains every pruned weight at once, so it runs in one process with the model on its "
            "device: not with onloaded layers, shard_weights or several ranks; set distill_steps 0 there"
        )


def dense_targets(run: Run, inputs: torch.Tensor, kwargs: list[dict]) -> list[torch.Tensor]:
    """Every decoder layer's dense output of the calibration sequences, kept on the CPU (the dense
    weights are gone once the masks are applied), for objectives that do not keep them themselves
    (``Run.distill_targets``)."""
    check_distillable(run)
    started = time.monotonic()
    _, outputs = run.dense_pass(inputs, kwargs, [], keep_outputs=True, on=torch.device("cpu"))
    logger.info(f"nmperm: dense targets of the distillation in {time.monotonic() - started:.1f} s")
    return outputs


def distill_(
    run: Run,
    inputs: torch.Tensor,  # [N, T, D]: the first decoder layer's inputs
    kwargs: list[dict],  # every decoder layer's keyword arguments
    targets: list[torch.Tensor],  # every layer's dense output, [N, T, D] each
) -> list[dict]:
    """Train the kept weights of the run's pruned linears for ``distill_steps`` steps (Adam, cosine
    decay from ``distill_lr``) and write them back if they rank better; returns the curve."""
    config, started = run.config, time.monotonic()
    stack = layer_stack(run, kwargs)
    autocast = training_dtype(config.train_dtype, run.device)
    checkpointed = layer_checkpointing(config.layer_checkpointing, run.device)
    names = {f"{name}.weight": run.linears[name].weight for name in run.pruned}
    keep = {name: weight.detach() != 0 for name, weight in names.items()}
    trainable = {name: weight.detach().float().clone().requires_grad_() for name, weight in names.items()}
    weights = MaskedWeights(trainable, keep)
    layers = range(len(run.layers))
    objective = WindowObjective(
        stack, layers, inputs, targets, None, config.alpha, run.sequences_per_step, config.select_sequences,
        run.rng, autocast, checkpointed,
    )  # fmt: skip
    optimizer = torch.optim.Adam(trainable.values(), lr=config.distill_lr)
    before = objective.select(weights)
    history = [{"step": 0, "loss": None, "select": before}]
    for step in tqdm(range(config.distill_steps), desc="distillation", leave=False):
        for group in optimizer.param_groups:
            group["lr"] = config.distill_lr * 0.5 * (1 + math.cos(math.pi * step / config.distill_steps))
        loss = objective.loss(weights, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": float(loss.detach())})
    after = objective.select(weights)
    history[-1]["select"] = after
    kept = after < before
    if kept:
        with torch.no_grad():
            for name, weight in names.items():
                weight.copy_(weights.compute(name).to(weight.dtype))
    logger.info(
        f"nmperm: distillation of the kept weights, {config.distill_steps} steps in {time.monotonic() - started:.1f} "
        f"s: selection KL {before:.4f} -> {after:.4f}, {'kept' if kept else 'not better: the weights before kept'}"
    )
    return history
