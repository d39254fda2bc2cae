"""The objective strategy interface and the layer-by-layer walk: ``retained`` (the retained score
per site) and ``layerwise`` (each decoder layer's output against the dense one, inputs from the
already pruned layers); the exact fold's global hidden site and the choice among candidates."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from loguru import logger
from torch import nn
from tqdm.auto import tqdm

from ..arch import Site
from .learner import EffectiveWeights, Objective, RetainedObjective, learn
from .losses import (
    JointLayerwiseObjective,
    LayerwiseObjective,
)
from .run import Run, solve_site

if TYPE_CHECKING:
    from ..config import PermuteConfig


class ObjectiveStrategy:
    """Finds the permutations of a :class:`~nmperm_plugin.learn.run.Run` from the first decoder layer's
    inputs ``hidden`` (``[N, T, D]``) and every decoder layer's keyword arguments ``kwargs``."""

    name: str = "base"
    keeps_dense_outputs: bool = False  # whether solve sets Run.distill_targets when distill_steps is set

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
            if apply_masks:
                hidden = run.prune_layer(index, hidden, kwargs, masks)
            else:
                hidden = run.pruned_layer_output(index, hidden, kwargs, masks)

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
            run.layers[index], kwargs, inputs, target, run.sequences_per_step, config.select_sequences, run.rng
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
        run.sequences_per_step,
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
