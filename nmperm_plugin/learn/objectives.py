"""Objectives as strategies: how a run finds its permutations (what ``objective:`` names).

Built-ins are registered through the ``nmperm_objectives`` hook like a third party's:
``auto`` (the default: ``end_to_end``, else the widest ``window`` that fits the device),
``retained``, ``layerwise``, ``end_to_end``, ``window`` (end_to_end's loss on a moving window of
decoder layers) and ``staged`` (layerwise, then end_to_end from its result). A strategy sets
``run.perms`` for every site and, with ``apply_masks``, prunes the model.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

import torch
from loguru import logger
from torch import nn
from tqdm.auto import tqdm

from ..arch import Site
from ..io.checks import dense_targets_shortfall
from .learner import EffectiveWeights, Objective, RetainedObjective, learn
from .losses import (
    JointLayerwiseObjective,
    LayerStack,
    LayerwiseObjective,
    RecomputedTargets,
    WindowObjective,
    layer_checkpointing,
    training_dtype,
)
from .run import Run, run_layer, solve_site

if TYPE_CHECKING:
    from ..config import PermuteConfig


class ObjectiveStrategy:
    """Finds the permutations of a :class:`~nmperm_plugin.learn.run.Run` from the first decoder layer's
    inputs ``hidden`` (``[N, T, D]``) and every decoder layer's keyword arguments ``kwargs``."""

    name: str = "base"

    def solve(self, run: Run, hidden: torch.Tensor, kwargs: list[dict], apply_masks: bool) -> None:
        raise NotImplementedError

    def describe(self, config: PermuteConfig) -> str:
        """A few words for the log: what this objective learns, with how many steps."""
        return self.name


class Sequential(ObjectiveStrategy):
    """Walk the decoder layers in order, as llm-compressor's sequential pipeline does: each layer's
    statistics come from the already pruned earlier layers. Alone it is the heuristic methods' walk;
    subclasses learn each layer's sites in :meth:`learn_layer`."""

    name = "heuristic"
    keeps_dense_outputs = False  # whether learn_layer needs every layer's dense output
    learns_global = False  # whether a learned global site (learn_hidden) is learned in this walk

    def solve(self, run: Run, hidden: torch.Tensor, kwargs: list[dict], apply_masks: bool) -> None:
        dense_outputs = self.solve_global(run, hidden, kwargs)
        for index in tqdm(range(len(run.layers)), desc=f"{run.config.method} permutations", leave=False):
            scores = run.layer_scores(index, hidden, kwargs)
            local = [s for s in run.sites if s.layer == index]
            for site in local:
                run.solve(site, scores)
            self.learn_layer(run, index, local, scores, hidden, kwargs, dense_outputs)
            run.record_retained(index, scores)
            masks = run.masks(scores)
            next_hidden = run.pruned_layer_output(index, hidden, kwargs, masks)
            if apply_masks:
                run.apply_masks(masks)
            hidden = next_hidden

    def solve_global(self, run: Run, hidden: torch.Tensor, kwargs: list[dict]) -> list[torch.Tensor]:
        """Solve the sites shared by all layers (exact ``hidden``) on the dense model's statistics;
        return every layer's dense output when this objective or a learned global site needs them."""
        global_sites = [s for s in run.sites if s.layer is None]
        learned = [s for s in global_sites if self.learns_global and run.learns(s)]
        keep = self.keeps_dense_outputs or bool(learned)
        if not global_sites and not keep:
            return []
        names = [n for s in global_sites for n in s.linears]
        scores, outputs = run.dense_pass(hidden, kwargs, names, keep)
        for site in global_sites:
            run.solve(site, scores)
            if site in learned:
                learn_global_site(run, site, scores, [hidden, *outputs[:-1]], outputs, kwargs)
        return outputs

    def learn_layer(self, run: Run, index: int, local: list[Site], scores, hidden, kwargs, dense_outputs) -> None:
        """Improve the permutations of layer ``index``'s sites ``local`` (heuristic walk: nothing)."""


class Retained(Sequential):
    """Maximise each site's retained score (no data beyond the statistics)."""

    name = "retained"

    def learn_layer(self, run: Run, index: int, local: list[Site], scores, hidden, kwargs, dense_outputs) -> None:
        prefix, names = run.layer_prefixes[index], run.layer_linears(index)
        for site in local:
            mine = {n: names[n] for n in site.linears}
            effective = run.effective(run.members(mine, scores, prefix, weights_are_scores=True), [site])
            objective = RetainedObjective(effective.members, run.pattern)
            learner = run.config.learner(run.config.steps_per_layer)
            run.record(site.name, *learn(effective, objective, learner, f"layer {index} {site.kind}"))

    def describe(self, config: PermuteConfig) -> str:
        return f"{self.name}, {config.steps_per_layer} steps per site"


