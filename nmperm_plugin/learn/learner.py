"""One learner for every objective: Adam on the cost matrices, annealed temperature, and selection
of the best hard permutation seen (the heuristic start included), judged by the objective itself.

An objective provides ``loss(weights)`` (differentiable) and ``select(weights)`` (a float, lower is
better) over a dict of effective weights; :class:`EffectiveWeights` turns permuters into them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from loguru import logger
from torch import nn
from tqdm.auto import tqdm

from ..config import LearnConfig
from ..core.nm import NMPattern, hard_mask, retained_score, unstructured_bound
from ..core.permuter import hard_together, sample_together
from ..core.sinkhorn import anneal
from ..runtime import distributed
from ..runtime.callbacks import LearnCallback, default_callbacks
from ..runtime.sharding import is_shard, whole


def module_key(site: str) -> str:
    """A site name as a ``ModuleDict`` key (no dots allowed there)."""
    return site.replace(".", "/")


def site_name(key: str) -> str:
    return key.replace("/", ".")


@dataclass
class Member:
    """One linear weight inside an objective: its parameter name, weight, normalised scores and site."""

    param: str
    weight: torch.Tensor  # [out, in], frozen
    scores: torch.Tensor  # [out, in]
    site: str


@dataclass
class EffectiveWeights:
    """Builds ``{param: W_eff}`` from the permuters (soft-backward) or from fixed permutations."""

    members: list[Member]
    permuters: nn.ModuleDict
    fixed: dict[str, torch.Tensor] = field(default_factory=dict)  # site -> perm, not learned
    pattern: NMPattern = NMPattern(2, 4)
    mask_tau: float = 0.5
    sinkhorn_iters: int = 5
    cache_fixed: bool = False  # keep the (constant) effective weights of fixed sites: one masked copy of them
    device: torch.device | None = None  # where effective weights are built (None: where the members are)
    _fixed_weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def soft(self, tau: float) -> LazyWeights:
        keys = list(self.permuters)
        samples = sample_together([self.permuters[k] for k in keys], tau, self.sinkhorn_iters)
        sampled = {site_name(key): sample for key, sample in zip(keys, samples, strict=True)}
        return LazyWeights(self.members, lambda member: self._weight(member, sampled))

    def _weight(self, member: Member, sampled: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        if member.site in sampled:
            matrices, perm = sampled[member.site]
            permuter = self.permuters[module_key(member.site)]
            weight, scores = self._onloaded(member)
            return permuter.effective_weight(weight, scores, matrices, perm, self.pattern, self.mask_tau)
        return self._masked(member, self.fixed[member.site])

    def _onloaded(self, member: Member) -> tuple[torch.Tensor, torch.Tensor]:
        """``member``'s weight and scores on the device effective weights are built on (gathered from
        the ranks when sharded: freed with the effective weight, and gathered again in a recomputation)."""
        if is_shard(member.weight) or is_shard(member.scores):
            return whole(member.weight, self.device), whole(member.scores, self.device)
        if self.device is None:
            return member.weight, member.scores
        return member.weight.to(self.device, non_blocking=True), member.scores.to(self.device, non_blocking=True)

    def _masked(self, member: Member, perm: torch.Tensor) -> torch.Tensor:
        """``member``'s weight with its N:M mask in the order ``perm`` (cached for a fixed site)."""
        fixed = perm is self.fixed.get(member.site) and module_key(member.site) not in self.permuters
        if self.cache_fixed and fixed and member.param in self._fixed_weights:
            return self._fixed_weights[member.param]
        weight, scores = self._onloaded(member)
        masked = weight * hard_mask(scores, perm, self.pattern)
        if self.cache_fixed and fixed:
            self._fixed_weights[member.param] = masked
        return masked

    def hard_perms(self) -> dict[str, torch.Tensor]:
        keys = list(self.permuters)
        hard = hard_together([self.permuters[k] for k in keys])
        return self.fixed | {site_name(key): perm for key, (_, perm) in zip(keys, hard, strict=True)}

    def hard(self, perms: dict[str, torch.Tensor] | None = None) -> LazyWeights:
        perms = self.hard_perms() if perms is None else perms
        return LazyWeights(self.members, lambda m: self._masked(m, perms[m.site]))


class LazyWeights(Mapping):
    """``{param: W_eff}`` computed on first access, so an objective pays only for the weights it uses."""

    def __init__(self, members: list[Member], compute: Callable[[Member], torch.Tensor]) -> None:
        self._members = {m.param: m for m in members}
        self._compute = compute
        self._cache: dict[str, torch.Tensor] = {}

    def __getitem__(self, param: str) -> torch.Tensor:
        if param not in self._cache:
            self._cache[param] = self.compute(param)
        return self._cache[param]

    def compute(self, param: str) -> torch.Tensor:
        """The effective weight of ``param``, not kept (an objective that frees it after use)."""
        return self._compute(self._members[param])

    def __iter__(self):
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)


