"""``window`` and ``end_to_end``: the end-to-end loss (the model's loss plus distillation of hidden
states) on a moving window of decoder layers, or on all of them at once."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from loguru import logger
from tqdm.auto import tqdm

from ..io.checks import dense_targets_shortfall
from .learner import EffectiveWeights, learn
from .losses import (
    LayerStack,
    RecomputedTargets,
    WindowObjective,
    layer_checkpointing,
    training_dtype,
)
from .run import Run, run_layer
from .sequential import ObjectiveStrategy

if TYPE_CHECKING:
    from ..config import PermuteConfig


class Window(ObjectiveStrategy):
    """end_to_end's loss on a moving window of ``window_layers`` consecutive decoder layers
    (:class:`~nmperm_plugin.learn.losses.WindowObjective`): the window's inputs come from the already
    pruned earlier layers, its targets are the dense model's outputs of its layers; the last window
    adds the cross-entropy. Each window learns its own sites, ``end_to_end_steps`` steps; memory is
    that of ``window_layers`` layers. A site shared by all layers (exact ``hidden``) is learned only
    by a window over all of them; a shorter window keeps its heuristic permutation."""

    name = "window"

    def __init__(self, layers: int | None = None) -> None:
        self.layers = layers  # the window's size; None: the configuration's window_layers

    keeps_dense_outputs = True

    def window_layers(self, config: PermuteConfig, num_layers: int) -> int:
        return min(self.layers or config.window_layers, num_layers)

    def solve(self, run: Run, hidden: torch.Tensor, kwargs: list[dict], apply_masks: bool) -> None:
        config, num_layers = run.config, len(run.layers)
        size = self.window_layers(config, num_layers)
        windows = [range(start, min(start + size, num_layers)) for start in range(0, num_layers, size)]
        distilling = config.distill_steps > 0  # the distillation needs the dense outputs kept
        keep = distilling or keeps_dense_targets(run, hidden, config.dense_targets)
        first_inputs = hidden
        started = time.monotonic()
        scores, dense = run.dense_pass(hidden, kwargs, list(run.linears), keep_outputs=keep, on=torch.device("cpu"))
        if distilling:
            run.distill_targets = dense
        dense_inputs = None if keep else hidden.cpu()  # recompute: the dense input of the current window
        logger.info(f"nmperm: dense pass over {len(run.layers)} decoder layers in {time.monotonic() - started:.1f} s")
        started = time.monotonic()
        unsolved = [site for site in run.sites if site.name not in run.perms]
        for site in tqdm(unsolved, desc=f"{run.config.init} start", leave=False):
            run.solve(site, scores)
        logger.info(f"nmperm: {run.config.init} start of {len(unsolved)} sites in {time.monotonic() - started:.1f} s")
        stack = layer_stack(run, kwargs)
        autocast = training_dtype(config.train_dtype, run.device)
        # onloaded or sharded layers are whole only while they run: recomputed in backward, not kept
        checkpointed = layer_checkpointing(config.layer_checkpointing, run.device) or run.onloading or run.sharded
        logger.info(
            f"nmperm: {len(windows)} window(s) of up to {size} decoder layers, {config.total_steps} steps each, "
            f"train dtype {autocast or 'float32'}, layer checkpointing {'on' if checkpointed else 'off'}"
            + (f" (layers onloaded from {run.storage} to {run.device} one at a time)" if run.onloading else "")
            + (" (layer weights sharded over the ranks, gathered per layer)" if run.sharded else "")
        )
        for window in windows:
            if keep:
                targets = dense[window.start : window.stop]
            else:
                layers = [run.layers[i] for i in window]
                targets = RecomputedTargets(layers, kwargs[window.start : window.stop], dense_inputs, run.device)
            effective, objective = window_learning(run, stack, window, hidden, targets, scores, autocast, checkpointed)
            label = "model" if len(window) == num_layers else f"layers {window.start}-{window.stop - 1}"
            run.record(label, *learn(effective, objective, config.learner(config.total_steps), label))
            if window.stop < num_layers:  # the next window's inputs: these layers, pruned (and dense)
                for index in window:
                    masks = run.masks({n: scores[n] for n in run.layer_linears(index)})
                    hidden = run.pruned_layer_output(index, hidden, kwargs, masks)
                    if dense_inputs is not None:
                        dense_inputs = run_layer(run.layers[index], dense_inputs.to(run.device), kwargs[index]).cpu()
        for index in range(num_layers):
            run.record_retained(index, scores)
        started = time.monotonic()
        if apply_masks and config.reconstruct:  # SparseGPT's walk: each layer's inputs from the pruned ones
            hidden = first_inputs
            for index in tqdm(range(num_layers), desc="reconstruction", leave=False):
                masks = run.masks({n: scores[n] for n in run.layer_linears(index)})
                hidden = run.prune_layer(index, hidden, kwargs, masks)
            logger.info(f"nmperm: masks applied with SparseGPT's reconstruction in {time.monotonic() - started:.1f} s")
        elif apply_masks:  # one linear's mask at a time: never the whole model's masks (or scores) at once
            for name, score in scores.items():
                run.apply_masks(run.masks({name: score}))

    def describe(self, config: PermuteConfig) -> str:
        size = self.layers or config.window_layers
        return f"{self.name} of {size} decoder layers, {config.total_steps} steps per window"


def layer_stack(run: Run, kwargs: list[dict]) -> LayerStack:
    """The run's model as a :class:`LayerStack`: its layers, their keyword arguments, head and losses
    (a language model's: computed a chunk of positions at a time)."""
    adapter, head = run.adapter, run.head()
    token_head = adapter.token_head(run.model, head)
    return LayerStack(
        list(run.layers), run.layer_prefixes, kwargs, head, adapter.task_loss, adapter.output_distillation, token_head
    )


def window_learning(
    run: Run,
    stack: LayerStack,
    window: range,
    hidden: torch.Tensor,  # [N, T, D]: the window's inputs
    targets: list[torch.Tensor] | RecomputedTargets,  # the dense outputs of the window's layers
    scores: dict[str, torch.Tensor],
    autocast: torch.dtype | None,
    checkpointed: bool,
) -> tuple[EffectiveWeights, WindowObjective]:
    """What :func:`learn` takes for one window: the effective weights of its linears, with the sites
    it learns (its layers' own; every learned site when the window is the whole model), and its
    :class:`WindowObjective`."""
    config, everything = run.config, len(window) == len(run.layers)
    learned = [s for s in run.sites if run.learns(s) and (s.layer in window or everything)]
    names = {n: lin for index in window for n, lin in run.layer_linears(index).items()}
    effective = run.effective(run.members(names, scores, ""), learned)
    effective.cache_fixed = not checkpointed  # checkpointing: no weight kept beyond its layer
    objective = WindowObjective(
        stack, window, hidden, targets, run.labels, config.alpha,
        run.sequences_per_step, config.select_sequences, run.rng, autocast, checkpointed,
    )  # fmt: skip
    return effective, objective


def keeps_dense_targets(run: Run, hidden: torch.Tensor, setting: str) -> bool:
    """Whether to keep every layer's dense output of every calibration sequence on the CPU (``keep``;
    ``auto``: when they fit in its memory) rather than recompute each step's (``recompute``)."""
    if setting != "auto":
        return setting == "keep"
    shortfall = dense_targets_shortfall(hidden, len(run.layers), torch.device("cpu"))
    if shortfall is not None:
        logger.info(f"nmperm: {shortfall}: each step recomputes its own (dense_targets recompute)")
    return shortfall is None


class EndToEnd(Window):
    """The paper's loss over the whole model: cross-entropy of the pruned model plus ``alpha`` times
    the distillation of every layer's hidden states, all learned sites jointly, from the heuristic
    start (or the permutations an earlier stage left in ``run.perms``): one window of every layer."""

    name = "end_to_end"

    def window_layers(self, config: PermuteConfig, num_layers: int) -> int:
        return num_layers

    def describe(self, config: PermuteConfig) -> str:
        return f"{self.name}, {config.total_steps} steps in all"