class Layerwise(Sequential):
    """Match each decoder layer's output, run on the already pruned earlier layers' output, to the
    dense model's output at that layer (:meth:`layer_loss`; subclasses may change the loss)."""

    name = "layerwise"
    keeps_dense_outputs = True
    learns_global = True

    def layer_loss(self, run: Run, index: int, inputs: torch.Tensor, kwargs: dict, target: torch.Tensor) -> Objective:
        """The loss of layer ``index`` on its pruned ``inputs`` against the dense ``target`` (``[N, T, D]``);
        ``kwargs`` are this layer's keyword arguments."""
        config = run.config
        return LayerwiseObjective(
            run.layers[index], kwargs, inputs, target, config.sequences_per_step, config.select_sequences, run.rng
        )

    def learn_layer(self, run: Run, index: int, local: list[Site], scores, hidden, kwargs, dense_outputs) -> None:
        effective = run.effective(run.members(run.layer_linears(index), scores, run.layer_prefixes[index]), local)
        objective = self.layer_loss(run, index, hidden, kwargs[index], dense_outputs[index])
        learner = run.config.learner(run.config.steps_per_layer)
        run.record(f"layer {index}", *learn(effective, objective, learner, f"layer {index}"))

    def describe(self, config: PermuteConfig) -> str:
        return f"{self.name}, {config.steps_per_layer} steps per decoder layer"


def learn_global_site(run: Run, site: Site, scores, inputs: list, targets: list, kwargs: list[dict]) -> None:
    """Learn a site shared by all layers (exact ``hidden``) on every layer's dense input and output,
    starting from the best of the heuristic candidates."""
    members = run.members({n: run.linears[n] for n in site.linears}, scores, "")
    prefixes, config = run.layer_prefixes, run.config
    params = [[m.param for m in members if m.param.startswith(p)] for p in prefixes]
    objective = JointLayerwiseObjective(
        list(zip(prefixes, run.layers, strict=True)),
        kwargs,
        inputs,
        targets,
        params,
        config.sequences_per_step,
        config.layers_per_step,
        config.select_sequences,
        run.rng,
    )
    run.perms[site.name] = best_candidate(run, site, scores, members, objective)
    learner = config.learner(config.steps_per_layer)
    run.record(site.name, *learn(run.effective(members, [site]), objective, learner, site.name))


