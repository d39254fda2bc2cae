"""The state of one permutation run and the steps every objective is made of: capture the first
decoder layer's inputs, collect statistics, score, solve a site with a heuristic, build learnable
effective weights, run a layer with its masks, apply the masks.

Nothing here changes the model's weights except :meth:`Run.apply_masks`; a pruned layer's output is
computed with its masked weights substituted (``functional_call``). A run may execute on another
device than the one that stores the weights (:mod:`nmperm_plugin.runtime.onload`): each layer's tensors are
then copied to the execution device for each call, and scores stay beside the weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import Adapter, Site
from ..core.nm import hard_mask
from ..core.ops import tied_head_perm
from ..core.permuter import BlockPermuter
from ..core.reconstruct import reconstruct
from ..core.scores import ChannelStats
from ..core.solvers import stack_rows
from ..data.calibration import CalibrationData, samples_of, stack_labels, to_device
from ..io.checks import check_fits_in_memory
from ..runtime import distributed
from ..runtime.onload import head_on, moved, storage_device
from ..runtime.sharding import is_shard, part_of, shard_of, whole
from .layers import capture_layer_inputs, collect_stats, run_layer
from .learner import EffectiveWeights, Member, module_key, retained_ratio

if TYPE_CHECKING:
    from ..config import PermuteConfig


def solve_site(site: Site, scores: dict[str, torch.Tensor], solver, pattern, rng) -> torch.Tensor:
    """One permutation for ``site`` from its linears' stacked scores (per head group when tied)."""
    cpu = torch.device("cpu")
    parts = [whole(scores[name], cpu) for name in site.linears]  # the heuristics run on CPU
    if site.tied_heads is None:  # a weighted row sample where the site is too large to solve exactly
        return solver(stack_rows(parts, pattern, rng), pattern, rng)
    stacked = torch.cat(parts)  # [rows, C]: a head's site is small, whatever the model
    size = site.head_size
    heads = torch.tensor(site.tied_heads)
    per_group = []
    for group in range(int(heads.max()) + 1):
        columns = [stacked[:, h * size : (h + 1) * size] for h in (heads == group).nonzero().flatten().tolist()]
        per_group.append(solver(torch.cat(columns), pattern, rng))
    return tied_head_perm(site.tied_heads, torch.stack(per_group))


def frozen(weight: nn.Parameter) -> torch.Tensor:
    """``weight`` detached, or the parameter itself when sharded (its mark of the whole shape is on
    that object, and :func:`whole` gathers it detached)."""
    return weight if is_shard(weight) else weight.detach()


def block_size_of(site: Site, wanted: int, m: int) -> int:
    """The largest block size up to ``wanted`` that divides the site and is a multiple of M (a head when tied)."""
    if site.tied_heads is not None:
        return site.head_size
    size = min(wanted, site.channels)
    while site.channels % size or size % m:
        size -= m
    return size


