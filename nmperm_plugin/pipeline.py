"""The permutation pipeline: calibration pass, per-site solving or learning, masking, folding.

``permute_and_prune_(model, input_ids, PermuteConfig(...))`` walks the decoder layers in order, as
llm-compressor's sequential pipeline does: each layer's statistics and learning use inputs from the
already pruned earlier layers, and its targets come from the dense model.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field, replace

import torch
from loguru import logger
from torch import nn
from tqdm.auto import tqdm

from .arch import FOLD_MODES, Adapter, Site, get_adapter
from .fold import fold_permutations_, tied_head_perm
from .hooks import get_mask_generator, solvers
from .learn import (
    EffectiveWeights,
    LearnConfig,
    Member,
    RetainedObjective,
    learn,
    module_key,
    retained_ratio,
)
from .nm import NMPattern, hard_mask
from .objectives import (
    TRAIN_DTYPES,
    EndToEndObjective,
    JointLayerwiseObjective,
    LayerwiseObjective,
    first,
    training_dtype,
)
from .permuter import BlockPermuter
from .scores import ChannelStats

METHODS = ("identity", "allocation", "ria", "swap", "learned")
OBJECTIVES = ("retained", "layerwise", "end_to_end", "staged")  # staged: layerwise, then end_to_end from it


@dataclass
class PermuteConfig:
    """What to permute and prune, and how. ``method="learned"`` starts from ``init`` (a heuristic)."""

    pattern: str = "2:4"
    scorer: str = "wanda"
    method: str = "learned"
    objective: str = "layerwise"
    fold: str = "exact"
    block_size: int = 64
    init: str = "ria"
    seed: int = 0
    apply_mask: bool = True
    unstructured: bool = False  # per-row mask of the same density instead of N:M (the bound)
    ignore: tuple[str, ...] = ()  # regexes of linear names left dense (still permuted)
    sequences_per_step: int = 2
    select_sequences: int = 4
    learn_hidden: bool = False  # exact: also learn the global `hidden` permutation (else: the heuristic's)
    layers_per_step: int = 4  # ... with this many decoder layers per learning step
    alpha: float = 0.1  # end_to_end distillation weight
    train_dtype: str = "auto"  # end_to_end learning passes: auto (bfloat16 where fast), float32, bfloat16
    learn: LearnConfig = field(default_factory=LearnConfig)

    def __post_init__(self) -> None:
        NMPattern.parse(self.pattern)
        get_mask_generator(self.scorer)
        known = tuple(solvers()) + ("learned",)
        for name, value, allowed in (
            ("method", self.method, known),
            ("init", self.init, tuple(solvers())),
            ("objective", self.objective, OBJECTIVES),
            ("fold", self.fold, FOLD_MODES),
            ("train_dtype", self.train_dtype, TRAIN_DTYPES),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        if self.block_size <= 0 or self.block_size % NMPattern.parse(self.pattern).m:
            raise ValueError(f"block_size {self.block_size} must be a positive multiple of M in {self.pattern}")
        if self.learn_hidden and (self.method != "learned" or self.fold != "exact" or self.objective == "retained"):
            raise ValueError(
                "learn_hidden applies to method='learned' with fold='exact' (gather has no global site) and a "
                "data-driven objective (layerwise, end_to_end or staged)"
            )
        if self.unstructured and self.method != "identity":
            raise ValueError("unstructured masks need no permutation: use method='identity'")
        self.learn = replace(self.learn, steps=self.learn.steps_for(self.objective, self.fold))
        if self.learn.steps < 0:
            raise ValueError(f"learner steps must be 0 or more, got {self.learn.steps}")

    @property
    def nm(self) -> NMPattern:
        return NMPattern.parse(self.pattern)


@dataclass
class PruneResult:
    """Permutations (site name -> permutation of its input channels) and what was measured."""

    sites: list[Site]
    perms: dict[str, torch.Tensor]
    pruned: list[str]
    retained: dict[str, float] = field(default_factory=dict)  # per layer index
    history: dict[str, list[dict]] = field(default_factory=dict)
    seconds: float = 0.0


class _Stop(Exception):
    pass


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The first decoder layer's input for every sequence (``[N, T, D]``) and its keyword arguments."""
    captured: dict = {"hidden": []}

    def hook(module, args, kwargs):
        captured["hidden"].append(args[0] if args else kwargs.pop("hidden_states"))
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")}
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in input_ids:
                try:
                    model(ids[None], use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    kwargs = captured["kwargs"] | {"use_cache": False}
    return torch.cat(captured["hidden"]), kwargs


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, batch: int = 4) -> torch.Tensor:
    return torch.cat([first(layer(h, **kwargs)) for h in hidden.split(batch)])