def best_candidate(run: Run, site: Site, scores, members, objective: Objective) -> torch.Tensor:
    """The shared permutation that serves all layers best, among the heuristic on all layers' stacked
    scores and the heuristic on each single layer's scores (one layer may dominate the error)."""
    candidates = [run.perms[site.name]]
    for prefix in run.layer_prefixes:
        own = Site(site.name, site.kind, tuple(n for n in site.linears if n.startswith(prefix)), site.channels, None)
        candidates.append(solve_site(own, scores, run.solver, run.pattern, run.rng))
    fixed = EffectiveWeights(members, nn.ModuleDict(), dict(run.perms), run.pattern)
    losses = [objective.select(fixed.hard(run.perms | {site.name: c})) for c in tqdm(candidates, leave=False)]
    best = min(range(len(candidates)), key=losses.__getitem__)
    logger.debug(
        f"{site.name}: candidate {best} of {len(candidates)} (0: all layers' scores), "
        f"select {losses[0]:.5g} -> {losses[best]:.5g}"
    )
    return candidates[best]


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

    def window_layers(self, config: PermuteConfig, num_layers: int) -> int:
        return min(self.layers or config.window_layers, num_layers)

    def solve(self, run: Run, hidden: torch.Tensor, kwargs: list[dict], apply_masks: bool) -> None:
        config, num_layers = run.config, len(run.layers)
        size = self.window_layers(config, num_layers)
        windows = [range(start, min(start + size, num_layers)) for start in range(0, num_layers, size)]
        keep = keeps_dense_targets(run, hidden, config.dense_targets)
        scores, dense = run.dense_pass(hidden, kwargs, list(run.linears), keep_outputs=keep, on=torch.device("cpu"))
        dense_inputs = None if keep else hidden.cpu()  # recompute: the dense input of the current window
        for site in run.sites:
            if site.name not in run.perms:
                run.solve(site, scores)
        stack = layer_stack(run, kwargs)
        autocast = training_dtype(config.train_dtype, run.device)
        checkpointed = layer_checkpointing(config.layer_checkpointing, run.device) or run.onloading
        logger.info(
            f"nmperm: {len(windows)} window(s) of up to {size} decoder layers, {config.total_steps} steps each, "
            f"train dtype {autocast or 'float32'}, layer checkpointing {'on' if checkpointed else 'off'}"
            + (f" (layers onloaded from {run.storage} to {run.device} one at a time)" if run.onloading else "")
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
        if apply_masks:
            run.apply_masks(run.masks(scores))

    def describe(self, config: PermuteConfig) -> str:
        size = self.layers or config.window_layers
        return f"{self.name} of {size} decoder layers, {config.total_steps} steps per window"


def layer_stack(run: Run, kwargs: list[dict]) -> LayerStack:
    """The run's model as a :class:`LayerStack`: its layers, their keyword arguments, head and losses."""
    adapter = run.adapter
    return LayerStack(
        list(run.layers), run.layer_prefixes, kwargs, run.head(), adapter.task_loss, adapter.output_distillation
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
        config.sequences_per_step, config.select_sequences, run.rng, autocast, checkpointed,
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


class Auto(ObjectiveStrategy):
    """The most accurate objective that fits the device: ``end_to_end``, else ``window`` with the
    widest window that fits (half the decoder layers, then a quarter, ... down to one), found by
    trying: an out-of-memory error of the device in one falls back to the next, from the same
    heuristic start. Memory on the CPU is not probed (the host's RAM is checked for the dense targets
    only, and an exhausted host kills the process instead of raising): there it is ``end_to_end``."""

    name = "auto"

    def attempts(self, num_layers: int) -> list[Window]:
        sizes, size = [], num_layers
        while size > 1:
            size = (size + 1) // 2
            sizes.append(size)
        return [EndToEnd(), *(Window(k) for k in sizes)]

    def solve(self, run: Run, hidden: torch.Tensor, kwargs: list[dict], apply_masks: bool) -> None:
        config, failed = run.config, []
        for strategy in self.attempts(len(run.layers)):
            if failed:
                logger.warning(f"nmperm: objective auto: {failed[-1]}; trying {strategy.describe(config)}")
            else:
                logger.info(
                    f"nmperm: objective auto: {strategy.describe(config)} (the most accurate; on {run.device.type}"
                    + (", an out-of-memory error falls back to the window objective)" if run.device.type != "cpu"
                       else ", where memory is not probed: use --objective window if the host runs out)")
                )  # fmt: skip
            try:
                strategy.solve(run, hidden, kwargs, apply_masks)
            except torch.OutOfMemoryError as error:
                failed.append(f"{strategy.name} ran out of memory on {run.device} ({str(error).splitlines()[0]})")
            else:
                run.objective = strategy.name
                note = f" (after: {'; '.join(failed)})" if failed else ""
                logger.info(f"nmperm: objective auto ran {strategy.describe(config)}{note}")
                return
            free_device_memory(run.device)
        raise MemoryError(
            f"objective auto: not even a window of one decoder layer fits on {run.device}: {failed[-1]}; use fewer "
            f"tokens per step (--sequences-per-step 1, a shorter --seq-len), --layer-checkpointing on, or a "
            f"device with more memory"
        )

    def describe(self, config: PermuteConfig) -> str:
        return f"{self.name} (end_to_end, else the widest window that fits), {config.total_steps} steps per window"


def free_device_memory(device: torch.device) -> None:
    """Return what a failed attempt held to the device (its tensors are garbage once its frames are)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Staged(ObjectiveStrategy):
    """One strategy, then another from its permutations (the first prunes nothing)."""

    def __init__(self, name: str, first: ObjectiveStrategy, then: ObjectiveStrategy) -> None:
        self.name, self.first, self.then = name, first, then

    def solve(self, run: Run, hidden: torch.Tensor, kwargs: list[dict], apply_masks: bool) -> None:
        self.first.solve(run, hidden, kwargs, apply_masks=False)
        self.then.solve(run, hidden, kwargs, apply_masks)

    def describe(self, config: PermuteConfig) -> str:
        return f"{self.name}: {self.first.describe(config)}, then {self.then.describe(config)}"


HEURISTIC = Sequential()
BUILTIN_OBJECTIVES = (Auto(), Retained(), Layerwise(), EndToEnd(), Window(), Staged("staged", Layerwise(), EndToEnd()))