class Run:
    """One run over ``model``: its sites, linears, scorer, heuristic solver, and what was found."""

    def __init__(
        self,
        model: nn.Module,
        calibration: CalibrationData,
        config: PermuteConfig,
        adapter: Adapter,
        generator,
        solver,
        device: torch.device | None = None,
    ) -> None:
        self.storage = storage_device(model)  # where the weights are
        self.device = self.storage if device is None else device  # where the run computes
        self.onloading = self.device != self.storage  # each layer copied to the device when it runs
        self.sharded = config.shard_weights  # each rank keeps its part of every layer's matrices and scores
        self.model, self.config = model, config
        self.objective = config.objective  # the objective that ran (``auto`` sets the one it chose)
        raw = samples_of(calibration)
        self.samples = [to_device(adapter.model_inputs(sample), self.storage) for sample in raw]  # for the embeddings
        labels = stack_labels([adapter.labels(sample) for sample in raw])
        self.labels = None if labels is None else labels.to(self.device)  # [N, ...]: what the task loss needs
        self.pattern, self.generator, self.solver, self.adapter = config.nm, generator, solver, adapter
        self.sites = adapter.sites(model, config.fold)
        self.layers = adapter.decoder_layers(model)
        self.rng = torch.Generator().manual_seed(config.seed)
        self.sequences_per_step = distributed.sequences_per_step(config.sequences_per_step)  # unset: by the ranks
        self.site_of = {name: site for site in self.sites for name in site.linears}
        self.linears = {name: model.get_submodule(name) for name in self.site_of}
        names = {id(module): name for name, module in model.named_modules()}
        self.layer_prefixes = [names[id(layer)] + "." for layer in self.layers]
        self.pruned = [n for n in self.site_of if not any(re.search(p, n) for p in config.ignore)]
        if config.apply_mask and self.site_of and not self.pruned:
            raise ValueError(
                f"ignore (--ignore) {' '.join(map(repr, config.ignore))} matches all {len(self.site_of)} linears "
                "that would be pruned: the result would be a dense model, not an N:M one; narrow the patterns, or "
                "use --permute-only to permute without pruning"
            )
        self.perms: dict[str, torch.Tensor] = {}
        self.history: dict[str, list[dict]] = {}
        self.retained: dict[str, float] = {}
        # every decoder layer's dense output on the CPU, kept by an objective's dense pass when
        # distill_steps is set (the distillation's targets; one dense pass instead of two)
        self.distill_targets: list[torch.Tensor] | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        """The calibration token ids ``[N, T]`` (samples with ``input_ids`` only)."""
        return torch.cat([sample["input_ids"] for sample in self.samples])

    def layer_inputs(self) -> tuple[torch.Tensor, list[dict]]:
        """The first decoder layer's inputs ``[N, T, D]`` and every layer's keyword arguments, on the
        run's device (:func:`capture_layer_inputs`, run where the embeddings are)."""
        hidden, kwargs = capture_layer_inputs(self.model, self.layers, self.samples)
        return hidden.to(self.device), moved(kwargs, self.device)

    def head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The adapter's head (last hidden state -> the model's output) computing on the run's device."""
        return head_on(self.model, self.layers, self.adapter.head(self.model), self.device)

    def layer_linears(self, index: int) -> dict[str, nn.Linear]:
        """The permuted linears of decoder layer ``index`` by full module name."""
        return {n: lin for n, lin in self.linears.items() if n.startswith(self.layer_prefixes[index])}

    def scores_of(self, names: dict[str, nn.Linear], stats: dict[str, ChannelStats]) -> dict[str, torch.Tensor]:
        """Each linear's saliency scores, normalised to mean 1, one linear at a time (with
        ``shard_weights``: this rank's part of them, like its weights)."""
        scores = {}
        for name, linear in names.items():
            score = self.generator(whole(linear.weight, self.device), stats[name])
            score = (score / score.mean().clamp_min(1e-12)).to(self.storage)
            scores[name] = shard_of(score) if self.sharded else score
        return scores

    def layer_scores(self, index: int, hidden: torch.Tensor, kwargs: list[dict]) -> dict[str, torch.Tensor]:
        """Scores of layer ``index``'s linears from its inputs ``hidden`` (``kwargs``: every layer's)."""
        names = self.layer_linears(index)
        stats, _ = collect_stats(self.layers[index], names, hidden, kwargs[index], self.generator.needs_hessian)
        return self.scores_of(names, stats)

    def dense_pass(
        self,
        hidden: torch.Tensor,
        kwargs: list[dict],
        names: list[str],
        keep_outputs: bool,
        on: torch.device | None = None,
    ):
        """Scores of ``names`` from the dense model's activations, and (``keep_outputs``) every layer's
        dense output (``[N, T, D]`` each, kept ``on`` a device, by default the model's; else an empty list)."""
        stats, outputs = {}, []
        if keep_outputs:
            check_fits_in_memory(hidden, len(self.layers), on or self.device)
        for index, layer in enumerate(tqdm(self.layers, desc="dense pass", leave=False)):
            mine = {n: lin for n, lin in self.layer_linears(index).items() if n in names}
            layer_stats, hidden = collect_stats(layer, mine, hidden, kwargs[index], self.generator.needs_hessian)
            stats |= layer_stats
            if keep_outputs:
                outputs.append(hidden if on is None else hidden.to(on))
        return self.scores_of({n: self.linears[n] for n in names}, stats), outputs

    def solve(self, site: Site, scores: dict[str, torch.Tensor]) -> None:
        """The heuristic permutation of ``site`` (a ``fixed`` site's: the identity)."""
        if site.fixed:
            self.perms[site.name] = torch.arange(site.channels)
            return
        self.perms[site.name] = solve_site(site, scores, self.solver, self.pattern, self.rng)

    def learns(self, site: Site) -> bool:
        """Whether a learned method learns ``site``: every per-layer site; the global ``hidden`` one
        (exact) only with ``learn_hidden``, else it keeps the heuristic's permutation; a ``fixed`` one never."""
        return not site.fixed and (site.layer is not None or self.config.learn_hidden)

    def members(self, names: dict, scores: dict, prefix: str, weights_are_scores: bool = False) -> list[Member]:
        """The pruned linears among ``names`` as learner members (parameter names relative to ``prefix``)."""
        return [
            Member(
                n[len(prefix) :] + ".weight",
                scores[n] if weights_are_scores else frozen(lin.weight),
                scores[n],
                self.site_of[n].name,
            )
            for n, lin in names.items()
            if n in self.pruned
        ]

    def effective(self, members: list[Member], learned: list[Site]) -> EffectiveWeights:
        """Effective weights of ``members`` with a learnable permuter per site of ``learned``, starting
        from the current permutations; the other sites stay fixed."""
        permuters = nn.ModuleDict()
        for site in learned:
            size = block_size_of(site, self.config.block_size, self.pattern.m)
            permuters[module_key(site.name)] = BlockPermuter(
                self.perms[site.name], size, site.tied_heads, generator=self.rng
            )
        config = self.config
        return EffectiveWeights(
            members,
            permuters.to(self.device),
            dict(self.perms),
            self.pattern,
            config.mask_tau,
            config.sinkhorn_iters,
            device=self.device,
        )

    def record(self, name: str, perms: dict[str, torch.Tensor], history: list[dict]) -> None:
        """Keep a learner's permutations and its learning curve under ``name``."""
        self.perms |= {site: perm.cpu() for site, perm in perms.items()}
        self.history[name] = history

    def record_retained(self, index: int, scores: dict[str, torch.Tensor]) -> None:
        prefix = self.layer_prefixes[index]
        members = self.members(self.layer_linears(index), scores, prefix)
        if members:  # none when ``ignore`` keeps every linear of the layer dense: nothing to report
            self.retained[str(index)] = retained_ratio(members, self.perms, self.pattern)

    def masks(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The final mask of each pruned linear among ``scores`` (N:M in its site's permuted order)."""
        masks = {}
        for name, score in scores.items():
            if name not in self.pruned:
                continue
            score = whole(score)
            if self.config.unstructured:
                k = score.shape[1] * self.pattern.n // self.pattern.m
                masks[name] = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(k, dim=1).indices, True)
            else:
                masks[name] = hard_mask(score, self.perms[self.site_of[name].name], self.pattern)
        return masks

    def pruned_layer_output(self, index: int, hidden: torch.Tensor, kwargs: list[dict], masks: dict) -> torch.Tensor:
        """Layer ``index``'s output with ``masks`` applied (the weights themselves are not changed)."""
        prefix = self.layer_prefixes[index]
        weights = {}
        for name, mask in masks.items():
            weight = whole(self.linears[name].weight, hidden.device)
            weights[name[len(prefix) :] + ".weight"] = weight * mask.to(hidden.device, weight.dtype)
        return run_layer(self.layers[index], hidden, kwargs[index], weights)

    def prune_layer(self, index: int, hidden: torch.Tensor, kwargs: list[dict], masks: dict) -> torch.Tensor:
        """Prune layer ``index`` to ``masks`` (with ``reconstruct``, updating its kept weights) and
        return its output for ``hidden``, the outputs of the already pruned earlier layers."""
        if self.config.reconstruct:
            return self.reconstruct_layer(index, hidden, kwargs, masks)
        output = self.pruned_layer_output(index, hidden, kwargs, masks)
        self.apply_masks(masks)
        return output

    def reconstruct_layer(self, index: int, hidden: torch.Tensor, kwargs: list[dict], masks: dict) -> torch.Tensor:
        """Prune layer ``index`` to ``masks`` with the kept weights updated for them
        (:func:`~nmperm_plugin.core.reconstruct.reconstruct`) and return its new output. As in
        llm-compressor's sequential pipeline, every linear's Hessian comes from one pass of the layer
        still dense over ``hidden``, the outputs of the already pruned earlier layers."""
        names = {name: self.linears[name] for name in masks}
        stats, _ = collect_stats(self.layers[index], names, hidden, kwargs[index], hessian=True)
        with torch.no_grad():
            for name, mask in masks.items():
                weight = self.linears[name].weight
                config = self.config
                dense = whole(weight, self.device)
                updated = reconstruct(
                    dense, mask.to(self.device), stats[name].hessian, config.reconstruct_damp, config.reconstruct_iters
                )
                weight.copy_(part_of(updated, weight).to(weight.device))
        return run_layer(self.layers[index], hidden, kwargs[index])

    @torch.no_grad()
    def apply_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Zero the pruned weights: ``masks`` maps linear names to their keep masks."""
        for name, mask in masks.items():
            weight = self.linears[name].weight
            weight.mul_(part_of(mask, weight).to(weight.dtype))  # a shard: its part of the mask