class Objective:
    """``loss`` drives the gradient; ``select`` ranks hard permutations (lower is better)."""

    def loss(self, weights: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def select(self, weights: Mapping[str, torch.Tensor]) -> float:
        return float(self.loss(weights, -1))


class RetainedObjective(Objective):
    """Maximise the retained score (no data beyond the scores).

    Its members carry the scores as their weight, so an effective weight is the kept scores.
    """

    def __init__(self, members: list[Member], pattern: NMPattern) -> None:
        self.bound = sum(float(unstructured_bound(whole(m.scores), pattern)) for m in members)

    def loss(self, weights: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        # every rank computes the same loss and the ranks' gradients are summed: count it once
        return -sum(w.sum() for w in weights.values()) / (self.bound * distributed.world_size())

    @torch.no_grad()
    def select(self, weights: Mapping[str, torch.Tensor]) -> float:
        return float(-sum(w.sum() for w in weights.values()) / self.bound)


@dataclass
class LearnState:
    """What a learning run holds between steps, as its callbacks see it."""

    effective: EffectiveWeights
    config: LearnConfig
    optimizer: torch.optim.Optimizer
    generator: torch.Generator | None  # the objective's, which its steps draw from
    step: int = 0
    best: float = float("inf")
    best_perms: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    ranking_seconds: float = 0.0  # this call's time in the selection passes

    def place(self, perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return _placed(perms, self.effective)


def learn(
    effective: EffectiveWeights,
    objective: Objective,
    config: LearnConfig,
    description: str = "learn",
    callbacks: list[LearnCallback] | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Train the permuters of ``effective`` on ``objective``; return the best hard permutations
    (judged by ``objective.select``, the start included) and the learning curve (``step``, ``tau``,
    ``lr``, ``loss``, ``select``). ``callbacks`` (default: :func:`default_callbacks`) resume the run
    from a saved point, save it as it goes, and synchronise the ranks
    (:mod:`nmperm_plugin.runtime.callbacks`)."""
    if config.steps < 0:
        raise ValueError(f"learner steps must be 0 or more, got {config.steps}")
    hooks = default_callbacks(description) if callbacks is None else callbacks
    optimizer = torch.optim.Adam(effective.permuters.parameters(), lr=config.lr)
    state = LearnState(effective, config, optimizer, getattr(objective, "generator", None))
    for hook in hooks:
        if (saved := hook.finished(state)) is not None:
            return state.place(saved[0]), saved[1]
    started = time.monotonic()
    if not any([hook.begin(state) for hook in hooks]):  # every hook begins; none restored a saved point
        state.best_perms = effective.hard_perms()
        state.best = objective.select(effective.hard(state.best_perms))
        state.ranking_seconds = time.monotonic() - started
        state.history = [{"step": 0, "tau": config.tau_start, "loss": None, "select": state.best}]
    quiet = config.steps == 0 or any(hook.quiet for hook in hooks)
    steps = range(state.step, config.steps)
    for step in tqdm(steps, desc=description, leave=False, disable=quiet, initial=state.step, total=config.steps):
        tau, lr = anneal(step, config.steps, config.tau_start, config.tau_end), config.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = objective.loss(effective.soft(tau), step)
        optimizer.zero_grad()
        loss.backward()
        for hook in hooks:
            hook.after_backward(state)
        optimizer.step()
        loss_value = float(loss.detach())
        for hook in hooks:
            loss_value = hook.loss_value(loss_value)
        record = {"step": step + 1, "tau": tau, "lr": lr, "loss": loss_value, "select": None}
        if config.ranks(step + 1):
            ranking = time.monotonic()
            perms = effective.hard_perms()
            record["select"] = objective.select(effective.hard(perms))
            state.ranking_seconds += time.monotonic() - ranking
            if record["select"] < state.best:
                state.best, state.best_perms = record["select"], perms
        state.history.append(record)
        state.step = step + 1
        for hook in hooks:
            hook.after_step(state)
    for hook in hooks:
        hook.end(state)
    logger.debug(f"{description}: select {state.history[0]['select']:.5g} -> {state.best:.5g}")
    if len(steps):
        logger.info(
            f"nmperm: {description}: {len(steps)} learning steps in {time.monotonic() - started:.1f} s, "
            f"{state.ranking_seconds:.1f} s of it ranking hard permutations"
        )
    return state.best_perms, state.history


def _placed(perms: dict[str, torch.Tensor], effective: EffectiveWeights) -> dict[str, torch.Tensor]:
    """Saved permutations (on the CPU) where :meth:`EffectiveWeights.hard_perms` would put them."""
    devices = {site: perm.device for site, perm in effective.fixed.items()}
    devices |= {site_name(key): permuter.base.device for key, permuter in effective.permuters.items()}
    return {site: perm.to(devices.get(site, perm.device)) for site, perm in perms.items()}


def retained_ratio(members: list[Member], perms: dict[str, torch.Tensor], pattern: NMPattern) -> float:
    """Retained score over the unstructured bound, summed over members."""
    kept = bound = 0.0
    for member in members:
        scores = whole(member.scores)  # gathered once per member when sharded
        kept += float(retained_score(scores[:, perms[member.site].to(scores.device)], pattern))
        bound += float(unstructured_bound(scores, pattern))
    return kept / bound