@torch.no_grad()
def collect_stats(
    layer: nn.Module, names: dict[str, nn.Linear], hidden: torch.Tensor, kwargs: dict, hessian: bool
) -> dict[str, ChannelStats]:
    """Input statistics of the named linears of ``layer`` over ``hidden``."""
    stats = {name: ChannelStats.empty(lin.in_features, hessian, lin.weight.device) for name, lin in names.items()}
    handles = [
        lin.register_forward_hook(lambda mod, args, out, s=stats[name]: s.update(args[0]))
        for name, lin in names.items()
    ]
    try:
        run_layer(layer, hidden, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def normalised_scores(generator, weight: torch.Tensor, stats: ChannelStats) -> torch.Tensor:
    scores = generator(weight, stats)
    return scores / scores.mean().clamp_min(1e-12)


def solve_site(site: Site, scores: dict[str, torch.Tensor], solver, pattern: NMPattern, rng) -> torch.Tensor:
    """One permutation for ``site`` from its linears' stacked scores (per head group when tied)."""
    stacked = torch.cat([scores[name] for name in site.linears]).cpu()  # [rows, C]; the heuristics run on CPU
    if site.tied_heads is None:
        return solver(stacked, pattern, rng)
    size = site.head_size
    heads = torch.tensor(site.tied_heads)
    per_group = []
    for group in range(int(heads.max()) + 1):
        columns = [stacked[:, h * size : (h + 1) * size] for h in (heads == group).nonzero().flatten().tolist()]
        per_group.append(solver(torch.cat(columns), pattern, rng))
    return tied_head_perm(site, torch.stack(per_group))


def _block_size(site: Site, wanted: int, pattern: NMPattern) -> int:
    if site.tied_heads is not None:
        return site.head_size
    size = min(wanted, site.channels)
    while site.channels % size or size % pattern.m:
        size -= pattern.m
    return size


def make_permuters(
    sites: list[Site], perms: dict[str, torch.Tensor], config: PermuteConfig, rng, device: torch.device
) -> nn.ModuleDict:
    """One :class:`BlockPermuter` per site, starting at that site's heuristic permutation."""
    permuters = nn.ModuleDict()
    for site in sites:
        size = _block_size(site, config.block_size, config.nm)
        tied = site.tied_heads if site.tied_heads is not None else None
        permuters[module_key(site.name)] = BlockPermuter(perms[site.name], size, tied, generator=rng)
    return permuters.to(device)


class Pipeline:
    """State of one :func:`permute_and_prune_` run."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, config: PermuteConfig) -> None:
        self.device = next(model.parameters()).device  # everything runs where the model is
        self.model, self.input_ids, self.config = model, input_ids.to(self.device), config
        self.pattern = config.nm
        self.generator = get_mask_generator(config.scorer)
        self.adapter: Adapter = get_adapter(model)
        self.sites = self.adapter.sites(model, config.fold)
        self.layers = self.adapter.decoder_layers(model)
        self.rng = torch.Generator().manual_seed(config.seed)
        self.solver = solvers()[config.init if config.method == "learned" else config.method]
        self.site_of = {name: site for site in self.sites for name in site.linears}
        self.linears = {name: model.get_submodule(name) for name in self.site_of}
        names = {id(module): name for name, module in model.named_modules()}
        self.layer_prefixes = [names[id(layer)] + "." for layer in self.layers]
        self.pruned = [n for n in self.site_of if not any(re.search(p, n) for p in config.ignore)]
        self.perms: dict[str, torch.Tensor] = {}
        self.history: dict[str, list[dict]] = {}
        self.retained: dict[str, float] = {}
        self._check_model()

    def _check_model(self) -> None:
        for name, linear in self.linears.items():
            self.pattern.check_dim(linear.in_features, name)
            if not torch.isfinite(linear.weight).all():
                raise ValueError(f"{name} has NaN or infinite weights: the model is corrupt, nothing to prune")
        if self.input_ids.ndim != 2 or self.input_ids.numel() == 0:
            raise ValueError("calibration input_ids must be a non-empty [num_sequences, seq_len] tensor")

    def _layer_linears(self, index: int) -> dict[str, nn.Linear]:
        """The permuted linears of decoder layer ``index`` by full module name."""
        return {n: lin for n, lin in self.linears.items() if n.startswith(self._prefix(index))}

    def _record_retained(self, index: int, scores: dict[str, torch.Tensor]) -> None:
        members = self._members(self._layer_linears(index), scores, self._prefix(index))
        self.retained[str(index)] = retained_ratio(members, self.perms, self.pattern)

    def _prefix(self, index: int) -> str:
        """``"model.layers.{index}."``: the module-name prefix of decoder layer ``index``."""
        return self.layer_prefixes[index]

    # -- scores and masks ---------------------------------------------------------------------------
    def scores_of(self, names: dict[str, nn.Linear], stats: dict[str, ChannelStats]) -> dict[str, torch.Tensor]:
        return {n: normalised_scores(self.generator, lin.weight, stats[n]) for n, lin in names.items()}

    @torch.no_grad()
    def apply_masks(self, scores: dict[str, torch.Tensor]) -> None:
        for name, score in scores.items():
            if name not in self.pruned:
                continue
            if self.config.unstructured:
                k = score.shape[1] * self.pattern.n // self.pattern.m
                mask = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(k, dim=1).indices, True)
            else:
                mask = hard_mask(score, self.perms[self.site_of[name].name], self.pattern)
            self.linears[name].weight.mul_(mask.to(self.linears[name].weight.dtype))

    # -- the sequential pass ------------------------------------------------------------------------
    def run(self) -> PruneResult:
        start = time.monotonic()
        dense_state = None if self.config.apply_mask else copy.deepcopy(self.model.state_dict())
        hidden, kwargs = capture_layer_inputs(self.model, self.layers, self.input_ids)
        if self.config.method == "learned" and self.config.objective in ("end_to_end", "staged"):
            self._end_to_end(hidden, kwargs)
        else:
            self._sequential(hidden, kwargs)
        if dense_state is not None:
            self.model.load_state_dict(dense_state)
        return PruneResult(self.sites, self.perms, self.pruned, self.retained, self.history, time.monotonic() - start)

    def _dense_pass(self, hidden: torch.Tensor, kwargs: dict, names: list[str]) -> tuple[dict, list[torch.Tensor]]:
        """Dense statistics of ``names`` and every layer's dense output."""
        stats, outputs = {}, []
        for index, layer in enumerate(tqdm(self.layers, desc="dense pass", leave=False)):
            mine = {n: lin for n, lin in self._layer_linears(index).items() if n in names}
            stats |= collect_stats(layer, mine, hidden, kwargs, self.generator.needs_hessian)
            hidden = run_layer(layer, hidden, kwargs)
            outputs.append(hidden)
        return stats, outputs

    def _solve(self, site: Site, scores: dict[str, torch.Tensor]) -> None:
        self.perms[site.name] = solve_site(site, scores, self.solver, self.pattern, self.rng)

    def _sequential(self, hidden: torch.Tensor, kwargs: dict, objective: str | None = None) -> None:
        objective = objective or self.config.objective
        global_sites = [s for s in self.sites if s.layer is None]
        dense_outputs = None
        if global_sites or (self.config.method == "learned" and objective == "layerwise"):
            names = [n for s in global_sites for n in s.linears]
            stats, dense_outputs = self._dense_pass(hidden, kwargs, names)
            scores = self.scores_of({n: self.linears[n] for n in names}, stats)
            for site in global_sites:
                self._solve(site, scores)
                if self.config.method == "learned" and self._learns(site):
                    self._learn_global(site, scores, [hidden, *dense_outputs[:-1]], dense_outputs, kwargs)
        pruned_hidden = hidden
        for index, layer in enumerate(tqdm(self.layers, desc=f"{self.config.method} permutations", leave=False)):
            prefix = self._prefix(index)
            names = self._layer_linears(index)
            stats = collect_stats(layer, names, pruned_hidden, kwargs, self.generator.needs_hessian)
            scores = self.scores_of(names, stats)
            local = [s for s in self.sites if s.layer == index]
            for site in local:
                self._solve(site, scores)
            if self.config.method == "learned":
                self._learn_layer(index, prefix, local, scores, pruned_hidden, kwargs, dense_outputs, objective)
            self._record_retained(index, scores)
            self.apply_masks(scores)
            pruned_hidden = run_layer(layer, pruned_hidden, kwargs)

    def _members(self, names: dict, scores: dict, prefix: str, weights_are_scores: bool = False) -> list[Member]:
        return [
            Member(
                n[len(prefix) :] + ".weight",
                scores[n] if weights_are_scores else lin.weight.detach(),
                scores[n],
                self.site_of[n].name,
            )
            for n, lin in names.items()
            if n in self.pruned
        ]

    def _effective(self, members: list[Member], learned: list[Site]) -> EffectiveWeights:
        learn_cfg = self.config.learn
        fixed = dict(self.perms)
        permuters = make_permuters(learned, self.perms, self.config, self.rng, self.device)
        return EffectiveWeights(members, permuters, fixed, self.pattern, learn_cfg.mask_tau, learn_cfg.sinkhorn_iters)

    def _learn_layer(self, index, prefix, local, scores, pruned_hidden, kwargs, dense_outputs, objective) -> None:
        names = self._layer_linears(index)
        if objective == "retained":
            for site in local:
                mine = {n: names[n] for n in site.linears}
                effective = self._effective(self._members(mine, scores, prefix, weights_are_scores=True), [site])
                objective = RetainedObjective(effective.members, self.pattern)
                self._record(site.name, *learn(effective, objective, self.config.learn, f"layer {index} {site.kind}"))
            return
        effective = self._effective(self._members(names, scores, prefix), local)
        objective = LayerwiseObjective(
            self.layers[index],
            kwargs,
            pruned_hidden,
            dense_outputs[index],
            self.config.sequences_per_step,
            self.config.select_sequences,
            self.rng,
        )
        self._record(f"layer {index}", *learn(effective, objective, self.config.learn, f"layer {index}"))

    def _learn_global(self, site: Site, scores, inputs: list, targets: list, kwargs: dict) -> None:
        """Learn a site shared by all layers (exact ``hidden``) on every layer's dense input and output."""
        members = self._members({n: self.linears[n] for n in site.linears}, scores, "")
        prefixes = self.layer_prefixes
        params = [[m.param for m in members if m.param.startswith(p)] for p in prefixes]
        objective = JointLayerwiseObjective(
            list(zip(prefixes, self.layers, strict=True)),
            kwargs,
            inputs,
            targets,
            params,
            self.config.sequences_per_step,
            self.config.layers_per_step,
            self.config.select_sequences,
            self.rng,
        )
        self.perms[site.name] = self._best_candidate(site, scores, members, objective, prefixes)
        self._record(site.name, *learn(self._effective(members, [site]), objective, self.config.learn, site.name))

    def _best_candidate(self, site: Site, scores, members: list[Member], objective, prefixes: list[str]):
        """The shared permutation that serves all layers best, among the heuristic on all layers' stacked
        scores and the heuristic on each single layer's scores (one layer may dominate the error)."""
        candidates = [self.perms[site.name]]
        for prefix in prefixes:
            own = Site(
                site.name, site.kind, tuple(n for n in site.linears if n.startswith(prefix)), site.channels, None
            )
            candidates.append(solve_site(own, scores, self.solver, self.pattern, self.rng))
        fixed = EffectiveWeights(members, nn.ModuleDict(), dict(self.perms), self.pattern)
        losses = [objective.select(fixed.hard(self.perms | {site.name: c})) for c in tqdm(candidates, leave=False)]
        best = min(range(len(candidates)), key=losses.__getitem__)
        logger.debug(
            f"{site.name}: candidate {best} of {len(candidates)} (0: all layers' scores), "
            f"select {losses[0]:.5g} -> {losses[best]:.5g}"
        )
        return candidates[best]

    def _learns(self, site: Site) -> bool:
        """Whether a learned method learns ``site``: every per-layer site; the global ``hidden`` one
        (exact) only with ``learn_hidden``, else it keeps the heuristic's permutation."""
        return site.layer is not None or self.config.learn_hidden

    def _record(self, name: str, perms: dict[str, torch.Tensor], history: list[dict]) -> None:
        self.perms |= {site: perm.cpu() for site, perm in perms.items()}
        self.history[name] = history

    def _end_to_end(self, hidden: torch.Tensor, kwargs: dict) -> None:
        if self.config.objective == "staged":  # start from the layer-wise permutations (pruning a scratch state)
            dense_state = copy.deepcopy(self.model.state_dict())
            self._sequential(hidden, kwargs, objective="layerwise")
            self.model.load_state_dict(dense_state)
        stats, _ = self._dense_pass(hidden, kwargs, list(self.linears))
        scores = self.scores_of(self.linears, stats)
        for site in self.sites:
            if site.name not in self.perms:  # the heuristic start, unless staged learning gave one
                self._solve(site, scores)
        with torch.no_grad():
            dense = self.model(self.input_ids, output_hidden_states=True, use_cache=False).hidden_states
        members = self._members(self.linears, scores, "")
        learned = [s for s in self.sites if self._learns(s)]
        effective = self._effective(members, learned)
        objective = EndToEndObjective(
            self.model,
            self.input_ids,
            [h.detach() for h in dense],
            self.config.alpha,
            self.config.sequences_per_step,
            self.config.select_sequences,
            self.rng,
            training_dtype(self.config.train_dtype, self.device),
        )
        self._record("model", *learn(effective, objective, self.config.learn, "end to end"))
        for index in range(len(self.layers)):
            self._record_retained(index, scores)
        self.apply_masks(scores)


def permute_and_prune_(model: nn.Module, input_ids: torch.Tensor, config: PermuteConfig) -> PruneResult:
    """Find permutations for every site of ``model`` and (with ``apply_mask``) apply the N:M masks.

    The model stays in its original channel order; call :func:`fold_` to fold the permutations.
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    logger.info(
        f"nmperm: {config.method} permutations ({config.objective if config.method == 'learned' else 'heuristic'}), "
        f"scorer {config.scorer}, pattern {config.pattern}, fold {config.fold}, {len(input_ids)} sequences"
    )
    return Pipeline(model, input_ids, config).run()


def fold_(model: nn.Module, result: PruneResult, fold: str) -> dict[str, str | None]:
    """Fold what can be folded; return each pruned linear's frame (the site it still needs, or None).

    ``exact``: every site is folded. ``gather``: sites that are not exactly foldable (per-layer
    hidden permutations, untied ``attn_out``) stay in the original order, recorded for serving.
    """
    adapter = get_adapter(model)
    foldable = [s for s in result.sites if fold == "exact" or s.kind == "mlp_out"]
    fold_permutations_(model, foldable, result.perms, adapter)
    folded = {s.name for s in foldable}
    site_of = {name: site for site in result.sites for name in site.linears}
    return {n: (None if site_of[n].name in folded else site_of[n].name) for n in result.pruned}
